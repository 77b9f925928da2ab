//! HBONE server: accept mutual TLS as a workload, then serve each CONNECT stream:
//! `400` for anything but a CONNECT to `ip:port`, the decision (`401`/any `Deny` status), `503`
//! when the upstream cannot be reached, and `200` only once the upstream TCP connect succeeded.
//!
//! Against hostile peers: every phase before a stream is authorized is bounded in time (TLS
//! handshake, HTTP/2 preface) and size (rustls' handshake limit, the header list limit); a
//! connection that carries no stream is closed after a while; a stream the client resets before
//! its answer stops its decision and upstream connect at once; a connection that resets streams
//! faster than any real client (the HTTP/2 "rapid reset" attack) is closed with
//! `ENHANCE_YOUR_CALM` and its source refused for a while.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::poll_fn;
use h2::server::SendResponse;
use h2::{Ping, PingPong, Reason, RecvStream};
use http::{Method, Request, Response, StatusCode};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::batch::{Batched, Passes};
use super::{
    CONNECTION_WINDOW, CONNECT_TIMEOUT, HANDSHAKE_TIMEOUT, MAX_FRAME_SIZE, PING_INTERVAL,
    PING_TIMEOUT, STREAM_WINDOW,
};
use crate::copy::{self, Cut, H2Reader, H2Writer, StreamReader, StreamWriter, Transferred};
use crate::core::Shared;
use crate::decision::{DecisionError, InboundDecider, InboundRequest, Verdict};
use crate::ending;
use crate::limits::Admission;
use crate::metrics::{ConnectionCount, Flag};
use crate::report::{Reporter, Subject};
use crate::scope::ListenerScope;
use crate::socket::{tune_stream, SocketFactory};
use crate::stats::{ActiveGuard, Stats};
use crate::tls;

/// Bounded header blocks: a CONNECT carries a handful of small headers.
const MAX_HEADER_LIST_SIZE: u32 = 64 * 1024;
/// Outgoing buffer per stream on the server side (hyper's default, as Istio's ztunnel).
const MAX_SEND_BUFFER_SIZE: usize = 400 * 1024;
/// Concurrent streams a client may open on one connection (Istio's ztunnel allows 200).
const MAX_CONCURRENT_STREAMS: u32 = 200;
/// A client dials an HBONE connection to open a stream on it at once (Istio's pool and ours
/// do): one that has opened none by the first keepalive tick is not a client, and is closed.
const FIRST_STREAM_TIMEOUT: Duration = PING_INTERVAL;
/// Streams a client may reset before their answer within one keepalive interval. A real client
/// resets a stream when its application gives up on a connect; hundreds in ten seconds on one
/// connection is the rapid-reset attack (CVE-2023-44487), each reset costing us a decision.
const EARLY_RESET_BUDGET: u32 = 100;
/// How long a source whose connection blew the reset budget is refused new connections.
const RESET_FLOOD_PENALTY: Duration = Duration::from_secs(10);

/// ztunnel's inbound side carries each stream to a local app as its decider says; a waypoint
/// reads it as HTTP and routes every request.
pub enum Role {
    Ztunnel(InboundDecider),
    Waypoint(Arc<crate::waypoint::Waypoint>),
}

/// Everything one HBONE listener needs for its connections.
pub struct InboundContext {
    pub shared: Arc<Shared>,
    /// The workload this listener speaks as (its certificate is looked up per connection, so a
    /// rotated certificate is used from the next connection on).
    pub identity: String,
    /// What the listener does with an accepted stream.
    pub role: Role,
    pub reporter: Reporter,
    pub scope: ListenerScope,
    /// Sockets to the app are made as the listener's were (in the pod's namespace, in-pod mode).
    pub sockets: SocketFactory,
    /// A connection with no open stream for this long is closed (GOAWAY).
    pub idle_timeout: Duration,
}

pub async fn accept_loop(listener: TcpListener, ctx: Arc<InboundContext>) {
    let scope = ctx.scope.clone();
    scope
        .accept_loop(
            listener,
            &ctx.shared.stats,
            &ctx.reporter,
            "HBONE",
            |tcp, peer, admission| {
                let passes = Passes::default();
                passes
                    .clone()
                    .drive(serve_connection(tcp, peer, ctx.clone(), admission, passes))
            },
        )
        .await;
}

/// What a connection's streams tell the connection.
#[derive(Default)]
struct Activity {
    /// Streams open now.
    streams: AtomicUsize,
    /// Whether any stream was ever opened.
    used: AtomicBool,
    /// Streams the client reset before their answer in the current keepalive interval.
    early_resets: AtomicU32,
    /// Woken when `early_resets` passes the budget.
    reset_flood: Notify,
}

