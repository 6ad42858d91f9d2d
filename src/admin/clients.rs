//! Who is connected, for `SHOW CLIENTS` and the per-pool client gauges. A client is
//! registered once logged in and removed when its guard drops; the session keeps
//! nothing else up to date here: whether it holds a server connection (and which) is
//! read from its cancel slot, which the session already maintains.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use crate::frontend::cancel::CancelSlot;

/// One logged-in client.
pub struct ClientInfo {
    /// "ip:port" of the client.
    pub addr: String,
    pub user: String,
    pub database: String,
    pub tls: bool,
    /// The proxy-issued process id the client got in BackendKeyData (0: none).
    pub pid: u32,
    /// Set while the client holds a server connection (None for console clients).
    pub server: Option<Arc<CancelSlot>>,
    pub connected_at: SystemTime,
}

/// A client as `SHOW CLIENTS` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientRow {
    pub id: u64,
    pub addr: String,
    pub user: String,
    pub database: String,
    pub tls: bool,
    pub pid: u32,
    pub connected_at: SystemTime,
    /// "host:port" of the server connection it holds right now.
    pub server: Option<String>,
}

#[derive(Default)]
pub struct ClientRegistry {
    next: AtomicU64,
    /// A std Mutex: held to insert, remove or copy, never across .await. By id, so
    /// listings come out in connection order.
    clients: Mutex<BTreeMap<u64, Arc<ClientInfo>>>,
}

/// Removes the client from the registry when dropped (at disconnect).
pub struct ClientGuard<'a> {
    registry: &'a ClientRegistry,
    pub id: u64,
}

impl ClientRegistry {
    pub fn register(&self, info: ClientInfo) -> ClientGuard<'_> {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        self.lock().insert(id, Arc::new(info));
        ClientGuard { registry: self, id }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Arc<ClientInfo>>> {
        self.clients.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every client, oldest first.
    pub fn list(&self) -> Vec<ClientRow> {
        let clients: Vec<(u64, Arc<ClientInfo>)> =
            self.lock().iter().map(|(k, v)| (*k, v.clone())).collect();
        clients
            .into_iter()
            .map(|(id, c)| ClientRow {
                id,
                addr: c.addr.clone(),
                user: c.user.clone(),
                database: c.database.clone(),
                tls: c.tls,
                pid: c.pid,
                connected_at: c.connected_at,
                server: c
                    .server
                    .as_ref()
                    .and_then(|s| s.get())
                    .map(|t| format!("{}:{}", t.host, t.port)),
            })
            .collect()
    }

    /// Clients per (user, database): (active = holding a server connection, idle).
    pub fn counts(&self) -> BTreeMap<(String, String), (u64, u64)> {
        let mut out: BTreeMap<(String, String), (u64, u64)> = BTreeMap::new();
        for c in self.list() {
            let entry = out.entry((c.user, c.database)).or_default();
            if c.server.is_some() {
                entry.0 += 1;
            } else {
                entry.1 += 1;
            }
        }
        out
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for ClientGuard<'_> {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frontend::cancel::CancelTarget;

    fn info(user: &str, server: Option<Arc<CancelSlot>>) -> ClientInfo {
        ClientInfo {
            addr: "127.0.0.1:5000".into(),
            user: user.into(),
            database: "app".into(),
            tls: false,
            pid: 7,
            server,
            connected_at: SystemTime::UNIX_EPOCH,
        }
    }

    #[test]
    fn registers_lists_and_forgets() {
        let reg = ClientRegistry::default();
        let slot = Arc::new(CancelSlot::default());
        let a = reg.register(info("app", Some(slot.clone())));
        let b = reg.register(info("admin", None));
        assert_eq!(reg.len(), 2);
        assert_eq!(reg.list()[0].server, None);
        slot.set(Some(CancelTarget {
            host: "db1".into(),
            port: 5432,
            key: (1, 2),
        }));
        let rows = reg.list();
        assert_eq!(rows[0].id, a.id);
        assert_eq!(rows[0].server.as_deref(), Some("db1:5432"));
        let counts = reg.counts();
        assert_eq!(counts[&("app".into(), "app".into())], (1, 0));
        assert_eq!(counts[&("admin".into(), "app".into())], (0, 1));
        drop(a);
        assert_eq!(reg.list().len(), 1);
        assert_eq!(reg.list()[0].id, b.id);
    }
}
