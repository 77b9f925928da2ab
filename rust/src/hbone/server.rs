//! HBONE server: accept mutual TLS as a workload, then serve each CONNECT stream:
//! `400` for anything but a CONNECT to `ip:port`, the decision (`401`/any `Deny` status), `503`
//! when the upstream cannot be reached, and `200` only once the upstream TCP connect succeeded.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::RecvStream;
use http::{Method, Request, Response, StatusCode};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use super::{
    keepalive, CONNECTION_WINDOW, CONNECT_TIMEOUT, HANDSHAKE_TIMEOUT, MAX_FRAME_SIZE, STREAM_WINDOW,
};
use crate::copy::{self, H2Reader, H2Writer, StreamReader, StreamWriter, Transferred};
use crate::core::{ListenerScope, Shared};
use crate::decision::{InboundDecider, InboundRequest, Verdict};
use crate::metrics::{Counters, OpenConnection};
use crate::report::{Reporter, Subject};
use crate::socket::{tune_stream, SocketFactory};
use crate::stats::{ActiveGuard, Stats};
use crate::tls;

/// Bounded header blocks: a CONNECT carries a handful of small headers.
const MAX_HEADER_LIST_SIZE: u32 = 64 * 1024;
/// Outgoing buffer per stream on the server side (hyper's default, as Istio's ztunnel).
const MAX_SEND_BUFFER_SIZE: usize = 400 * 1024;
/// Concurrent streams a client may open on one connection (Istio's ztunnel allows 200).
const MAX_CONCURRENT_STREAMS: u32 = 200;

/// Everything one HBONE listener needs for its connections.
pub struct InboundContext {
    pub shared: Arc<Shared>,
    /// The workload this listener speaks as (its certificate is looked up per connection, so a
    /// rotated certificate is used from the next connection on).
    pub identity: String,
    pub decider: InboundDecider,
    pub reporter: Reporter,
    pub scope: ListenerScope,
    /// Sockets to the app are made as the listener's were (in the pod's namespace, in-pod mode).
    pub sockets: SocketFactory,
}

pub async fn accept_loop(listener: TcpListener, ctx: Arc<InboundContext>) {
    let accepted = &ctx.shared.stats.connections_accepted;
    ctx.scope
        .accept_loop(listener, accepted, "HBONE", |tcp, peer| {
            serve_connection(tcp, peer, ctx.clone())
        })
        .await;
}

