//! A client connection from accept to the query loop: SSL/GSS negotiation, the startup
//! packet (or a CancelRequest), SCRAM-SHA-256 authentication, then ParameterStatus,
//! BackendKeyData and ReadyForQuery. The first message must come within
//! `startup_wait`, the whole login within `login_timeout`; only then does the
//! connection trade its login slot for a client slot (listener.rs).

use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tracing::Instrument;

use super::listener::{Admission, OverLimit};
use super::session::{Session, SessionInit};
use super::stream::ClientStream;
use super::Frontend;
use crate::backend::params::{quote_literal, SessionParams};
use crate::protocol::messages::{self, btag};
use crate::protocol::{decode_frame, decode_startup, scram, Frame, StartupPacket};

/// How long the FATAL error that ends a login may take to reach the client.
pub(super) const REFUSE_WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
enum LoginError {
    #[error("client I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("{1}")]
    Refused(&'static str, String),
    #[error("login timed out")]
    Timeout,
    /// Nothing, or no whole first message, within `startup_wait`.
    #[error("no startup message in time")]
    Silent,
}

struct Login {
    user: String,
    database: String,
    params: SessionParams,
}

/// Serves one accepted connection to the end. It logs in on `admission`'s login slot
/// and needs a client slot once authenticated; with none free it gets 53300.
pub async fn serve(
    socket: TcpStream,
    fe: Arc<Frontend>,
    admission: Admission,
    shutdown: watch::Receiver<bool>,
) {
    let peer = socket
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    socket.set_nodelay(true).ok();
    let span = tracing::info_span!("client", client.addr = %peer, user = tracing::field::Empty, db = tracing::field::Empty);
    async move {
        let mut stream = ClientStream::Plain(socket);
        let mut buf = BytesMut::with_capacity(1024);
        let login =
            tokio::time::timeout(fe.settings.login_timeout, login(&mut stream, &mut buf, &fe))
                .await
                .unwrap_or(Err(LoginError::Timeout));
        let (user, database, params) = match login {
            Ok(Some(l)) => (l.user, l.database, l.params),
            Ok(None) => return,
            Err(error) => {
                refuse(&mut stream, &error).await;
                return;
            }
        };
        let Some(permit) = admission.admit() else {
            let full = LoginError::Refused("53300", OverLimit::Clients.message().into());
            refuse(&mut stream, &full).await;
            return;
        };
        tracing::Span::current()
            .record("user", user.as_str())
            .record("db", database.as_str());
        // Admin console (src/admin): the virtual database, served here.
        let client = crate::admin::clients::ClientInfo {
            addr: peer,
            user: user.clone(),
            database: database.clone(),
            tls: matches!(stream, ClientStream::Tls(_)),
            pid: 0,
            server: None,
            connected_at: std::time::SystemTime::now(),
        };
        if database == crate::admin::CONSOLE_DATABASE {
            let _registered = fe.clients.register(client);
            crate::admin::console::run(&mut stream, buf, fe.clone(), shutdown).await;
            return;
        }
        run_session(stream, buf, fe, user, params, shutdown, client).await;
        drop(permit);
    }
    .instrument(span)
    .await
}

/// A FATAL ErrorResponse, or None for errors that end a login without a word.
fn error_message(error: &LoginError) -> Option<BytesMut> {
    let (code, message) = match error {
        LoginError::Refused(code, message) => (*code, message.as_str()),
        LoginError::Timeout => ("08006", "login timed out"),
        // A socket that says nothing is closed without a word: it may not speak the
        // protocol at all.
        LoginError::Silent | LoginError::Io(_) => return None,
    };
    let mut out = BytesMut::new();
    messages::error_fields(&mut out, btag::ERROR_RESPONSE, "FATAL", code, message);
    Some(out)
}

async fn refuse(stream: &mut ClientStream, error: &LoginError) {
    match error {
        // Many silent sockets are what a flood looks like: not worth an info line each.
        LoginError::Silent => tracing::debug!(%error, "connection closed"),
        _ => tracing::info!(%error, "login refused"),
    }
    let Some(out) = error_message(error) else {
        return;
    };
    // Flushed, then closed with a TLS close_notify, so the client reads the whole
    // message and can tell it from a truncated stream. Bounded: a client that does not
    // read must not keep the task alive past its login timeout.
    let send = async {
        stream.write_all(&out).await?;
        stream.flush().await?;
        stream.shutdown().await
    };
    let _ = tokio::time::timeout(REFUSE_WRITE_TIMEOUT, send).await;
}

async fn login(
    stream: &mut ClientStream,
    buf: &mut BytesMut,
    fe: &Frontend,
) -> Result<Option<Login>, LoginError> {
    let first = tokio::time::timeout(fe.settings.startup_wait, read_startup(stream, buf));
    let mut packet = first.await.map_err(|_| LoginError::Silent)??;
    let params = loop {
        match packet {
            StartupPacket::SslRequest => {
                refuse_pipelined(buf, "SSL")?;
                negotiate_tls(stream, fe).await?
            }
            StartupPacket::GssEncRequest => {
                refuse_pipelined(buf, "GSSAPI encryption")?;
                stream.write_all(b"N").await?
            }
            StartupPacket::Cancel { pid, secret } => {
                forward_cancel(fe, pid, secret).await;
                return Ok(None);
            }
            StartupPacket::Startup { params } => break params,
        }
        packet = read_startup(stream, buf).await?;
    };
    let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let user =
        get("user").ok_or_else(|| LoginError::Refused("28000", "no user name given".into()))?;
    let database = get("database").unwrap_or_else(|| user.clone());
    if get("replication").is_some_and(|r| r != "false" && r != "0") {
        return Err(LoginError::Refused(
            "08P01",
            "replication connections are not supported".into(),
        ));
    }
    // Admin console (src/admin): only the admin's credentials; an app user who
    // proves its password is told it may not, anyone else that the password failed.
    if database == crate::admin::CONSOLE_DATABASE {
        let secret = fe
            .admin
            .secret_for(&user)
            .or_else(|| fe.users.get(&user).map(|u| &u.scram));
        authenticate(stream, buf, fe, &user, secret).await?;
        if fe.admin.secret_for(&user).is_none() {
            return Err(LoginError::Refused(
                "28000",
                format!("user \"{user}\" may not use the admin console"),
            ));
        }
        return Ok(Some(Login {
            user,
            database,
            params: SessionParams::default(),
        }));
    }
    let secret = fe.users.get(&user).map(|u| &u.scram);
    authenticate(stream, buf, fe, &user, secret).await?;
    if database != fe.settings.database {
        return Err(LoginError::Refused(
            "3D000",
            format!("database \"{database}\" does not exist"),
        ));
    }
    let session_params = startup_session_params(&params);
    Ok(Some(Login {
        user,
        database,
        params: session_params,
    }))
}

async fn read_startup(
    stream: &mut ClientStream,
    buf: &mut BytesMut,
) -> Result<StartupPacket, LoginError> {
    loop {
        match decode_startup(buf) {
            Ok(Some(packet)) => return Ok(packet),
            Ok(None) => {}
            Err(e) => return Err(LoginError::Refused("08P01", e.to_string())),
        }
        if stream.read_buf(buf).await? == 0 {
            return Err(LoginError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
    }
}

/// Bytes that came after an SSLRequest or GSSENCRequest and before our answer were
/// sent in plaintext, possibly by a man in the middle (CVE-2021-23214): after a TLS
/// upgrade they would be read as if they had come through the encrypted channel. No
/// legitimate client sends them (it waits for 'S' or 'N'), so the connection is refused
/// before answering, as PostgreSQL does.
fn refuse_pipelined(buf: &BytesMut, request: &str) -> Result<(), LoginError> {
    if buf.is_empty() {
        return Ok(());
    }
    Err(LoginError::Refused(
        "08P01",
        format!("received unencrypted data after {request} request"),
    ))
}

async fn negotiate_tls(stream: &mut ClientStream, fe: &Frontend) -> Result<(), LoginError> {
    let Some(acceptor) = fe.tls.as_ref().map(|tls| &tls.acceptor) else {
        stream.write_all(b"N").await?;
        return Ok(());
    };
    let ClientStream::Plain(mut tcp) = std::mem::replace(stream, ClientStream::Closed) else {
        return Err(LoginError::Refused(
            "08P01",
            "SSLRequest after TLS was established".into(),
        ));
    };
    tcp.write_all(b"S").await?;
    let tls = acceptor.accept(tcp).await?;
    *stream = ClientStream::Tls(Box::new(tls));
    Ok(())
}

async fn forward_cancel(fe: &Frontend, pid: u32, secret: u32) {
    match fe.cancels.lookup(pid, secret) {
        Some(target) => {
            let (host, port, timeout) =
                (&target.host, target.port, fe.settings.pool.connect_timeout);
            let sent = crate::backend::conn::send_cancel_within(host, port, target.key, timeout);
            if let Err(error) = sent.await {
                tracing::warn!(%error, "forwarding cancel failed");
            }
        }
        None => tracing::debug!(pid, "cancel for no running query or with a wrong key"),
    }
}

/// Authentication messages are small (`limits.max_auth_message_size`); anything
/// bigger is an attack or a bug.
async fn read_auth_frame(
    stream: &mut ClientStream,
    buf: &mut BytesMut,
    max_len: usize,
) -> Result<Frame, LoginError> {
    loop {
        match decode_frame(buf, max_len) {
            Ok(Some(frame)) if frame.tag == b'p' => return Ok(frame),
            Ok(Some(_)) => {
                return Err(LoginError::Refused(
                    "08P01",
                    "expected a password message".into(),
                ))
            }
            Ok(None) => {}
            Err(e) => return Err(LoginError::Refused("08P01", e.to_string())),
        }
        if stream.read_buf(buf).await? == 0 {
            return Err(LoginError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
    }
}

/// SCRAM-SHA-256 against `secret`; over TLS SCRAM-SHA-256-PLUS is offered too, bound to
/// the server certificate (tls-server-end-point). Unknown users (None) run the same
/// exchange against a decoy secret of their own name (`ScramSecret::decoy_for`): same
/// messages, a salt as stable and as distinct as a real user's, the same failure.
async fn authenticate(
    stream: &mut ClientStream,
    buf: &mut BytesMut,
    fe: &Frontend,
    user: &str,
    secret: Option<&scram::ScramSecret>,
) -> Result<(), LoginError> {
    let failed = || {
        LoginError::Refused(
            "28P01",
            format!("password authentication failed for user \"{user}\""),
        )
    };
    let known = secret.is_some();
    // Derived for every login, so known and unknown users cost the same work.
    let decoy = fe.decoy.decoy_for(user);
    let secret = secret.unwrap_or(&decoy);
    let end_point = match stream {
        ClientStream::Tls(_) => fe.tls.as_ref().and_then(|t| t.server_end_point.as_deref()),
        _ => None,
    };
    let mut out = BytesMut::new();
    messages::auth_request(&mut out, 10, scram::mechanisms(end_point.is_some()));
    stream.write_all(&out).await?;

    let frame = read_auth_frame(stream, buf, fe.settings.max_auth_message).await?;
    let mut body = frame.body();
    let malformed = || LoginError::Refused("08P01", "malformed SASLInitialResponse".into());
    let mechanism = crate::protocol::frame::take_cstr(&mut body).map_err(|_| malformed())?;
    let declared = crate::protocol::frame::take_i32(&mut body).map_err(|_| malformed())?;
    // -1 (no initial response) included: every SCRAM client sends client-first here.
    if usize::try_from(declared).ok() != Some(body.len()) {
        return Err(malformed());
    }
    // A malformed or forged message is a protocol violation whoever the user is; only
    // a proof that does not match is a wrong password.
    let refused = |error: scram::ScramError| match error {
        scram::ScramError::BadProof => failed(),
        scram::ScramError::Unsupported(_) => LoginError::Refused("0A000", error.to_string()),
        scram::ScramError::Malformed(_) => LoginError::Refused("08P01", error.to_string()),
    };
    let negotiation = scram::Negotiation {
        mechanism,
        end_point,
    };
    let (exchange, server_first) =
        scram::server_first_with(secret, negotiation, body).map_err(refused)?;
    out.clear();
    messages::auth_request(&mut out, 11, server_first.as_bytes());
    stream.write_all(&out).await?;

    let frame = read_auth_frame(stream, buf, fe.settings.max_auth_message).await?;
    let server_final = exchange
        .server_final(secret, frame.body())
        .map_err(refused)?;
    if !known {
        return Err(failed());
    }
    out.clear();
    messages::auth_request(&mut out, 12, server_final.as_bytes());
    messages::auth_request(&mut out, 0, b"");
    stream.write_all(&out).await?;
    Ok(())
}

/// Startup parameters become session settings replayed on each server connection,
/// except those that pick the connection itself.
fn startup_session_params(params: &[(String, String)]) -> SessionParams {
    let mut session = SessionParams::default();
    for (name, value) in params {
        match name.as_str() {
            "user" | "database" | "replication" => {}
            "options" => {
                for (k, v) in parse_options(value) {
                    session.set(&k, &quote_literal(&v));
                }
            }
            _ => {
                let lower = name.to_ascii_lowercase();
                if lower
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
                {
                    session.set(&lower, &quote_literal(value));
                }
            }
        }
    }
    session
}

/// `-c name=value` and `--name=value` pairs of the `options` startup parameter.
fn parse_options(options: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut words = options.split_whitespace();
    while let Some(word) = words.next() {
        let pair = if word == "-c" {
            words.next()
        } else {
            word.strip_prefix("-c").or_else(|| word.strip_prefix("--"))
        };
        if let Some((k, v)) = pair.and_then(|p| p.split_once('=')) {
            let k = k.replace('-', "_").to_ascii_lowercase();
            if k.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
            {
                out.push((k, v.to_owned()));
            }
        }
    }
    out
}

/// Greets the authenticated client and runs its query loop.
async fn run_session(
    stream: ClientStream,
    buf: BytesMut,
    fe: Arc<Frontend>,
    user: String,
    params: SessionParams,
    shutdown: watch::Receiver<bool>,
    client: crate::admin::clients::ClientInfo,
) {
    let mut stream = stream;
    let topology = fe.topology.load_full();
    let pools = fe.pools_for(&user, &topology);
    let server_params = match pools[topology.default_shard][0].server_params().await {
        Ok(p) => p,
        Err(error) => {
            let error = LoginError::Refused(
                "08006",
                format!("cannot reach the database server: {error}"),
            );
            refuse(&mut stream, &error).await;
            return;
        }
    };
    let cancel = fe.cancels.register();
    let _registered = fe.clients.register(crate::admin::clients::ClientInfo {
        pid: cancel.pid,
        server: Some(cancel.slot.clone()),
        ..client
    });
    let mut out = BytesMut::new();
    for (name, value) in server_params.iter() {
        let ours = params.get(&name.to_ascii_lowercase()).map(unquote);
        messages::parameter_status(&mut out, name, ours.as_deref().unwrap_or(value));
    }
    messages::backend_key_data(&mut out, cancel.pid, cancel.secret);
    messages::ready_for_query(&mut out, b'I');
    if stream.write_all(&out).await.is_err() {
        return;
    }
    let init = SessionInit {
        fe: fe.clone(),
        user,
        topology,
        pools,
        params,
        cancel: cancel.slot.clone(),
        shutdown,
    };
    match stream {
        ClientStream::Plain(tcp) => {
            let (rd, wr) = tcp.into_split();
            Session::new(init, rd, wr, buf).run().await
        }
        ClientStream::Tls(tls) => {
            let (rd, wr) = tokio::io::split(*tls);
            Session::new(init, rd, wr, buf).run().await
        }
        ClientStream::Closed => {}
    }
}

/// Inverse of `quote_literal` for values we quoted ourselves.
fn unquote(value: &str) -> String {
    value
        .strip_prefix('\'')
        .and_then(|v| v.strip_suffix('\''))
        .map(|v| v.replace("''", "'"))
        .unwrap_or_else(|| value.to_owned())
}
