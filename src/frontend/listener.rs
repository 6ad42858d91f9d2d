//! Accepts client connections and admits them in two stages, each with its own bound.
//! A connection still in startup or authentication holds one of
//! `limits.max_unauthenticated` login slots; only a client that has authenticated takes
//! one of `limits.max_client_connections` client slots. Silent or slow sockets thus use
//! up login slots alone (and lose them after `startup_wait` or `login_timeout`), never
//! the slots of real clients. A socket over either bound is refused at once with 53300,
//! before anything is read from it or any TLS handshake.
//!
//! The two semaphores are also the shutdown tracker: a connection always holds a login
//! or a client slot, so once every permit of both is back, every connection has ended.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use super::startup::{self, REFUSE_WRITE_TIMEOUT};
use super::Frontend;
use crate::protocol::messages::{self, btag};

pub struct Listener {
    pub listener: TcpListener,
    pub fe: Arc<Frontend>,
    /// `limits.max_client_connections`: authenticated clients.
    pub max_clients: usize,
    /// `limits.max_unauthenticated`: connections before authentication; also bounds
    /// how many over-limit sockets may linger while their refusal is delivered.
    pub max_unauthenticated: usize,
}

/// A connection's place while it logs in: its login slot, and where it takes a client
/// slot once authenticated.
pub struct Admission {
    login: OwnedSemaphorePermit,
    clients: Arc<Semaphore>,
}

impl Admission {
    /// Trades the login slot for a client slot; None when every client slot is taken.
    /// The client slot is taken before the login slot goes back, so the connection is
    /// counted throughout (the shutdown wait relies on it).
    pub fn admit(self) -> Option<OwnedSemaphorePermit> {
        let client = self.clients.try_acquire_owned().ok();
        drop(self.login);
        client
    }
}

/// Which bound a refused socket hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverLimit {
    Clients,
    Unauthenticated,
}

impl OverLimit {
    /// The text of the 53300 error.
    pub fn message(self) -> &'static str {
        match self {
            OverLimit::Clients => "sorry, too many clients already",
            OverLimit::Unauthenticated => "sorry, too many connections are logging in",
        }
    }
}

impl Listener {
    /// Accepts until `shutdown` turns true, then waits up to `grace` for sessions to
    /// finish their transactions (idle sessions are closed by themselves at once).
    pub async fn run(self, mut shutdown: watch::Receiver<bool>, grace: Duration) {
        let clients = Arc::new(Semaphore::new(self.max_clients));
        let logins = Arc::new(Semaphore::new(self.max_unauthenticated));
        let refusals = Arc::new(Semaphore::new(self.max_unauthenticated));
        let sessions_shutdown = shutdown.clone();
        loop {
            tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok((socket, _)) => match admission(&logins, &clients) {
                        Ok(admission) => {
                            let fe = self.fe.clone();
                            tokio::spawn(startup::serve(socket, fe, admission, sessions_shutdown.clone()));
                        }
                        Err(over) => {
                            let lingering = refusals.clone().try_acquire_owned().ok();
                            tokio::spawn(refuse_over_limit(socket, over, lingering));
                        }
                    },
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
        // Logins first: once they are all back no connection can take a client slot.
        let all = async {
            let _logins = logins.acquire_many(self.max_unauthenticated as u32).await;
            let _clients = clients.acquire_many(self.max_clients as u32).await;
        };
        if tokio::time::timeout(grace, all).await.is_err() {
            tracing::warn!(?grace, "grace period over with sessions still open");
        }
    }
}

/// A login slot for a new socket, unless a bound is reached. A full house of clients
/// refuses at once too: the connection could not get a client slot after logging in.
fn admission(logins: &Arc<Semaphore>, clients: &Arc<Semaphore>) -> Result<Admission, OverLimit> {
    if clients.available_permits() == 0 {
        return Err(OverLimit::Clients);
    }
    let login = logins
        .clone()
        .try_acquire_owned()
        .map_err(|_| OverLimit::Unauthenticated)?;
    Ok(Admission {
        login,
        clients: clients.clone(),
    })
}

/// Refuses a socket over a connection bound with 53300, at once: nothing is read first
/// and no TLS is negotiated. The error is thus the answer to whatever the client sends
/// first. To an SSLRequest that is what PostgreSQL answers when it cannot start a
/// backend, and libpq handles it cleanly: it fails with "server sent an error response
/// during SSL exchange" (since 17.2 without showing the text of an unauthenticated
/// server, CVE-2024-10977), and does not send its startup packet. Answering 'N' instead
/// was tried and is worse: libpq 15 with sslmode=prefer reports "server closed the
/// connection unexpectedly" when the error follows the 'N' at once, waiting for its
/// startup packet makes it send the user name in plaintext and costs a round trip, and
/// sslmode=require clients are told the server "does not support SSL", which sends an
/// operator after the wrong problem.
///
/// The socket is then half-closed and what the client sends is read and dropped until
/// it closes, for at most `REFUSE_WRITE_TIMEOUT`: closing with unread input resets the
/// connection, and a reset can discard the error before the client reads it. Only
/// refusals holding a `lingering` slot wait so; the rest get the error only if the
/// socket takes it without waiting.
async fn refuse_over_limit(
    mut socket: TcpStream,
    over: OverLimit,
    lingering: Option<OwnedSemaphorePermit>,
) {
    // Debug, not info: a flood of them would flood the log.
    tracing::debug!(?over, "connection over the limit refused");
    let mut out = BytesMut::new();
    messages::error_fields(
        &mut out,
        btag::ERROR_RESPONSE,
        "FATAL",
        "53300",
        over.message(),
    );
    if lingering.is_none() {
        let _ = socket.try_write(&out);
        return;
    }
    let linger = async {
        socket.write_all(&out).await?;
        socket.shutdown().await?;
        let mut sink = [0u8; 512];
        while socket.read(&mut sink).await? > 0 {}
        Ok::<_, std::io::Error>(())
    };
    let _ = tokio::time::timeout(REFUSE_WRITE_TIMEOUT, linger).await;
}
