//! The cutover gate: how a reshard job holds new transactions on the shards that give
//! keys away, and knows when the ones already running have ended.
//!
//! While a job runs the gate is armed for its source shards: every transaction that
//! borrows a connection of a source shard carries a `Ticket` until it ends. At cutover
//! the job closes the gate (new transactions wait, bounded by `reshard.max_pause`) and
//! waits for the tickets to drain; only then is the source's last WAL position final.
//!
//! Closing and entering follow the store-then-check pattern on two `SeqCst` atomics:
//! a session counts itself in and then checks `closed`, the job sets `closed` and then
//! reads the count, so one of the two always sees the other. The hot path with no job
//! running is one relaxed load.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

#[derive(Default)]
pub struct CutoverGate {
    armed: AtomicBool,
    closed: AtomicBool,
    inflight: Arc<AtomicUsize>,
    /// Names of the shards whose transactions are counted. A std Mutex: held for a
    /// lookup only, never across an await.
    sources: Mutex<Vec<String>>,
    /// Shards receiving keys: they hold copies that must not be written directly.
    targets: Mutex<Vec<String>>,
    /// Signals the end of a pause (`false`).
    paused: watch::Sender<bool>,
}

/// One transaction on a source shard; dropped when the transaction ends.
#[derive(Debug)]
pub struct Ticket(Arc<AtomicUsize>);

impl Drop for Ticket {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The gate was closed when the transaction tried to enter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Closed;

impl CutoverGate {
    /// Counts transactions on `sources` from now on.
    pub fn arm(&self, sources: &[String], targets: &[String]) {
        *self.sources.lock().unwrap_or_else(|e| e.into_inner()) = sources.to_vec();
        *self.targets.lock().unwrap_or_else(|e| e.into_inner()) = targets.to_vec();
        self.armed.store(true, Ordering::SeqCst);
    }

    pub fn disarm(&self) {
        self.open();
        self.armed.store(false, Ordering::SeqCst);
        self.sources
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    pub fn is_armed(&self) -> bool {
        self.armed.load(Ordering::Relaxed)
    }

    /// A ticket for a transaction starting on `shard`: None when nothing is counted
    /// there, `Err(Closed)` while a cutover holds new transactions.
    pub fn enter(&self, shard: &str) -> Result<Option<Ticket>, Closed> {
        if !self.armed.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let counted = self
            .sources
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|s| s == shard);
        if !counted {
            return Ok(None);
        }
        self.inflight.fetch_add(1, Ordering::SeqCst);
        let ticket = Ticket(self.inflight.clone());
        if self.closed.load(Ordering::SeqCst) {
            return Err(Closed);
        }
        Ok(Some(ticket))
    }

    /// A ticket for a transaction about to be routed (its shard is not known yet):
    /// None while no job runs, `Err(Closed)` while a cutover holds new transactions.
    pub fn enter_any(&self) -> Result<Option<Ticket>, Closed> {
        if !self.armed.load(Ordering::Relaxed) {
            return Ok(None);
        }
        self.inflight.fetch_add(1, Ordering::SeqCst);
        let ticket = Ticket(self.inflight.clone());
        if self.closed.load(Ordering::SeqCst) {
            return Err(Closed);
        }
        Ok(Some(ticket))
    }

    /// Whether `shard` gives keys away in the running job.
    pub fn is_source(&self, shard: &str) -> bool {
        self.sources
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|s| s == shard)
    }

    /// Whether `shard` receives keys in the running job.
    pub fn is_target(&self, shard: &str) -> bool {
        self.armed.load(Ordering::Relaxed)
            && self
                .targets
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .any(|s| s == shard)
    }

    /// Whether new transactions must wait now.
    pub fn is_closed(&self) -> bool {
        self.armed.load(Ordering::Relaxed) && self.closed.load(Ordering::SeqCst)
    }

    /// Waits while the gate is closed, at most `limit`; false when it stayed closed.
    pub async fn wait_open(&self, limit: Duration) -> bool {
        let mut rx = self.paused.subscribe();
        if !self.is_closed() {
            return true;
        }
        let opened = tokio::time::timeout(limit, rx.wait_for(|paused| !*paused)).await;
        opened.is_ok()
    }

    /// Holds new transactions on the source shards.
    pub fn close(&self) {
        self.paused.send_replace(true);
        self.closed.store(true, Ordering::SeqCst);
    }

    pub fn open(&self) {
        self.closed.store(false, Ordering::SeqCst);
        self.paused.send_replace(false);
    }

    /// Transactions on source shards right now.
    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tickets_count_only_source_shards_while_armed() {
        let gate = CutoverGate::default();
        assert!(gate.enter("s1").unwrap().is_none());
        gate.arm(&["s1".to_owned()], &["s2".to_owned()]);
        assert!(gate.enter("s0").unwrap().is_none());
        let ticket = gate.enter("s1").unwrap().unwrap();
        assert_eq!(gate.inflight(), 1);
        drop(ticket);
        assert_eq!(gate.inflight(), 0);
    }

    #[test]
    fn a_closed_gate_refuses_and_does_not_count() {
        let gate = CutoverGate::default();
        gate.arm(&["s1".to_owned()], &["s2".to_owned()]);
        let running = gate.enter("s1").unwrap();
        gate.close();
        assert_eq!(gate.enter("s1").unwrap_err(), Closed);
        assert_eq!(gate.inflight(), 1, "the refused one is not counted");
        drop(running);
        assert_eq!(gate.inflight(), 0);
        gate.open();
        assert!(gate.enter("s1").unwrap().is_some());
    }

    #[tokio::test]
    async fn waiting_ends_when_the_gate_opens() {
        let gate = Arc::new(CutoverGate::default());
        gate.arm(&["s1".to_owned()], &["s2".to_owned()]);
        gate.close();
        let waiter = {
            let gate = gate.clone();
            tokio::spawn(async move { gate.wait_open(Duration::from_secs(30)).await })
        };
        tokio::task::yield_now().await;
        gate.open();
        assert!(waiter.await.unwrap());
        gate.close();
        assert!(!gate.wait_open(Duration::from_millis(10)).await);
    }
}
