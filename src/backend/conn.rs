//! One server (upstream) connection: TCP connect, startup and authentication as a
//! PostgreSQL client, and the bookkeeping a pooled connection carries between clients
//! (prepared statements it holds, session settings applied to it, transaction status).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use postgres_protocol::authentication::{md5_hash, sasl};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

use super::params::SessionParams;
use super::BackendError;
use crate::protocol::messages::{self, btag};
use crate::protocol::{decode_frame, Frame, ProtocolError};

/// Bound on the messages of the proxy's own exchanges with a server (authentication,
/// startup, SET, ROLLBACK, DISCARD ALL, a one-value lookup, the answers to a client's
/// Parse and Describe after our Sync): all small, a RowDescription of the widest table
/// or a ParameterDescription of 65535 parameters included. Anything larger means the
/// server is misbehaving. Client traffic is bounded by `limits.max_message_size` or
/// streamed (session::server_msgs).
pub const INTERNAL_MESSAGE_LIMIT: usize = 1 << 20;

/// Where and as whom to connect.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServerTarget {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: Option<String>,
    pub database: String,
}

impl ServerTarget {
    pub fn addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

pub struct ServerConn {
    pub rd: OwnedReadHalf,
    pub wr: OwnedWriteHalf,
    /// Bytes read from the server and not yet processed.
    pub rbuf: BytesMut,
    pub host: String,
    pub port: u16,
    /// The server's own cancel key (pid, secret).
    pub backend_key: (u32, u32),
    /// ParameterStatus values the server reported at startup.
    pub startup_params: Vec<(String, String)>,
    /// Pool-wide statement ids prepared on this connection under `sg_<id>`.
    pub prepared: HashSet<u64>,
    /// Statement id currently held in the unnamed slot, if known.
    pub unnamed: Option<u64>,
    /// Session settings applied with SET since the connection was opened or reset.
    pub applied: SessionParams,
    /// Last ReadyForQuery status: b'I' idle, b'T' in transaction, b'E' failed.
    pub txn_status: u8,
    /// Session state we do not track (temp tables, LISTEN, SQL-level PREPARE...) was
    /// created: the connection gets DISCARD ALL before anyone else uses it.
    pub tainted: bool,
    /// An extended-protocol message went to the server after the last Sync (or simple
    /// Query): the server may hold an implicit transaction, portals and locks that only
    /// the client's coming Sync ends. Such a connection belongs to its client; it is
    /// never pooled (its ReadyForQuery status is from before the batch).
    pub unsynced: bool,
    /// A Bind, Execute, Query or FunctionCall went to the server since the last Sync:
    /// the open batch did more than parse and describe.
    pub ran_since_sync: bool,
    /// The connection saw an I/O or protocol error: it is closed, never pooled.
    pub broken: bool,
    /// Long messages relayed in pieces (session::server_msgs, client_msgs): bytes of
    /// a server DataRow/CopyData still to pass to the client, and of a client CopyData
    /// still owed to this server. Non-zero: the connection is in the middle of a
    /// message in that direction, never pooled.
    pub to_client_rest: usize,
    pub to_server_rest: usize,
    /// The message being relayed to the client is one the proxy hides: dropped.
    pub to_client_hidden: bool,
    pub created: Instant,
    pub last_used: Instant,
}

impl ServerConn {
    pub async fn connect(
        target: &ServerTarget,
        timeout: Duration,
    ) -> Result<ServerConn, BackendError> {
        match tokio::time::timeout(timeout, Self::connect_inner(target)).await {
            Ok(result) => result,
            Err(_) => Err(BackendError::ConnectTimeout(target.addr())),
        }
    }

