//! HBONE client: dial `peer:15008` with mutual TLS as a source workload, speak HTTP/2, and open
//! CONNECT streams on that connection.

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::client::SendRequest;
use h2::{RecvStream, SendStream};
use http::{HeaderName, HeaderValue, Method, Request, StatusCode};
use rustls_pki_types::ServerName;
use tokio_rustls::TlsConnector;

use super::batch::{Batched, Passes};
use super::{
    keepalive, CONNECTION_WINDOW, CONNECT_TIMEOUT, HANDSHAKE_TIMEOUT, MAX_FRAME_SIZE, STREAM_WINDOW,
};
use crate::core::Shared;
use crate::metrics::Flag;
use crate::pool::PoolKey;
use crate::stats::Stats;
use crate::tls;

/// Largest header block we accept from a server (a CONNECT response is tiny).
const MAX_HEADER_LIST_SIZE: u32 = 16 * 1024;
/// h2 may buffer this much outgoing data per stream: one stream window, so a window's worth can be
/// queued and flushed at once.
const MAX_SEND_BUFFER_SIZE: usize = STREAM_WINDOW as usize;
/// Upper bound for the answer to a CONNECT: the server answers once its upstream connect is done
/// (its own `CONNECT_TIMEOUT`) after a decision, so a peer silent for longer is not answering.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(20);

/// Why an HBONE connection or stream could not be had. The text names the peer.
#[derive(Debug)]
pub enum HboneError {
    NoIdentity(String),
    Connect(SocketAddr, std::io::Error),
    Tls(String),
    /// The HTTP/2 preface and SETTINGS exchange after TLS failed.
    Handshake(SocketAddr, h2::Error),
    Http2(SocketAddr, h2::Error),
    /// The peer answered the CONNECT with this status.
    Status(SocketAddr, StatusCode),
    Timeout(SocketAddr, &'static str),
}

impl fmt::Display for HboneError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HboneError::NoIdentity(id) => {
                write!(f, "no certificate loaded for source identity {id}")
            }
            HboneError::Connect(peer, e) => write!(f, "TCP connect to {peer} failed: {e}"),
            HboneError::Tls(text) => f.write_str(text),
            HboneError::Handshake(peer, e) | HboneError::Http2(peer, e) => match tls_alert(e) {
                // With TLS 1.3 the client finishes its handshake before the server has checked
                // the client certificate: a refusal arrives as an alert on the first read.
                Some(alert) => write!(
                    f,
                    "TLS handshake with {peer} failed: the server refused our certificate ({alert})"
                ),
                None => write!(f, "HTTP/2 with {peer} failed: {e}"),
            },
            HboneError::Status(peer, status) => {
                write!(f, "{peer} answered the CONNECT with {status}")
            }
            HboneError::Timeout(peer, what) => write!(f, "{what} with {peer} timed out"),
        }
    }
}

impl std::error::Error for HboneError {}

impl HboneError {
    /// The response flag of a connection that failed this way, as Istio's ztunnel labels it.
    pub fn flag(&self) -> Flag {
        match self {
            HboneError::Tls(_) | HboneError::Timeout(_, "TLS handshake") => Flag::TlsFailure,
            HboneError::Handshake(_, e) if tls_alert(e).is_some() => Flag::TlsFailure,
            HboneError::Handshake(..) | HboneError::Timeout(_, "HTTP/2 handshake") => {
                Flag::H2HandshakeFailure
            }
            _ => Flag::Connect,
        }
    }
}

/// The TLS alert text inside an HTTP/2 error, if the connection died of one. h2 keeps only the
/// kind and text of an I/O error when it reports it to streams, so the text is all there is.
fn tls_alert(e: &h2::Error) -> Option<String> {
    let io = e.get_io()?;
    let text = io.to_string();
    (io.kind() == std::io::ErrorKind::InvalidData && text.contains("alert")).then_some(text)
}