async fn serve_connection(tcp: TcpStream, peer: SocketAddr, ctx: Arc<InboundContext>) {
    let stats = &ctx.shared.stats;
    let _ = tune_stream(&tcp);
    let Some(material) = ctx.shared.identities.get(&ctx.identity) else {
        log::error!(
            "HBONE connection from {peer} refused: no certificate loaded for {}",
            ctx.identity
        );
        return;
    };
    let acceptor = TlsAcceptor::from(material.server_config.clone());
    let accept = acceptor.accept(tcp).into_fallible();
    let tls_stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, accept).await {
        Ok(Ok(s)) => s,
        Ok(Err((e, tcp))) => {
            Stats::inc(&stats.tls_handshake_failures);
            log::warn!("{}", tls::describe_handshake_error(&peer.to_string(), &e));
            lingering_close(tcp).await;
            return;
        }
        Err(_) => {
            Stats::inc(&stats.tls_handshake_failures);
            log::warn!("TLS handshake with {peer} timed out after {HANDSHAKE_TIMEOUT:?}");
            return;
        }
    };
    Stats::inc(&stats.tls_handshakes);
    let peer_identity = tls_stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .and_then(|leaf| tls::spiffe_identity_in(leaf, &material.trust_domain));

    let handshake = h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        .max_header_list_size(MAX_HEADER_LIST_SIZE)
        .max_send_buffer_size(MAX_SEND_BUFFER_SIZE)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .handshake::<_, Bytes>(tls_stream);
    let mut conn = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            log::warn!("HTTP/2 handshake with {peer} failed: {e}");
            return;
        }
        Err(_) => {
            log::warn!("HTTP/2 handshake with {peer} timed out");
            return;
        }
    };
    let ping = conn.ping_pong().expect("ping_pong is taken once, here");
    let keepalive = keepalive(ping);
    tokio::pin!(keepalive);
    let mut draining = false;
    loop {
        tokio::select! {
            next = conn.accept() => match next {
                Some(Ok((request, respond))) => {
                    let identity = peer_identity.clone();
                    ctx.scope
                        .spawn(serve_stream(request, respond, peer, identity, ctx.clone()));
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
            reason = &mut keepalive => {
                log::warn!("HBONE connection from {peer} dropped: {reason}");
                return;
            }
        }
    }
}

/// After refusing a handshake, make sure the alert reaches the client: with TLS 1.3 the client
/// already sent its first requests, and closing with those unread would make the kernel answer
/// with a RST that can destroy the alert before the client reads it. So: FIN, then read and
/// discard until the client closes too, for a bounded time.
async fn lingering_close(mut tcp: TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const LINGER: std::time::Duration = std::time::Duration::from_secs(2);
    const MAX_DISCARD: usize = 1024 * 1024;
    let _ = tcp.shutdown().await;
    let drain = async {
        let mut buf = [0u8; 16 * 1024];
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

fn respond_status(mut respond: SendResponse<Bytes>, status: StatusCode) {
    let response = Response::builder()
        .status(status)
        .body(())
        .expect("static response");
    let _ = respond.send_response(response, true);
}

/// Why a CONNECT request is malformed, or the upstream address it names.
fn parse_connect(request: &Request<RecvStream>) -> Result<(String, SocketAddr), String> {
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

async fn serve_stream(
    request: Request<RecvStream>,
    respond: SendResponse<Bytes>,
    peer: SocketAddr,
    peer_identity: Option<String>,
    ctx: Arc<InboundContext>,
) {
    let stats = &ctx.shared.stats;
    Stats::inc(&stats.hbone_requests_received);
    let authority = match parse_connect(&request) {
        Ok((authority, _)) => authority,
        Err(why) => {
            Stats::inc(&stats.hbone_requests_refused);
            log::info!("HBONE request from {peer} refused with 400: {why}");
            return respond_status(respond, StatusCode::BAD_REQUEST);
        }
    };
    let headers = request
        .headers()
        .iter()
        .map(|(n, v)| {
            (
                n.to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let decision = ctx
        .decider
        .decide(InboundRequest {
            peer_identity,
            authority: authority.clone(),
            peer_address: peer,
            headers,
        })
        .await;
    let started = Instant::now();
    let verdict = match decision {
        Ok(verdict) => verdict,
        Err(why) => {
            Stats::inc(&stats.hbone_requests_refused);
            Stats::inc(&stats.decision_errors);
            log::error!("HBONE request from {peer} to {authority}: {why}");
            return respond_status(respond, StatusCode::INTERNAL_SERVER_ERROR);
        }
    };
    let transferred = Transferred::default();
    let error = carry_stream(
        request,
        respond,
        peer,
        &authority,
        &verdict,
        &ctx,
        &transferred,
    )
    .await;
    ctx.reporter.report(
        Subject::Verdict(verdict),
        peer,
        &authority,
        &transferred,
        started,
        error,
    );
}

/// Carry out the verdict on one stream: answer it, and copy until both directions end.
/// Returns why the stream failed or was refused, if it did.
async fn carry_stream(
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    peer: SocketAddr,
    authority: &str,
    verdict: &Verdict,
    ctx: &InboundContext,
    transferred: &Transferred,
) -> Option<String> {
    let stats = &ctx.shared.stats;
    let labelled = verdict.counters();
    let allow = match verdict {
        Verdict::Allow(allow) => allow.get(),
        Verdict::Deny(deny) => {
            let deny = deny.get();
            labelled.inspect(|c| {
                Counters::inc(&c.opened);
                Counters::inc(&c.closed);
            });
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
    let upstream = match tokio::time::timeout(
        CONNECT_TIMEOUT,
        ctx.sockets.connect(allow.upstream, allow.source_ip),
    )
    .await
    {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => {
            labelled.inspect(|c| Counters::inc(&c.failed));
            return Some(upstream_failed(
                respond,
                ctx,
                peer,
                allow.upstream,
                &e.to_string(),
            ));
        }
        Err(_) => {
            labelled.inspect(|c| Counters::inc(&c.failed));
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
    let _open = OpenConnection::count(labelled);
    let (up_read, up_write) = upstream.into_split();
    let copying = copy::bidirectional(
        (H2Reader(request.into_body()), H2Writer(send)),
        (StreamReader::new(up_read), StreamWriter(up_write)),
        stats,
        transferred,
        labelled,
    );
    let result = ctx
        .shared
        .connections
        .run(
            Subject::Verdict(verdict.clone()),
            peer,
            authority.to_string(),
            copying,
        )
        .await;
    result.err().map(|e| {
        log::debug!(
            "HBONE stream {peer} -> {} ended with error after {}/{} bytes: {e}",
            allow.upstream,
            transferred.sent(),
            transferred.received()
        );
        e.to_string()
    })
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