    async fn connect_inner(target: &ServerTarget) -> Result<ServerConn, BackendError> {
        let stream = TcpStream::connect((target.host.as_str(), target.port))
            .await
            .map_err(|e| BackendError::Connect(target.addr(), e))?;
        stream.set_nodelay(true).ok();
        let (rd, wr) = stream.into_split();
        let now = Instant::now();
        let mut conn = ServerConn {
            rd,
            wr,
            rbuf: BytesMut::with_capacity(16 * 1024),
            host: target.host.clone(),
            port: target.port,
            backend_key: (0, 0),
            startup_params: Vec::new(),
            prepared: HashSet::new(),
            unnamed: None,
            applied: SessionParams::default(),
            txn_status: b'I',
            tainted: false,
            unsynced: false,
            ran_since_sync: false,
            broken: false,
            to_client_rest: 0,
            to_server_rest: 0,
            to_client_hidden: false,
            created: now,
            last_used: now,
        };
        let mut out = BytesMut::new();
        messages::startup(
            &mut out,
            &[("user", &target.user), ("database", &target.database)],
        );
        conn.wr.write_all(&out).await?;
        conn.authenticate(target).await?;
        conn.read_until_ready(true).await?;
        Ok(conn)
    }

    /// Reads the next whole message from the server, at most `max_len` bytes long.
    pub async fn read_frame(&mut self, max_len: usize) -> Result<Frame, BackendError> {
        loop {
            let decoded = decode_frame(&mut self.rbuf, max_len);
            if let Some(frame) = decoded.map_err(|e| self.framing_error(e))? {
                return Ok(frame);
            }
            self.rbuf.reserve(8192);
            if self.rd.read_buf(&mut self.rbuf).await? == 0 {
                return Err(BackendError::Closed);
            }
        }
    }

    /// A protocol error in bytes this server sent, named by its address.
    pub fn framing_error(&self, error: ProtocolError) -> BackendError {
        BackendError::Protocol {
            addr: format!("{}:{}", self.host, self.port),
            error,
        }
    }

    async fn authenticate(&mut self, target: &ServerTarget) -> Result<(), BackendError> {
        let mut scram: Option<sasl::ScramSha256> = None;
        loop {
            let frame = self.read_frame(INTERNAL_MESSAGE_LIMIT).await?;
            match frame.tag {
                btag::AUTHENTICATION => {}
                btag::ERROR_RESPONSE => return Err(server_error(&frame)),
                other => return Err(BackendError::Unexpected(other, "authentication")),
            }
            let mut body = frame.body();
            if body.len() < 4 {
                return Err(BackendError::Unexpected(
                    b'R',
                    "short authentication message",
                ));
            }
            let code = body.get_i32();
            let password = || {
                target
                    .password
                    .as_deref()
                    .ok_or_else(|| BackendError::NoPassword(target.user.clone()))
            };
            let mut out = BytesMut::new();
            match code {
                0 => return Ok(()),
                3 => {
                    let mut p = password()?.as_bytes().to_vec();
                    p.push(0);
                    messages::password(&mut out, &p);
                }
                5 => {
                    let salt: [u8; 4] = body
                        .get(..4)
                        .and_then(|s| s.try_into().ok())
                        .ok_or(BackendError::Unexpected(b'R', "md5 salt"))?;
                    let mut p =
                        md5_hash(target.user.as_bytes(), password()?.as_bytes(), salt).into_bytes();
                    p.push(0);
                    messages::password(&mut out, &p);
                }
                10 => {
                    let offered = String::from_utf8_lossy(body);
                    if !offered.split('\0').any(|m| m == "SCRAM-SHA-256") {
                        return Err(BackendError::Unsupported(format!(
                            "SASL mechanisms {offered:?}"
                        )));
                    }
                    let client = sasl::ScramSha256::new(
                        password()?.as_bytes(),
                        sasl::ChannelBinding::unsupported(),
                    );
                    messages::sasl_initial_response(&mut out, "SCRAM-SHA-256", client.message());
                    scram = Some(client);
                }
                11 | 12 => {
                    let client = scram
                        .as_mut()
                        .ok_or(BackendError::Unexpected(b'R', "SASL out of order"))?;
                    if code == 11 {
                        client.update(body).map_err(BackendError::Scram)?;
                        messages::put_msg(&mut out, b'p', |b| {
                            b.extend_from_slice(client.message())
                        });
                    } else {
                        client.finish(body).map_err(BackendError::Scram)?;
                    }
                }
                other => {
                    return Err(BackendError::Unsupported(format!(
                        "authentication method {other}"
                    )))
                }
            }
            if !out.is_empty() {
                self.wr.write_all(&out).await?;
            }
        }
    }