/// One mutual-TLS HTTP/2 connection to a peer, shared by many streams.
pub struct HboneConnection {
    sender: SendRequest<Bytes>,
    peer: SocketAddr,
    max_streams: usize,
    /// Streams currently open on this connection (leases not yet returned).
    pub active: AtomicUsize,
    /// Set when the connection task ended (peer closed, PING timeout, error).
    closed: Arc<AtomicBool>,
    /// When the last stream ended (for the pool's idle timeout).
    idle_since: Mutex<Instant>,
    /// Whether the peer ever answered a request here: until it has, a connection-level HTTP/2
    /// failure means the HTTP/2 handshake failed (h2's client handshake does not wait for the
    /// server's preface, so a peer that sends garbage instead is only found out here).
    answered: AtomicBool,
}

impl HboneConnection {
    /// Whether one more stream may be opened here: not closed, no GOAWAY received, and below
    /// min(our limit, the peer's MAX_CONCURRENT_STREAMS).
    pub fn has_room(&self) -> bool {
        if self.closed.load(Ordering::Acquire) {
            return false;
        }
        let limit = self.max_streams.min(self.sender.current_max_send_streams());
        if self.active.load(Ordering::Acquire) >= limit {
            return false;
        }
        !self.refuses_new_streams()
    }

    /// True once the peer sent GOAWAY (or the connection failed): h2 then refuses new streams,
    /// which `poll_ready` reports as an error.
    pub fn refuses_new_streams(&self) -> bool {
        let mut sender = self.sender.clone();
        let waker = futures_util::task::noop_waker_ref();
        matches!(
            sender.poll_ready(&mut Context::from_waker(waker)),
            Poll::Ready(Err(_))
        )
    }

    /// A stream on this connection ended.
    pub fn release_stream(&self) {
        if self.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            *self.idle_since.lock().unwrap() = Instant::now();
        }
    }

    pub fn idle_since(&self) -> Instant {
        *self.idle_since.lock().unwrap()
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Open a CONNECT stream to `authority`; Ok only when the peer answered `200`.
    pub async fn connect(
        &self,
        authority: &str,
        headers: &[(HeaderName, HeaderValue)],
        forwarded_for: Option<SocketAddr>,
        forwarded_host: Option<&str>,
    ) -> Result<(SendStream<Bytes>, RecvStream), HboneError> {
        let peer = self.peer;
        let mut request = Request::builder()
            .method(Method::CONNECT)
            .uri(authority)
            .body(())
            .map_err(|e| HboneError::Tls(format!("bad CONNECT authority {authority:?}: {e}")))?;
        let map = request.headers_mut();
        for (name, value) in headers {
            map.append(name.clone(), value.clone());
        }
        if let Some(client) = forwarded_for {
            if !map.contains_key("forwarded") {
                // As Istio's ztunnel: `for` always, `host` when the client dialed a Service.
                let value = match forwarded_host {
                    Some(host) => format!("for=\"{client}\";host={host}"),
                    None => format!("for=\"{client}\""),
                };
                if let Ok(v) = HeaderValue::try_from(value) {
                    map.insert("forwarded", v);
                }
            }
        }
        if !map.contains_key("traceparent") {
            map.insert("traceparent", new_traceparent());
        }
        let mut sender = self
            .sender
            .clone()
            .ready()
            .await
            .map_err(|e| HboneError::Http2(peer, e))?;
        let (response, send) = sender
            .send_request(request, false)
            .map_err(|e| HboneError::Http2(peer, e))?;
        let response = tokio::time::timeout(RESPONSE_TIMEOUT, response)
            .await
            .map_err(|_| HboneError::Timeout(peer, "the CONNECT response"))?
            .map_err(|e| {
                if self.answered.load(Ordering::Acquire) || e.is_reset() {
                    HboneError::Http2(peer, e)
                } else {
                    HboneError::Handshake(peer, e)
                }
            })?;
        self.answered.store(true, Ordering::Release);
        if response.status() != StatusCode::OK {
            return Err(HboneError::Status(peer, response.status()));
        }
        Ok((send, response.into_body()))
    }
}