/// An open stream, counted in its connection's [`Activity`] until dropped.
struct OpenStream(Arc<Activity>);

impl OpenStream {
    fn new(activity: &Arc<Activity>) -> Self {
        activity.streams.fetch_add(1, Ordering::AcqRel);
        activity.used.store(true, Ordering::Release);
        Self(activity.clone())
    }

    /// The client reset this stream before its answer; true when that was one too many.
    fn reset_early(&self) -> bool {
        let n = self.0.early_resets.fetch_add(1, Ordering::AcqRel) + 1;
        if n == EARLY_RESET_BUDGET + 1 {
            self.0.reset_flood.notify_one();
        }
        n > EARLY_RESET_BUDGET
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Why the server ends a connection on its own.
enum Close {
    /// The peer stopped answering PINGs.
    Dead(String),
    /// No stream for too long (or none ever).
    Idle(String),
}

/// Every `PING_INTERVAL`: close an unused or long-idle connection, open a new reset window,
/// and ping the peer (dropped if it does not answer within `PING_TIMEOUT`).
async fn keepalive(mut ping_pong: PingPong, activity: &Activity, idle_timeout: Duration) -> Close {
    let started = Instant::now();
    let mut idle = Duration::ZERO;
    loop {
        tokio::time::sleep(PING_INTERVAL).await;
        activity.early_resets.store(0, Ordering::Release);
        if activity.streams.load(Ordering::Acquire) == 0 {
            idle += PING_INTERVAL;
            if !activity.used.load(Ordering::Acquire) && started.elapsed() >= FIRST_STREAM_TIMEOUT {
                return Close::Idle(format!(
                    "no stream opened within {FIRST_STREAM_TIMEOUT:?} of the handshake"
                ));
            }
            if idle >= idle_timeout {
                return Close::Idle(format!("no stream for {idle:?}"));
            }
        } else {
            idle = Duration::ZERO;
        }
        match tokio::time::timeout(PING_TIMEOUT, ping_pong.ping(Ping::opaque())).await {
            Ok(Ok(_pong)) => continue,
            Ok(Err(e)) => return Close::Dead(format!("keepalive PING failed: {e}")),
            Err(_) => return Close::Dead(format!("no PING answer within {PING_TIMEOUT:?}")),
        }
    }
}

async fn tls_handshake(
    tcp: TcpStream,
    peer: SocketAddr,
    ctx: &InboundContext,
) -> Result<TlsStream<TcpStream>, String> {
    let Some(material) = ctx.shared.identities.get(&ctx.identity) else {
        return Err(format!(
            "refused: no certificate loaded for {}",
            ctx.identity
        ));
    };
    let acceptor = TlsAcceptor::from(material.server_config.clone());
    let accept = acceptor.accept(tcp).into_fallible();
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, accept).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err((e, tcp))) => {
            let why = tls::describe_handshake_error(&peer.to_string(), &e);
            lingering_close(tcp).await;
            Err(why)
        }
        Err(_) => Err(format!(
            "TLS handshake with {peer} timed out after {HANDSHAKE_TIMEOUT:?}"
        )),
    }
}

type ServerConnection = h2::server::Connection<Batched<TlsStream<TcpStream>>, Bytes>;

async fn h2_handshake(
    tls: Batched<TlsStream<TcpStream>>,
    peer: SocketAddr,
) -> Result<ServerConnection, String> {
    let handshake = h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        .max_header_list_size(MAX_HEADER_LIST_SIZE)
        .max_send_buffer_size(MAX_SEND_BUFFER_SIZE)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .handshake::<_, Bytes>(tls);
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(format!("HTTP/2 handshake with {peer} failed: {e}")),
        Err(_) => Err(format!(
            "HTTP/2 handshake with {peer} timed out after {HANDSHAKE_TIMEOUT:?} (no preface)"
        )),
    }
}