    /// Consumes messages up to and including ReadyForQuery. At startup it records
    /// ParameterStatus and BackendKeyData; otherwise results are dropped and the first
    /// error is returned after the server is ready again (so the connection stays usable).
    pub async fn read_until_ready(&mut self, startup: bool) -> Result<(), BackendError> {
        let mut first_error = None;
        loop {
            let frame = self.read_frame(INTERNAL_MESSAGE_LIMIT).await?;
            match frame.tag {
                btag::READY_FOR_QUERY => {
                    self.txn_status = frame.body().first().copied().unwrap_or(b'I');
                    return first_error.map_or(Ok(()), Err);
                }
                btag::ERROR_RESPONSE if startup => return Err(server_error(&frame)),
                btag::ERROR_RESPONSE => {
                    first_error.get_or_insert_with(|| server_error(&frame));
                }
                btag::PARAMETER_STATUS if startup => {
                    let mut body = frame.body();
                    let mut cstr = || {
                        crate::protocol::frame::take_cstr(&mut body)
                            .map(str::to_owned)
                            .map_err(|e| self.framing_error(e))
                    };
                    let (name, value) = (cstr()?, cstr()?);
                    self.startup_params.push((name, value));
                }
                btag::BACKEND_KEY_DATA if startup => {
                    let mut body = frame.body();
                    if body.len() >= 8 {
                        self.backend_key = (body.get_u32(), body.get_u32());
                    }
                }
                _ => {}
            }
        }
    }

    /// Ends the extended-protocol batch open on this connection with a Sync (which
    /// commits its implicit transaction, if any) and reads up to ReadyForQuery; the
    /// first error of the batch is returned, the connection then being idle.
    pub async fn sync(&mut self) -> Result<(), BackendError> {
        let result = async {
            let mut out = BytesMut::new();
            messages::empty_msg(&mut out, crate::protocol::messages::tag::SYNC);
            self.wr.write_all(&out).await?;
            self.read_until_ready(false).await
        }
        .await;
        self.note_failure(result)?;
        self.unsynced = false;
        Ok(())
    }

    /// Runs SQL through the simple protocol and discards its results: used for the
    /// proxy's own housekeeping (settings, ROLLBACK, DISCARD ALL), never for clients.
    pub async fn run_internal(&mut self, sql: &str) -> Result<(), BackendError> {
        let result = async {
            let mut out = BytesMut::new();
            messages::query(&mut out, sql);
            self.wr.write_all(&out).await?;
            self.read_until_ready(false).await
        }
        .await;
        self.note_failure(result)
    }

    /// Marks the connection broken when `result` is a connection failure (anything but
    /// an error the server reported and recovered from with ReadyForQuery).
    pub fn note_failure<T>(&mut self, result: Result<T, BackendError>) -> Result<T, BackendError> {
        if let Err(error) = &result {
            if error.is_connection_failure() {
                self.broken = true;
            }
        }
        result
    }

