//! Accepts client connections. A semaphore bounds live sessions (the
//! `max_client_connections` limit) and doubles as the shutdown tracker: once every
//! permit is back, every session has ended.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

use super::{startup, Frontend};

pub struct Listener {
    pub listener: TcpListener,
    pub fe: Arc<Frontend>,
    pub max_clients: usize,
}

impl Listener {
    /// Accepts until `shutdown` turns true, then waits up to `grace` for sessions to
    /// finish their transactions (idle sessions are closed by themselves at once).
    pub async fn run(self, mut shutdown: watch::Receiver<bool>, grace: Duration) {
        let slots = Arc::new(Semaphore::new(self.max_clients));
        let sessions_shutdown = shutdown.clone();
        loop {
            tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok((socket, _)) => {
                        let permit = slots.clone().try_acquire_owned().ok();
                        tokio::spawn(startup::serve(socket, self.fe.clone(), permit, sessions_shutdown.clone()));
                    }
                    Err(error) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                _ = async { let _ = shutdown.wait_for(|stop| *stop).await; } => break,
            }
        }
        drop(self.listener);
        tracing::info!("stopped accepting; waiting for open transactions");
        let all = slots.acquire_many(self.max_clients as u32);
        if tokio::time::timeout(grace, all).await.is_err() {
            tracing::warn!(?grace, "grace period over with sessions still open");
        }
    }
}
