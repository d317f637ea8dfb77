//! Both listeners (API and gateway) from the socket up: accept under a connection cap, the TLS
//! handshake in the connection's own task, HTTP/1 by hyper with a header-read timeout (which
//! also ends keep-alive connections left idle), a request-body inactivity timeout
//! (tower-http), and a graceful drain on shutdown.
//!
//! Each listener has its own cap, so a flood of connections to the gateway can never take the
//! API's share; past the cap a new connection is answered 503 at once (plain HTTP; over TLS it
//! is closed) and counted in `dispatch_connections_refused_total` (README "Limits").

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tower_http::timeout::RequestBodyTimeout;

/// A TLS handshake that takes longer than this is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// At most one warning per listener this often while connections are refused.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// What a listener holds for its callers at most.
#[derive(Debug, Clone)]
pub struct EdgeLimits {
    /// Open gateway connections (none: derived from the open-files limit at start).
    pub gateway_connections: Option<usize>,
    /// Open API connections, kept apart from the gateway's (none: derived likewise).
    pub api_connections: Option<usize>,
    /// A request's headers must arrive within this; a keep-alive connection that sends
    /// nothing for this long after its last answer is closed too.
    pub header_timeout: Duration,
    /// A request body that sends nothing for this long is cut (408 at the gateway).
    pub body_timeout: Duration,
}

impl Default for EdgeLimits {
    fn default() -> Self {
        EdgeLimits {
            gateway_connections: None,
            api_connections: None,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(10),
        }
    }
}

impl EdgeLimits {
    /// The caps, the unset ones from `open_files` (the soft `RLIMIT_NOFILE`): the gateway
    /// may hold 40 % of it (at most 16384), the API 10 % (at most 1024), which leaves half
    /// for workers, the database and blobs.
    pub fn caps(&self, open_files: u64) -> (usize, usize) {
        let share = |pct: u64, max: usize| ((open_files * pct / 100) as usize).clamp(16, max);
        (
            self.gateway_connections
                .unwrap_or_else(|| share(40, 16_384)),
            self.api_connections.unwrap_or_else(|| share(10, 1024)),
        )
    }
}

/// Which listener (the metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Edge {
    Api,
    Gateway,
}

impl Edge {
    pub fn as_str(self) -> &'static str {
        match self {
            Edge::Api => "api",
            Edge::Gateway => "gateway",
        }
    }
}

/// Connection counts of one listener (rendered by `metrics`).
#[derive(Default)]
pub struct EdgeCounters {
    pub open: AtomicU64,
    pub accepted: AtomicU64,
    pub refused: AtomicU64,
    /// The "refusing connections" warnings.
    last_warn: LogThrottle,
    /// The cap in force (0 until the listener starts).
    pub cap: AtomicU64,
}

/// Raises the soft open-files limit to the hard one (more room for connections and
/// workers); returns (soft, hard) as they are afterwards.
pub fn raise_open_files_limit() -> (u64, u64) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return (1024, 1024);
    };
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        return (hard, hard);
    }
    (soft, hard)
}

/// The server's own OOM score: below the workers' (`dispatch_runtime::worker::expendable`),
/// so that the kernel picks user code first when memory runs out. Lowering needs
/// CAP_SYS_RESOURCE (root); returns whether it took.
pub fn protect_from_oom_killer() -> bool {
    std::fs::write("/proc/self/oom_score_adj", "-500").is_ok()
}

/// What a refused plain-HTTP connection reads before it is closed (our error shape).
static REFUSED: std::sync::LazyLock<Vec<u8>> = std::sync::LazyLock::new(|| {
    let body = serde_json::json!({"error": {
        "code": "Unavailable",
        "message": "the server holds as many connections as it may: retry later",
    }})
    .to_string();
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n\
         connection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
});

/// One listener: serves `router` until `shutdown` turns true, then lets open connections
/// finish (the caller bounds how long).
#[allow(clippy::too_many_arguments)]
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    router: axum::Router,
    edge: Edge,
    cap: usize,
    limits: EdgeLimits,
    counters: Arc<EdgeCounters>,
    mut shutdown: watch::Receiver<bool>,
) -> io::Result<()> {
    let slots = Arc::new(Semaphore::new(cap));
    counters.cap.store(cap as u64, Ordering::Relaxed);
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let service = RequestBodyTimeout::new(router, limits.body_timeout);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.wait_for(|stop| *stop) => break,
        };
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                warn_limited(&counters, || {
                    tracing::warn!(listener = edge.as_str(), "accept failed: {e}")
                });
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            refuse(stream, acceptor.is_some(), edge, cap, &counters);
            continue;
        };
        counters.accepted.fetch_add(1, Ordering::Relaxed);
        counters.open.fetch_add(1, Ordering::Relaxed);
        let _ = stream.set_nodelay(true);
        let held = Arc::new(Held {
            _slot: slot,
            counters: counters.clone(),
        });
        let conn = Connection {
            service: service.clone(),
            header_timeout: limits.header_timeout,
            slot: ConnectionSlot {
                _held: held,
                shutdown: shutdown.clone(),
            },
        };
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            match acceptor {
                None => conn.serve(stream).await,
                Some(acceptor) => {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => conn.serve(tls).await,
                        Ok(Err(e)) => tracing::debug!("TLS handshake failed: {e}"),
                        Err(_) => tracing::debug!("TLS handshake timed out"),
                    }
                }
            }
        });
    }
    drop(listener);
    // Every connection gives its slot back when it ends (an upgraded one when its
    // WebSocket closes, which it does on shutdown): the drain waits for all of them.
    let _ = slots.acquire_many(cap.try_into().unwrap_or(u32::MAX)).await;
    Ok(())
}