/// One accepted connection. The handshakes run boxed, so their state (tens of KiB) is freed once
/// they are done: an idle connection keeps only what its HTTP/2 connection needs.
async fn serve_connection(
    tcp: TcpStream,
    peer: SocketAddr,
    ctx: Arc<InboundContext>,
    admission: Admission,
    passes: Passes,
) {
    // Holds this connection's place under the listener's caps until it ends.
    let _admission = admission;
    let started = Instant::now();
    let stats = &ctx.shared.stats;
    let _ = tune_stream(&tcp);
    let local = tcp.local_addr().map(|a| a.to_string()).unwrap_or_default();
    let tls_stream = match Box::pin(tls_handshake(tcp, peer, &ctx)).await {
        Ok(s) => s,
        Err(why) => {
            Stats::inc(&stats.tls_handshake_failures);
            log::warn!("{why}");
            ctx.reporter.early(peer, &local, started, why);
            return;
        }
    };
    Stats::inc(&stats.tls_handshakes);
    let peer_identity: Option<Arc<str>> = {
        let conn = tls_stream.get_ref().1;
        let domain = ctx
            .shared
            .identities
            .get(&ctx.identity)
            .map(|m| m.trust_domain.clone());
        conn.peer_certificates()
            .and_then(|certs| certs.first())
            .zip(domain)
            .and_then(|(leaf, domain)| tls::spiffe_identity_in(leaf, &domain))
            .map(Arc::from)
    };
    let tls_stream = Batched::new(tls_stream, passes);
    let mut conn = match Box::pin(h2_handshake(tls_stream, peer)).await {
        Ok(c) => c,
        Err(why) => {
            Stats::inc(&stats.h2_handshake_failures);
            log::warn!("{why}");
            ctx.reporter.early(peer, &local, started, why);
            return;
        }
    };
    let ping = conn.ping_pong().expect("ping_pong is taken once, here");
    let activity = Arc::new(Activity::default());
    let keepalive = keepalive(ping, &activity, ctx.idle_timeout);
    tokio::pin!(keepalive);
    let mut draining = false;
    loop {
        tokio::select! {
            next = conn.accept() => match next {
                Some(Ok((request, respond))) => {
                    let stream = OpenStream::new(&activity);
                    let identity = peer_identity.clone();
                    match &ctx.role {
                        Role::Ztunnel(_) => ctx.scope.spawn(serve_stream(
                            request, respond, peer, identity, ctx.clone(), stream,
                        )),
                        Role::Waypoint(waypoint) => {
                            let serve = crate::waypoint::serve_stream(
                                request, respond, peer, identity, ctx.clone(), waypoint.clone(),
                            );
                            ctx.scope.spawn(async move {
                                serve.await;
                                drop(stream);
                            });
                        }
                    }
                }
                Some(Err(e))
                    if e.is_go_away()
                        && !e.is_remote()
                        && e.reason() == Some(Reason::ENHANCE_YOUR_CALM) =>
                {
                    // h2's own guard (too many streams reset before they were even accepted,
                    // the classic rapid-reset burst) ended the connection: treat the source as
                    // our budget does.
                    reset_flood(&ctx, peer, local.as_str(), started);
                    return;
                }
                Some(Err(e)) => {
                    log::debug!("HBONE connection from {peer} ended: {e}");
                    return;
                }
                None => return,
            },
            _ = ctx.scope.draining.cancelled(), if !draining => {
                // GOAWAY: the client stops opening streams here; live ones run to completion.
                draining = true;
                conn.graceful_shutdown();
            }
            _ = activity.reset_flood.notified() => {
                reset_flood(&ctx, peer, local.as_str(), started);
                conn.abrupt_shutdown(Reason::ENHANCE_YOUR_CALM);
                // Let h2 flush the GOAWAY; the connection then ends.
                let _ = tokio::time::timeout(Duration::from_secs(1), poll_fn(|cx| conn.poll_closed(cx))).await;
                return;
            }
            close = &mut keepalive => {
                match close {
                    Close::Dead(reason) => {
                        log::info!("HBONE connection from {peer} dropped: {reason}");
                        return;
                    }
                    Close::Idle(reason) => {
                        Stats::inc(&stats.hbone_connections_idle_closed);
                        log::debug!("HBONE connection from {peer} closed: {reason}");
                        conn.graceful_shutdown();
                        let _ = tokio::time::timeout(
                            HANDSHAKE_TIMEOUT,
                            poll_fn(|cx| conn.poll_closed(cx)),
                        )
                        .await;
                        return;
                    }
                }
            }
        }
    }
}

/// A connection that reset streams faster than any real client: counted, reported, and its
/// source refused for a while.
fn reset_flood(ctx: &InboundContext, peer: SocketAddr, local: &str, started: Instant) {
    Stats::inc(&ctx.shared.stats.hbone_connections_reset_flood);
    ctx.scope.limiter.penalize(peer.ip(), RESET_FLOOD_PENALTY);
    let why = format!(
        "closed with ENHANCE_YOUR_CALM: more than {EARLY_RESET_BUDGET} streams reset before their \
         answer within {PING_INTERVAL:?} (rapid reset); {} refused for {RESET_FLOOD_PENALTY:?}",
        peer.ip()
    );
    log::warn!("HBONE connection from {peer} {why}");
    ctx.reporter.early(peer, local, started, why);
}

