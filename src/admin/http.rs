//! The HTTP endpoint on `metrics` (DESIGN 3): `/metrics` (Prometheus text format),
//! `/healthz` (the process answers), `/readyz` (a map is loaded and every shard has a
//! writable primary per its latest freshness snapshot). HTTP/1.1 with hyper; bounded
//! connections and header read time, so a scraper cannot tie it up.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;

use crate::frontend::Frontend;

/// Concurrent HTTP connections; more wait in the accept backlog.
const MAX_CONNECTIONS: usize = 64;
/// A request's headers must arrive within this.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Binds `addr` and serves until `stop`. Returns the bound address (port 0 picks one).
pub async fn spawn(
    addr: SocketAddr,
    fe: Arc<Frontend>,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tracing::info!(addr = %local, "metrics endpoint listening");
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let task = tokio::spawn(async move {
        loop {
            let Ok(permit) = slots.clone().acquire_owned().await else {
                return;
            };
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = stop.wait_for(|s| *s) => return,
            };
            let socket = match accepted {
                Ok((socket, _)) => socket,
                Err(error) => {
                    tracing::warn!(%error, "metrics endpoint accept failed");
                    continue;
                }
            };
            let fe = fe.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let fe = fe.clone();
                    async move { Ok::<_, Infallible>(answer(&fe, &req)) }
                });
                let served = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .serve_connection(TokioIo::new(socket), service)
                    .await;
                if let Err(error) = served {
                    tracing::debug!(%error, "metrics connection ended with an error");
                }
                drop(permit);
            });
        }
    });
    Ok((local, task))
}

fn answer(fe: &Frontend, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".into(),
        );
    }
    match req.uri().path() {
        "/metrics" => reply(StatusCode::OK, PROMETHEUS_TEXT, fe.metrics.render(fe)),
        "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" => match not_ready(fe) {
            None => reply(StatusCode::OK, "text/plain", "ready\n".into()),
            Some(why) => reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", why),
        },
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found; try /metrics, /healthz or /readyz\n".into(),
        ),
    }
}

/// Why the proxy should not get traffic yet, one line per shard without a writable
/// primary; None when ready.
pub fn not_ready(fe: &Frontend) -> Option<String> {
    let topology = fe.topology.load();
    let missing: String = topology
        .shards
        .iter()
        .filter_map(|s| {
            let fresh = s.fresh.load();
            // Generation 0 is the monitor's assumption before its first probe.
            if fresh.generation == 0 {
                Some(format!("shard {}: not probed yet\n", s.name))
            } else if !super::show::writable(&fresh) {
                Some(format!("shard {}: no writable primary\n", s.name))
            } else {
                None
            }
        })
        .collect();
    (!missing.is_empty()).then_some(missing)
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    response
}