/// One open connection's place under its listener's cap: given back (and counted closed)
/// when the last holder drops it — the connection's task, or the WebSocket it became.
struct Held {
    _slot: tokio::sync::OwnedSemaphorePermit,
    counters: Arc<EdgeCounters>,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.counters.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Handed to an upgrade request (a request extension): whoever takes the connection over
/// holds its slot, and closes it when the server shuts down.
#[derive(Clone)]
pub struct ConnectionSlot {
    _held: Arc<Held>,
    pub shutdown: watch::Receiver<bool>,
}

struct Connection {
    service: RequestBodyTimeout<axum::Router>,
    header_timeout: Duration,
    slot: ConnectionSlot,
}

impl Connection {
    async fn serve<I>(self, io: I)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(self.header_timeout);
        let inner = TowerToHyperService::new(self.service);
        let slot = self.slot.clone();
        // Only an upgrade request (a WebSocket: a GET) gets the slot; other requests pay a
        // method comparison.
        let svc = hyper::service::service_fn(move |mut req: hyper::Request<_>| {
            if req.method() == hyper::Method::GET
                && req.headers().contains_key(hyper::header::UPGRADE)
            {
                req.extensions_mut().insert(slot.clone());
            }
            hyper::service::Service::call(&inner, req)
        });
        let mut shutdown = self.slot.shutdown.clone();
        let conn = http.serve_connection(TokioIo::new(io), svc).with_upgrades();
        tokio::pin!(conn);
        let stop = async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
        };
        let ended = tokio::select! {
            ended = conn.as_mut() => ended,
            () = stop => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        };
        if let Err(e) = ended {
            tracing::debug!("connection ended: {e}");
        }
    }
}

/// Whether a body read failed because the body stopped arriving (the tower-http timeout).
pub fn body_timed_out(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(e) = cur {
        if e.is::<tower_http::timeout::TimeoutError>() {
            return true;
        }
        cur = e.source();
    }
    false
}

/// 408: the body stopped arriving.
pub fn body_timeout_error() -> crate::ApiError {
    crate::ApiError::new(
        axum::http::StatusCode::REQUEST_TIMEOUT,
        "RequestTimeout",
        "the request body stopped arriving: send it without pauses",
    )
}

/// Refused connections lingering at once (each at most [`LINGER`]), so that the caller reads
/// the 503 rather than a reset; past this many a refused connection is closed at once.
const MAX_LINGERING: usize = 256;
const LINGER: Duration = Duration::from_millis(500);
static LINGERING: std::sync::LazyLock<Arc<tokio::sync::Semaphore>> =
    std::sync::LazyLock::new(|| Arc::new(tokio::sync::Semaphore::new(MAX_LINGERING)));

fn refuse(stream: TcpStream, tls: bool, edge: Edge, cap: usize, counters: &EdgeCounters) {
    counters.refused.fetch_add(1, Ordering::Relaxed);
    if !tls {
        match LINGERING.clone().try_acquire_owned() {
            // Answer after the caller's request has arrived: a client that reads only once it
            // has written (hyper) takes an earlier answer for a protocol error; and closing
            // with the request unread would reset the connection, which can discard the 503
            // before it is read. So: read what comes, answer, end our side, drop the rest —
            // for at most LINGER each, a bounded number at once.
            Ok(permit) => {
                tokio::spawn(async move {
                    let mut stream = stream;
                    let mut sink = [0u8; 1024];
                    let answer = async {
                        let _ = tokio::time::timeout(LINGER, stream.read(&mut sink)).await;
                        stream.write_all(&REFUSED).await?;
                        stream.shutdown().await?;
                        while stream.read(&mut sink).await? > 0 {}
                        io::Result::Ok(())
                    };
                    let _ = tokio::time::timeout(LINGER * 2, answer).await;
                    drop(permit);
                });
            }
            // Too many lingering: a fresh socket's send buffer is empty, so one non-blocking
            // write, never a wait, then closed.
            Err(_) => {
                let _ = stream.try_write(&REFUSED);
            }
        }
    }
    warn_limited(counters, || {
        tracing::warn!(
            listener = edge.as_str(),
            cap,
            refused = counters.refused.load(Ordering::Relaxed),
            "refusing connections: the listener holds its most open connections (raise --max-{}-connections, or find who holds them)",
            edge.as_str()
        )
    });
}

fn warn_limited(counters: &EdgeCounters, warn: impl FnOnce()) {
    counters.last_warn.run(warn);
}

/// A log line at most once per `WARN_EVERY`, whoever asks (refused connections, a disk
/// below its reserve): a flood of refusals must not become a flood of log lines.
#[derive(Default)]
pub struct LogThrottle {
    /// Seconds since the Unix epoch of the last line.
    last: AtomicU64,
}

impl LogThrottle {
    pub fn run(&self, log: impl FnOnce()) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let last = self.last.load(Ordering::Relaxed);
        if now >= last + WARN_EVERY.as_secs()
            && self
                .last
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            log();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_come_from_the_open_files_limit_unless_set() {
        let l = EdgeLimits::default();
        assert_eq!(l.caps(20_000), (8_000, 1_024));
        assert_eq!(l.caps(4_096), (1_638, 409));
        assert_eq!(l.caps(1_048_576), (16_384, 1_024));
        assert_eq!(l.caps(64), (25, 16));
        let set = EdgeLimits {
            gateway_connections: Some(5),
            api_connections: Some(7),
            ..Default::default()
        };
        assert_eq!(set.caps(20_000), (5, 7));
    }

    #[test]
    fn the_refusal_is_a_complete_http_answer() {
        let text = std::str::from_utf8(&REFUSED).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 503 "));
        assert!(head.contains(&format!("content-length: {}", body.len())));
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"]["code"], "Unavailable");
    }
}
