//! `PAUSE [shard]` / `RESUME [shard]`: new transactions for a paused shard wait (in a
//! bounded queue, for a bounded time) until it is resumed; transactions already
//! running finish normally. The session asks `wait_if_paused` before it borrows a
//! server connection for a new transaction. The hot path, nothing paused, is one
//! relaxed atomic load.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::watch;

/// Default of `limits.max_paused_transactions`: transactions that may wait on paused
/// shards at once; past it new ones are refused at once instead of queueing (memory
/// and file descriptors stay bounded).
pub const MAX_WAITING: usize = 10_000;

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PauseState {
    /// `PAUSE` without a shard: every shard.
    pub all: bool,
    pub shards: BTreeSet<String>,
}

impl PauseState {
    pub fn is_paused(&self, shard: &str) -> bool {
        self.all || self.shards.contains(shard)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PauseError {
    #[error("shard \"{shard}\" is paused by the admin console; gave up after {waited:?}")]
    TimedOut { shard: String, waited: Duration },
    #[error(
        "shard \"{0}\" is paused by the admin console and too many transactions are waiting for it"
    )]
    QueueFull(String),
}

impl PauseError {
    /// What the client is told: the server cannot take the transaction now.
    pub fn sqlstate(&self) -> &'static str {
        "57P03"
    }
}

pub struct Pauses {
    state: watch::Sender<PauseState>,
    /// Mirrors "anything paused" for the hot path.
    any: AtomicBool,
    waiting: AtomicUsize,
    /// How long `wait_if_paused` holds a transaction.
    pub max_wait: Duration,
    /// How many may wait at once.
    max_waiting: usize,
}

impl Pauses {
    pub fn new(max_wait: Duration) -> Pauses {
        Pauses::with_limit(max_wait, MAX_WAITING)
    }

    pub fn with_limit(max_wait: Duration, max_waiting: usize) -> Pauses {
        Pauses {
            max_waiting,
            state: watch::Sender::new(PauseState::default()),
            any: AtomicBool::new(false),
            waiting: AtomicUsize::new(0),
            max_wait,
        }
    }

    /// Pauses one shard, or all when `shard` is None.
    pub fn pause(&self, shard: Option<&str>) {
        self.state.send_modify(|s| match shard {
            Some(name) => {
                s.shards.insert(name.to_owned());
            }
            None => s.all = true,
        });
        self.any.store(true, Ordering::Release);
    }

    /// Resumes one shard, or everything (including shards paused one by one) when
    /// `shard` is None. Resuming one shard while all are paused changes nothing.
    pub fn resume(&self, shard: Option<&str>) {
        self.state.send_modify(|s| match shard {
            Some(name) => {
                s.shards.remove(name);
            }
            None => *s = PauseState::default(),
        });
        let state = self.state.borrow();
        self.any
            .store(state.all || !state.shards.is_empty(), Ordering::Release);
    }

    pub fn state(&self) -> PauseState {
        self.state.borrow().clone()
    }

    pub fn is_paused(&self, shard: &str) -> bool {
        self.any.load(Ordering::Acquire) && self.state.borrow().is_paused(shard)
    }

    /// Transactions waiting right now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Waits while `shard` is paused, at most `max_wait`.
    pub async fn wait_if_paused(&self, shard: &str) -> Result<(), PauseError> {
        self.wait(shard, self.max_wait).await
    }

    /// Waits while `shard` is paused, at most `timeout`.
    pub async fn wait(&self, shard: &str, timeout: Duration) -> Result<(), PauseError> {
        if !self.is_paused(shard) {
            return Ok(());
        }
        if self.waiting.fetch_add(1, Ordering::AcqRel) >= self.max_waiting {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(PauseError::QueueFull(shard.to_owned()));
        }
        let mut rx = self.state.subscribe();
        let resumed = tokio::time::timeout(timeout, rx.wait_for(|s| !s.is_paused(shard))).await;
        self.waiting.fetch_sub(1, Ordering::AcqRel);
        match resumed {
            Ok(_) => Ok(()),
            Err(_) => Err(PauseError::TimedOut {
                shard: shard.to_owned(),
                waited: timeout,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test(start_paused = true)]
    async fn waits_until_resumed() {
        let pauses = Arc::new(Pauses::new(Duration::from_secs(5)));
        pauses.pause(Some("s0"));
        assert!(pauses.is_paused("s0"));
        assert!(!pauses.is_paused("s1"));
        pauses.wait_if_paused("s1").await.expect("s1 is not paused");
        let waiter = {
            let pauses = pauses.clone();
            tokio::spawn(async move { pauses.wait_if_paused("s0").await })
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(pauses.waiting(), 1);
        pauses.resume(Some("s0"));
        assert_eq!(waiter.await.ok(), Some(Ok(())));
        assert_eq!(pauses.waiting(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_after_the_bound() {
        let pauses = Pauses::new(Duration::from_secs(2));
        pauses.pause(None);
        let err = pauses.wait_if_paused("any").await.unwrap_err();
        assert_eq!(
            err,
            PauseError::TimedOut {
                shard: "any".into(),
                waited: Duration::from_secs(2)
            }
        );
        assert_eq!(err.sqlstate(), "57P03");
    }

    #[test]
    fn resume_all_clears_every_pause() {
        let pauses = Pauses::new(Duration::from_secs(1));
        pauses.pause(Some("a"));
        pauses.pause(None);
        pauses.resume(Some("a"));
        assert!(pauses.is_paused("a"), "still paused by PAUSE of all shards");
        pauses.resume(None);
        assert!(!pauses.is_paused("a"));
        assert_eq!(pauses.state(), PauseState::default());
    }
}