/// After refusing a handshake, make sure the alert reaches the client: with TLS 1.3 the client
/// already sent its first requests, and closing with those unread would make the kernel answer
/// with a RST that can destroy the alert before the client reads it. So: FIN, then read and
/// discard until the client closes too, for a bounded time and amount.
async fn lingering_close(mut tcp: TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const LINGER: Duration = Duration::from_secs(2);
    const MAX_DISCARD: usize = 1024 * 1024;
    let _ = tcp.shutdown().await;
    let drain = async {
        // On the heap, and only for the refused: the connection future stays small.
        let mut buf = vec![0u8; 4096];
        let mut discarded = 0;
        while discarded < MAX_DISCARD {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => discarded += n,
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, drain).await;
}

pub(crate) fn respond_status(mut respond: SendResponse<Bytes>, status: StatusCode) {
    let response = Response::builder()
        .status(status)
        .body(())
        .expect("static response");
    let _ = respond.send_response(response, true);
}

/// Why a CONNECT request is malformed, or the upstream address it names.
pub(crate) fn parse_connect(request: &Request<RecvStream>) -> Result<(String, SocketAddr), String> {
    if request.method() != Method::CONNECT {
        return Err(format!("expected CONNECT, got {}", request.method()));
    }
    let authority = request
        .uri()
        .authority()
        .map(|a| a.as_str().to_string())
        .ok_or("CONNECT without :authority")?;
    let address = authority
        .parse::<SocketAddr>()
        .map_err(|_| format!("authority {authority:?} is not ip:port"))?;
    Ok((authority, address))
}

/// Resolves when the client resets the stream (before its answer, that is what it watches).
async fn client_reset(respond: &mut SendResponse<Bytes>) -> Reason {
    poll_fn(|cx| respond.poll_reset(cx))
        .await
        .unwrap_or(Reason::CANCEL)
}

async fn serve_stream(
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    peer: SocketAddr,
    peer_identity: Option<Arc<str>>,
    ctx: Arc<InboundContext>,
    stream: OpenStream,
) {
    let started = Instant::now();
    let stats = &ctx.shared.stats;
    Stats::inc(&stats.hbone_requests_received);
    let authority = match parse_connect(&request) {
        Ok((authority, _)) => authority,
        Err(why) => {
            Stats::inc(&stats.hbone_requests_refused);
            log::info!("HBONE request from {peer} refused with 400: {why}");
            respond_status(respond, StatusCode::BAD_REQUEST);
            let target = request.uri().to_string();
            ctx.reporter
                .early(peer, &target, started, format!("refused with 400: {why}"));
            return;
        }
    };
    let asked = InboundRequest {
        peer_identity,
        authority: authority.clone(),
        peer_address: peer,
        headers: request.headers().clone(),
    };
    let decision = tokio::select! {
        biased;
        reason = client_reset(&mut respond) => {
            early_reset(&ctx, &stream, peer, &authority, reason);
            return;
        }
        decision = decider(&ctx).decide(&ctx.shared.decisions, asked) => decision,
    };
    let verdict = match decision {
        Ok(verdict) => verdict,
        Err(why) => {
            Stats::inc(&stats.hbone_requests_refused);
            let status = match why {
                DecisionError::Failed(_) => {
                    Stats::inc(&stats.decision_errors);
                    log::error!("HBONE request from {peer} to {authority}: {why}");
                    StatusCode::INTERNAL_SERVER_ERROR
                }
                DecisionError::Overloaded(_) | DecisionError::Stopped => {
                    Stats::inc(&stats.decisions_rejected);
                    log::warn!("HBONE request from {peer} to {authority} {why}");
                    StatusCode::SERVICE_UNAVAILABLE
                }
            };
            respond_status(respond, status);
            ctx.reporter
                .early(peer, &authority, started, why.to_string());
            return;
        }
    };
    let transferred = Transferred::default();
    let error = {
        let carry = carry_stream(
            request,
            respond,
            peer,
            &authority,
            &verdict,
            &ctx,
            &transferred,
            &stream,
        );
        tokio::select! {
            biased;
            error = carry => error,
            reason = ctx.scope.cut() => {
                Stats::inc(&stats.connections_cut);
                Some(reason)
            }
        }
    };
    drop(stream);
    ctx.reporter.report(
        Subject::Verdict(verdict),
        peer,
        &authority,
        &transferred,
        started,
        error,
    );
}

fn decider(ctx: &InboundContext) -> &InboundDecider {
    match &ctx.role {
        Role::Ztunnel(decider) => decider,
        Role::Waypoint(_) => unreachable!("a waypoint's streams are served by the waypoint module"),
    }
}

fn early_reset(
    ctx: &InboundContext,
    stream: &OpenStream,
    peer: SocketAddr,
    authority: &str,
    reason: Reason,
) {
    Stats::inc(&ctx.shared.stats.hbone_requests_reset_by_client);
    if !stream.reset_early() {
        log::debug!("HBONE request from {peer} to {authority} reset by the client ({reason:?}) before its answer");
    }
}

/// Carry out the verdict on one stream: answer it, and copy until both directions end.
/// Returns why the stream failed or was refused, if it did.
// The stream's parts and context, passed down one to one: a struct would only move the list.
#[allow(clippy::too_many_arguments)]
async fn carry_stream(
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    peer: SocketAddr,
    authority: &str,
    verdict: &Verdict,
    ctx: &InboundContext,
    transferred: &Transferred,
    stream: &OpenStream,
) -> Option<String> {
    let stats = &ctx.shared.stats;
    let count = ConnectionCount::open(verdict.counters());
    let allow = match verdict {
        Verdict::Allow(allow) => allow.get(),
        Verdict::Deny(deny) => {
            let deny = deny.get();
            count.finish(Flag::Deny);
            Stats::inc(&stats.hbone_requests_refused);
            Stats::inc(&stats.decisions_denied);
            log::info!(
                "HBONE request from {peer} to {authority} denied with {}: {}",
                deny.status,
                deny.reason
            );
            let status = StatusCode::from_u16(deny.status).unwrap_or(StatusCode::UNAUTHORIZED);
            respond_status(respond, status);
            return Some(format!("denied: {}", deny.reason));
        }
    };
    let connect = tokio::time::timeout(
        CONNECT_TIMEOUT,
        ctx.sockets.connect(allow.upstream, allow.source_ip, None),
    );
    let connected = tokio::select! {
        biased;
        reason = client_reset(&mut respond) => {
            early_reset(ctx, stream, peer, authority, reason);
            return Some(format!(
                "the client reset the stream ({reason:?}) while the upstream {} was being connected",
                allow.upstream
            ));
        }
        connected = connect => connected,
    };
    let upstream = match connected {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => {
            count.finish(Flag::Connect);
            return Some(upstream_failed(
                respond,
                ctx,
                peer,
                allow.upstream,
                &e.to_string(),
            ));
        }
        Err(_) => {
            count.finish(Flag::Connect);
            return Some(upstream_failed(
                respond,
                ctx,
                peer,
                allow.upstream,
                "timed out",
            ));
        }
    };
    let response = Response::builder()
        .status(StatusCode::OK)
        .body(())
        .expect("static response");
    let send = match respond.send_response(response, false) {
        Ok(send) => send,
        Err(e) => return Some(format!("stream gone before 200: {e}")),
    };
    let _active = ActiveGuard::new(&stats.active_tunnels);
    let (up_read, up_write) = upstream.into_split();
    let closing = CancellationToken::new();
    let cut = Cut::by([ctx.scope.hard.clone(), closing.clone()]);
    let copying = copy::bidirectional(
        (H2Reader(request.into_body()), H2Writer(send, cut.clone())),
        (StreamReader::new(up_read), StreamWriter::new(up_write, cut)),
        stats,
        transferred,
        verdict.counters(),
    );
    let result = ctx
        .shared
        .connections
        .run(
            Subject::Verdict(verdict.clone()),
            peer,
            authority.to_string(),
            closing,
            copying,
        )
        .await;
    if let Ok(Err(e)) = &result {
        log::debug!(
            "HBONE stream {peer} -> {} ended with error after {}/{} bytes: {e}",
            allow.upstream,
            transferred.sent(),
            transferred.received()
        );
    }
    ending::carried(result, ctx.scope.cut_now(), count, stats)
}

fn upstream_failed(
    respond: SendResponse<Bytes>,
    ctx: &InboundContext,
    peer: SocketAddr,
    upstream: SocketAddr,
    why: &str,
) -> String {
    Stats::inc(&ctx.shared.stats.upstream_connect_failures);
    Stats::inc(&ctx.shared.stats.hbone_requests_refused);
    log::warn!("HBONE request from {peer}: upstream {upstream} unreachable ({why}); answering 503");
    respond_status(respond, StatusCode::SERVICE_UNAVAILABLE);
    format!("upstream {upstream} unreachable: {why}")
}
