//! Cancel routing. Each client gets a proxy-issued (pid, secret); while it has a server
//! connection on loan, its slot holds that server's own key. A CancelRequest is sent to
//! that server only, so it can never reach another session's query.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rand::Rng;

/// Where a cancel for this client should go right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CancelTarget {
    pub host: String,
    pub port: u16,
    pub key: (u32, u32),
}

#[derive(Default)]
pub struct CancelSlot {
    current: Mutex<Option<CancelTarget>>,
}

impl CancelSlot {
    pub fn set(&self, target: Option<CancelTarget>) {
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = target;
    }

    pub fn get(&self) -> Option<CancelTarget> {
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

#[derive(Default)]
pub struct CancelRegistry {
    sessions: Mutex<HashMap<u32, (u32, Arc<CancelSlot>)>>,
}

/// Removes the registration when the session ends.
pub struct CancelGuard<'a> {
    registry: &'a CancelRegistry,
    pub pid: u32,
    pub secret: u32,
    pub slot: Arc<CancelSlot>,
}

impl CancelRegistry {
    pub fn register(&self) -> CancelGuard<'_> {
        let mut rng = rand::thread_rng();
        let slot = Arc::new(CancelSlot::default());
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let (pid, secret) = loop {
            let pid = rng.gen_range(1..i32::MAX as u32);
            if !sessions.contains_key(&pid) {
                break (pid, rng.gen());
            }
        };
        sessions.insert(pid, (secret, slot.clone()));
        CancelGuard {
            registry: self,
            pid,
            secret,
            slot,
        }
    }

    /// The server to cancel on behalf of (pid, secret), if the key is valid and the
    /// session is running something.
    pub fn lookup(&self, pid: u32, secret: u32) -> Option<CancelTarget> {
        let sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        match sessions.get(&pid) {
            Some((s, slot)) if *s == secret => slot.get(),
            _ => None,
        }
    }

    pub fn len(&self) -> usize {
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for CancelGuard<'_> {
    fn drop(&mut self) {
        let mut sessions = self
            .registry
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        sessions.remove(&self.pid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_right_secret_finds_the_target() {
        let reg = CancelRegistry::default();
        let a = reg.register();
        let b = reg.register();
        let target = CancelTarget {
            host: "h".into(),
            port: 1,
            key: (10, 20),
        };
        a.slot.set(Some(target.clone()));
        assert_eq!(reg.lookup(a.pid, a.secret), Some(target));
        assert_eq!(reg.lookup(a.pid, a.secret.wrapping_add(1)), None);
        assert_eq!(reg.lookup(b.pid, b.secret), None, "b runs nothing");
        drop(a);
        assert_eq!(reg.len(), 1);
    }
}