/// A W3C `traceparent` with a random trace and span id, as Istio's ztunnel sends per connection
/// (and the waypoint per request): `00-<32 hex>-<16 hex>-00`.
pub(crate) fn new_traceparent() -> HeaderValue {
    let mut text = *b"00-________________________________-________________-00";
    lower_hex(&rand::random::<[u8; 16]>(), &mut text[3..35]);
    lower_hex(&rand::random::<[u8; 8]>(), &mut text[36..52]);
    HeaderValue::from_bytes(&text).expect("hex is a valid header")
}

/// `bytes` as lower-case hex into `out` (two characters a byte). Random ids are made per request
/// at the waypoint, where `format!`'s integer formatting cost more than the rest of the id.
pub(crate) fn lower_hex(bytes: &[u8], out: &mut [u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (pair, b) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = DIGITS[usize::from(b >> 4)];
        pair[1] = DIGITS[usize::from(b & 0x0f)];
    }
}

/// Dial a new HBONE connection for `key`.
pub async fn dial(key: &PoolKey, shared: &Arc<Shared>) -> Result<HboneConnection, HboneError> {
    let peer = key.address;
    let material = shared
        .identities
        .get(&key.source_identity)
        .ok_or_else(|| HboneError::NoIdentity(key.source_identity.to_string()))?;
    let config = material
        .client_config(&key.identities)
        .map_err(HboneError::Tls)?;
    let tcp = tokio::time::timeout(
        CONNECT_TIMEOUT,
        key.sockets.connect(peer, key.source_ip, None),
    )
    .await
    .map_err(|_| HboneError::Timeout(peer, "TCP connect"))?
    .map_err(|e| HboneError::Connect(peer, e))?;
    // No SNI is sent (the config disables it); the name only satisfies the API.
    let name = ServerName::IpAddress(peer.ip().into());
    let tls_stream = match tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        TlsConnector::from(config).connect(name, tcp),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            Stats::inc(&shared.stats.tls_handshake_failures);
            return Err(HboneError::Tls(tls::describe_handshake_error(
                &peer.to_string(),
                &e,
            )));
        }
        Err(_) => {
            Stats::inc(&shared.stats.tls_handshake_failures);
            return Err(HboneError::Timeout(peer, "TLS handshake"));
        }
    };
    Stats::inc(&shared.stats.tls_handshakes);
    let passes = Passes::default();
    let tls_stream = Batched::new(tls_stream, passes.clone());
    let handshake = h2::client::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        .initial_max_send_streams(shared.pool.max_streams())
        .max_header_list_size(MAX_HEADER_LIST_SIZE)
        .max_send_buffer_size(MAX_SEND_BUFFER_SIZE)
        .enable_push(false)
        .handshake::<_, Bytes>(tls_stream);
    let (sender, mut connection) = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
        .await
        .map_err(|_| HboneError::Timeout(peer, "HTTP/2 handshake"))?
        .map_err(|e| HboneError::Handshake(peer, e))?;
    Stats::inc(&shared.stats.hbone_connections_dialed);

    let closed = Arc::new(AtomicBool::new(false));
    let ping = connection
        .ping_pong()
        .expect("ping_pong is taken once, here");
    let task_closed = closed.clone();
    let hard = shared.hard_stop.clone();
    tokio::spawn(passes.drive(async move {
        tokio::select! {
            result = &mut connection => {
                if let Err(e) = result {
                    log::debug!("HBONE connection to {peer} ended: {e}");
                }
            }
            reason = keepalive(ping) => log::warn!("HBONE connection to {peer} dropped: {reason}"),
            _ = hard.cancelled() => {}
        }
        task_closed.store(true, Ordering::Release);
    }));

    Ok(HboneConnection {
        sender,
        peer,
        max_streams: shared.pool.max_streams(),
        active: AtomicUsize::new(0),
        closed,
        idle_since: Mutex::new(Instant::now()),
        answered: AtomicBool::new(false),
    })
}