    /// Whether the connection still looks usable while idle: the server has neither
    /// closed it nor sent anything (a terminated backend sends FATAL, then closes).
    /// Costs a system call only when the socket was last seen readable.
    pub fn looks_alive(&self) -> bool {
        let mut probe = [0u8; 1];
        matches!(self.rd.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }

    /// Runs a one-row, one-column query for the proxy's own use (e.g. the WAL position
    /// after a write) and returns the value as text.
    pub async fn query_scalar(&mut self, sql: &str) -> Result<Option<String>, BackendError> {
        let result = self.query_scalar_inner(sql).await;
        self.note_failure(result)
    }

    async fn query_scalar_inner(&mut self, sql: &str) -> Result<Option<String>, BackendError> {
        let mut out = BytesMut::new();
        messages::query(&mut out, sql);
        self.wr.write_all(&out).await?;
        let mut value = None;
        let mut error = None;
        loop {
            let frame = self.read_frame(INTERNAL_MESSAGE_LIMIT).await?;
            match frame.tag {
                btag::DATA_ROW if value.is_none() => value = first_column(frame.body()),
                btag::ERROR_RESPONSE => error = Some(server_error(&frame)),
                btag::READY_FOR_QUERY => {
                    self.txn_status = frame.body().first().copied().unwrap_or(b'I');
                    return error.map_or(Ok(value), Err);
                }
                _ => {}
            }
        }
    }

    /// Whether `reset` has anything to do (an open transaction or untracked state).
    pub fn needs_reset(&self) -> bool {
        self.txn_status != b'I' || self.tainted
    }

    /// Whether the pool may take this connection back as it is: idle, clean, between
    /// messages, in sync and unbroken.
    pub fn is_poolable(&self) -> bool {
        self.txn_status == b'I'
            && !self.tainted
            && !self.unsynced
            && !self.broken
            && self.to_client_rest == 0
            && self.to_server_rest == 0
            && self.rbuf.is_empty()
    }

    /// Resets everything a client may have left behind, so the connection can serve
    /// anyone: ends a transaction, then DISCARD ALL when untracked state exists.
    pub async fn reset(&mut self) -> Result<(), BackendError> {
        if self.txn_status != b'I' {
            self.run_internal("ROLLBACK").await?;
        }
        if self.tainted {
            self.run_internal("DISCARD ALL").await?;
            self.prepared.clear();
            self.unnamed = None;
            self.applied = SessionParams::default();
            self.tainted = false;
        }
        Ok(())
    }

    /// Lets the kernel find a server that vanished without closing (a partition, a
    /// frozen host): keepalive probes after `keepalive` of silence, every third of it,
    /// and TCP_USER_TIMEOUT for data sent but never acknowledged. Zero leaves either
    /// off. Best effort: a socket that refuses the option is used as it is.
    pub fn set_liveness(&self, keepalive: Duration, user_timeout: Duration) {
        set_liveness(self.wr.as_ref(), keepalive, user_timeout);
    }

    pub async fn terminate(mut self) {
        let mut out = BytesMut::new();
        messages::empty_msg(&mut out, b'X');
        let _ = tokio::time::timeout(Duration::from_millis(100), self.wr.write_all(&out)).await;
    }
}

/// Unanswered keepalive probes before the kernel closes a server connection: with the
/// default `pool.tcp_keepalive` a silent server is given up after 30 s + 3 x 10 s.
const KEEPALIVE_PROBES: u32 = 3;

/// See [`ServerConn::set_liveness`].
fn set_liveness(stream: &TcpStream, keepalive: Duration, user_timeout: Duration) {
    let socket = socket2::SockRef::from(stream);
    if !keepalive.is_zero() {
        let probes = socket2::TcpKeepalive::new()
            .with_time(keepalive)
            .with_interval((keepalive / 3).max(Duration::from_secs(1)));
        #[cfg(target_os = "linux")]
        let probes = probes.with_retries(KEEPALIVE_PROBES);
        if let Err(error) = socket.set_tcp_keepalive(&probes) {
            tracing::debug!(%error, "TCP keepalive not set on a server connection");
        }
    }
    #[cfg(target_os = "linux")]
    if !user_timeout.is_zero() {
        if let Err(error) = socket.set_tcp_user_timeout(Some(user_timeout)) {
            tracing::debug!(%error, "TCP_USER_TIMEOUT not set on a server connection");
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = user_timeout;
}

/// The first column of a DataRow body as text (NULL -> None).
fn first_column(mut body: &[u8]) -> Option<String> {
    if body.len() < 6 {
        return None;
    }
    body.advance(2);
    let len = body.get_i32();
    if len < 0 || body.len() < len as usize {
        return None;
    }
    Some(String::from_utf8_lossy(&body[..len as usize]).into_owned())
}

fn server_error(frame: &Frame) -> BackendError {
    let (code, message) = messages::decode_error_fields(frame);
    BackendError::Server { code, message }
}

/// Bound on the TCP connect of a CancelRequest sent without a configured one (the
/// default of `pool.connect_timeout`). An unreachable server (a dropped SYN, a full
/// accept queue) would otherwise hold the caller for the kernel's connect timeout,
/// minutes on Linux.
pub const CANCEL_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long to wait for the server to close the connection after reading the request.
const CANCEL_CLOSE_WAIT: Duration = Duration::from_secs(5);

/// Sends a CancelRequest for a server's own key, on a fresh connection as the
/// protocol requires, connecting within `CANCEL_CONNECT_TIMEOUT`.
pub async fn send_cancel(host: &str, port: u16, key: (u32, u32)) -> Result<(), BackendError> {
    send_cancel_within(host, port, key, CANCEL_CONNECT_TIMEOUT).await
}

/// `send_cancel` with the connect bounded by `connect_timeout` (the proxy passes
/// `pool.connect_timeout`).
pub async fn send_cancel_within(
    host: &str,
    port: u16,
    key: (u32, u32),
    connect_timeout: Duration,
) -> Result<(), BackendError> {
    let addr = || format!("{host}:{port}");
    let mut stream = tokio::time::timeout(connect_timeout, TcpStream::connect((host, port)))
        .await
        .map_err(|_| BackendError::ConnectTimeout(addr()))?
        .map_err(|e| BackendError::Connect(addr(), e))?;
    let mut out = BytesMut::new();
    messages::cancel_request(&mut out, key.0, key.1);
    stream.write_all(&out).await?;
    // The server closes the connection once it has read the request.
    let mut sink = [0u8; 16];
    let _ = tokio::time::timeout(CANCEL_CLOSE_WAIT, stream.read(&mut sink)).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn server_sockets_get_keepalive_and_a_user_timeout() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let socket = socket2::SockRef::from(&stream);
        assert!(!socket.keepalive().unwrap());
        set_liveness(&stream, Duration::from_secs(30), Duration::from_secs(20));
        assert!(socket.keepalive().unwrap());
        assert_eq!(
            socket.tcp_keepalive_time().unwrap(),
            Duration::from_secs(30)
        );
        assert_eq!(
            socket.tcp_keepalive_interval().unwrap(),
            Duration::from_secs(10)
        );
        #[cfg(target_os = "linux")]
        assert_eq!(socket.tcp_keepalive_retries().unwrap(), KEEPALIVE_PROBES);
        #[cfg(target_os = "linux")]
        assert_eq!(
            socket.tcp_user_timeout().unwrap(),
            Some(Duration::from_secs(20))
        );
        // Zero leaves both as they were.
        let other = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        set_liveness(&other, Duration::ZERO, Duration::ZERO);
        let socket = socket2::SockRef::from(&other);
        assert!(!socket.keepalive().unwrap());
        #[cfg(target_os = "linux")]
        assert_eq!(socket.tcp_user_timeout().unwrap(), None);
    }

    /// A listener whose accept queue is full: the kernel drops further SYNs, so a
    /// connect to it hangs like one to a host that vanished. Returns the listener and
    /// the connections that filled the queue (both must stay alive).
    async fn blackhole() -> (tokio::net::TcpListener, Vec<TcpStream>) {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(0).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut held = Vec::new();
        while held.len() < 16 {
            match tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(addr)).await {
                Ok(Ok(s)) => held.push(s),
                _ => return (listener, held),
            }
        }
        panic!("the accept queue never filled");
    }

    #[tokio::test]
    async fn cancel_connect_to_an_unreachable_server_is_bounded() {
        let (listener, _held) = blackhole().await;
        let port = listener.local_addr().unwrap().port();
        let sent = tokio::time::timeout(
            Duration::from_secs(5),
            send_cancel_within("127.0.0.1", port, (1, 2), Duration::from_millis(200)),
        )
        .await
        .expect("send_cancel gives up by itself");
        assert!(
            matches!(sent, Err(BackendError::ConnectTimeout(_))),
            "{sent:?}"
        );
    }
}
