//! Outbound: a local connection (accepted on a listener, or handed over by Python as a file
//! descriptor) is carried to where its plan says — through an HBONE tunnel, or as plain TCP.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio_util::sync::CancellationToken;

use crate::copy::{self, Abort, Cut, H2Reader, H2Writer, StreamReader, StreamWriter, Transferred};
use crate::core::Shared;
use crate::decision::{DecisionError, OutboundDecider, Plan};
use crate::ending;
use crate::hbone::client::HboneError;
use crate::hbone::CONNECT_TIMEOUT;
use crate::limits::Admission;
use crate::metrics::{ConnectionCount, Counters, Flag};
use crate::plan::{HboneTarget, TcpTarget};
use crate::pool::PoolKey;
use crate::report::{Reporter, Subject};
use crate::scope::ListenerScope;
use crate::socket::{self, tune_stream, SocketFactory};
use crate::socks5::{self, Reply};
use crate::stats::{ActiveGuard, Stats};

/// A local stream the core can split into independently owned halves.
pub trait LocalStream: Send + 'static {
    type Read: AsyncRead + Unpin + Send + 'static;
    type Write: AsyncWrite + Abort + Unpin + Send + 'static;
    fn halves(self) -> (Self::Read, Self::Write);
}

impl LocalStream for TcpStream {
    type Read = tokio::net::tcp::OwnedReadHalf;
    type Write = tokio::net::tcp::OwnedWriteHalf;
    fn halves(self) -> (Self::Read, Self::Write) {
        self.into_split()
    }
}

impl LocalStream for UnixStream {
    type Read = tokio::net::unix::OwnedReadHalf;
    type Write = tokio::net::unix::OwnedWriteHalf;
    fn halves(self) -> (Self::Read, Self::Write) {
        self.into_split()
    }
}

/// Why an outbound connection was not carried.
#[derive(Debug)]
pub enum OutboundError {
    Denied(String),
    Hbone(HboneError),
    Connect(SocketAddr, io::Error),
}

impl std::fmt::Display for OutboundError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OutboundError::Denied(reason) => write!(f, "denied: {reason}"),
            OutboundError::Hbone(e) => write!(f, "{e}"),
            OutboundError::Connect(addr, e) => write!(f, "TCP connect to {addr} failed: {e}"),
        }
    }
}

impl OutboundError {
    /// How the connection ended, for its metrics.
    fn flag(&self) -> Flag {
        match self {
            OutboundError::Denied(_) => Flag::Deny,
            OutboundError::Hbone(e) => e.flag(),
            OutboundError::Connect(..) => Flag::Connect,
        }
    }
}

/// A connection whose far side is established and ready to carry bytes.
enum Established {
    Hbone {
        streams: (h2::SendStream<bytes::Bytes>, h2::RecvStream),
        _lease: crate::pool::Lease,
    },
    Tcp(TcpStream),
}

async fn establish_hbone(
    target: &HboneTarget,
    source: Option<SocketAddr>,
    sockets: &SocketFactory,
    shared: &Arc<Shared>,
) -> Result<Established, OutboundError> {
    let key = PoolKey {
        source_identity: target.source_identity.clone(),
        identities: target.identities.clone(),
        address: target.address,
        source_ip: target.source_ip,
        sockets: sockets.clone(),
    };
    let lease = shared
        .pool
        .lease(&key, shared)
        .await
        .map_err(OutboundError::Hbone)?;
    match lease
        .conn
        .connect(
            &target.authority,
            &target.headers,
            source,
            target.forwarded_host.as_deref(),
        )
        .await
    {
        Ok(streams) => {
            Stats::inc(&shared.stats.hbone_streams_opened);
            Ok(Established::Hbone {
                streams,
                _lease: lease,
            })
        }
        Err(e) => {
            Stats::inc(&shared.stats.hbone_streams_failed);
            Err(OutboundError::Hbone(e))
        }
    }
}

async fn establish_tcp(
    target: &TcpTarget,
    client_ports: Option<&[u16]>,
    sockets: &SocketFactory,
    shared: &Shared,
) -> Result<Established, OutboundError> {
    match tokio::time::timeout(
        CONNECT_TIMEOUT,
        sockets.connect(target.address, target.source_ip, client_ports),
    )
    .await
    {
        Ok(Ok(tcp)) => Ok(Established::Tcp(tcp)),
        Ok(Err(e)) => {
            Stats::inc(&shared.stats.upstream_connect_failures);
            Err(OutboundError::Connect(target.address, e))
        }
        Err(_) => {
            Stats::inc(&shared.stats.upstream_connect_failures);
            Err(OutboundError::Connect(
                target.address,
                io::Error::new(io::ErrorKind::TimedOut, "timed out"),
            ))
        }
    }
}

/// Carry out `plan` up to the point where bytes can flow, with sockets made by `sockets`.
/// `client_ports`: when a plain TCP plan connects from the client's own IP (in-pod, to the
/// app), the source ports of that IP's connections on this listener, which it must not take.
async fn establish(
    plan: &Plan,
    source: Option<SocketAddr>,
    client_ports: Option<&[u16]>,
    sockets: &SocketFactory,
    shared: &Arc<Shared>,
) -> Result<Established, OutboundError> {
    match plan {
        Plan::Hbone(target) => establish_hbone(target.get(), source, sockets, shared).await,
        Plan::Tcp(target) => establish_tcp(target.get(), client_ports, sockets, shared).await,
        Plan::Deny(deny) => {
            Stats::inc(&shared.stats.decisions_denied);
            Err(OutboundError::Denied(deny.get().reason.clone()))
        }
    }
}

/// Copy between the local stream and the established far side until both directions end.
/// `cut` says when the proxy cut the connection: both sides are then aborted, not closed.
async fn carry<S: LocalStream>(
    local: S,
    far: Established,
    shared: &Shared,
    transferred: &Transferred,
    labelled: Option<&Counters>,
    cut: Cut,
) -> io::Result<()> {
    let _active = ActiveGuard::new(&shared.stats.active_tunnels);
    let (local_read, local_write) = local.halves();
    let local_side = (
        StreamReader::new(local_read),
        StreamWriter::new(local_write, cut.clone()),
    );
    match far {
        Established::Hbone {
            streams: (send, recv),
            _lease,
        } => {
            copy::bidirectional(
                local_side,
                (H2Reader(recv), H2Writer(send, cut)),
                &shared.stats,
                transferred,
                labelled,
            )
            .await
        }
        Established::Tcp(tcp) => {
            let (r, w) = tcp.into_split();
            copy::bidirectional(
                local_side,
                (StreamReader::new(r), StreamWriter::new(w, cut)),
                &shared.stats,
                transferred,
                labelled,
            )
            .await
        }
    }
}

/// How a listener learns where an accepted connection was going.
#[derive(Clone, Copy, Debug)]
pub enum ListenMode {
    /// What the client dialed: the listener itself (loopback mode, fixed forwards).
    Direct,
    /// `SO_ORIGINAL_DST`: the destination before in-pod redirection (15001, 15006).
    OriginalDestination,
    /// The client says, in a SOCKS5 request (15080).
    Socks5,
}

impl ListenMode {
    pub fn parse(name: &str) -> Result<Self, String> {
        match name {
            "direct" => Ok(ListenMode::Direct),
            "original_dst" => Ok(ListenMode::OriginalDestination),
            "socks5" => Ok(ListenMode::Socks5),
            other => Err(format!(
                "mode: expected 'direct', 'original_dst' or 'socks5', got {other:?}"
            )),
        }
    }
}

/// The SOCKS5 answer for a connection that could not be established.
fn socks5_reply_for(error: &OutboundError) -> Reply {
    match error {
        OutboundError::Denied(_) => Reply::NotAllowed,
        OutboundError::Hbone(HboneError::Status(_, status)) if status.as_u16() == 401 => {
            Reply::NotAllowed
        }
        OutboundError::Hbone(HboneError::Status(..)) => Reply::HostUnreachable,
        OutboundError::Connect(_, e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            Reply::ConnectionRefused
        }
        OutboundError::Connect(..) => Reply::HostUnreachable,
        _ => Reply::GeneralFailure,
    }
}

/// Where an accepted connection is going, as the listener's mode tells.
async fn destination_of(
    tcp: &mut TcpStream,
    mode: ListenMode,
    local: SocketAddr,
) -> Result<String, String> {
    match mode {
        ListenMode::Direct => Ok(local.to_string()),
        // Without a redirect (nothing captured this connection) the kernel has no original
        // destination; the connection was then addressed to us.
        ListenMode::OriginalDestination => Ok(socket::original_destination(tcp)
            .unwrap_or(local)
            .to_string()),
        ListenMode::Socks5 => socks5::accept(tcp)
            .await
            .map(|destination| destination.to_string())
            .map_err(|e| format!("SOCKS5 client refused: {e}")),
    }
}

/// One accepted outbound connection: decide, establish, carry, report.
async fn proxy_accepted(
    mut tcp: TcpStream,
    source: SocketAddr,
    ctx: Arc<OutboundContext>,
    admission: Admission,
) {
    // Holds this connection's place under the listener's caps until it ends.
    let _admission = admission;
    let started = Instant::now();
    let shared = &ctx.shared;
    let stats = &shared.stats;
    let _ = tune_stream(&tcp);
    let local = match tcp.local_addr() {
        Ok(local) => local,
        Err(_) => return, // the client is already gone
    };
    let socks = matches!(ctx.mode, ListenMode::Socks5);
    let destination = match destination_of(&mut tcp, ctx.mode, local).await {
        Ok(destination) => destination,
        Err(why) => {
            Stats::inc(&stats.socks5_refused);
            log::info!("{why} ({source})");
            ctx.reporter.early(source, &local.to_string(), started, why);
            return;
        }
    };
    let plan = match ctx
        .decider
        .decide(&shared.decisions, source, destination.clone())
        .await
    {
        Ok(plan) => plan,
        Err(why) => {
            match why {
                DecisionError::Failed(_) => {
                    Stats::inc(&stats.decision_errors);
                    log::error!("outbound {source} -> {destination}: {why}");
                }
                DecisionError::Overloaded(_) | DecisionError::Stopped => {
                    Stats::inc(&stats.decisions_rejected);
                    log::warn!("outbound {source} -> {destination} {why}");
                }
            }
            let mut error = why.to_string();
            if socks {
                if let Err(e) = socks5::reply(&mut tcp, Reply::GeneralFailure).await {
                    error.push_str(&format!("; the SOCKS5 reply failed: {e}"));
                }
            }
            ctx.reporter.early(source, &destination, started, error);
            return;
        }
    };
    let transferred = Transferred::default();
    let error = {
        let carry = establish_and_carry(tcp, source, &destination, &plan, &ctx, &transferred);
        tokio::select! {
            biased;
            error = carry => error,
            reason = ctx.scope.cut() => {
                Stats::inc(&stats.connections_cut);
                Some(reason)
            }
        }
    };
    ctx.reporter.report(
        Subject::Plan(plan),
        source,
        &destination,
        &transferred,
        started,
        error,
    );
}

/// Establish the far side as `plan` says, answer a SOCKS5 client, and copy until both
/// directions end; returns why the connection failed or was refused, if it did.
async fn establish_and_carry(
    mut tcp: TcpStream,
    source: SocketAddr,
    destination: &str,
    plan: &Plan,
    ctx: &OutboundContext,
    transferred: &Transferred,
) -> Option<String> {
    let shared = &ctx.shared;
    let socks = matches!(ctx.mode, ListenMode::Socks5);
    let labelled = plan.counters();
    let count = ConnectionCount::open(labelled);
    // Connecting to the app from the client's own IP: not from any port its connections hold.
    let client_ports = match plan {
        Plan::Tcp(t) if t.get().source_ip == Some(source.ip()) => {
            Some(ctx.scope.limiter.ports_of(source.ip()))
        }
        _ => None,
    };
    let far = match establish(
        plan,
        Some(source),
        client_ports.as_deref(),
        &ctx.sockets,
        shared,
    )
    .await
    {
        Ok(far) => far,
        Err(_) if ctx.scope.cut_now().is_some() => {
            // The cut took the pooled connection this one was being established on.
            return ending::carried(
                Ok(Err(io::Error::other("cut"))),
                ctx.scope.cut_now(),
                count,
                &shared.stats,
            );
        }
        Err(e) => {
            count.finish(e.flag());
            log::info!("outbound {source} -> {destination} refused: {e}");
            let mut error = e.to_string();
            if socks {
                if let Err(reply) = socks5::reply(&mut tcp, socks5_reply_for(&e)).await {
                    Stats::inc(&shared.stats.socks5_refused);
                    error.push_str(&format!("; the SOCKS5 reply failed: {reply}"));
                }
            }
            return Some(error);
        }
    };
    if socks {
        if let Err(e) = socks5::reply(&mut tcp, Reply::Succeeded).await {
            Stats::inc(&shared.stats.socks5_refused);
            return Some(format!("the SOCKS5 client went away before its reply: {e}"));
        }
    }
    let closing = CancellationToken::new();
    let cut = Cut::by([ctx.scope.hard.clone(), closing.clone()]);
    let carrying = carry(tcp, far, shared, transferred, labelled, cut);
    let result = shared
        .connections
        .run(
            Subject::Plan(plan.clone()),
            source,
            destination.to_string(),
            closing,
            carrying,
        )
        .await;
    ending::carried(result, ctx.scope.cut_now(), count, &shared.stats)
}

/// Everything one outbound listener needs for its connections.
pub struct OutboundContext {
    pub shared: Arc<Shared>,
    pub decider: OutboundDecider,
    pub mode: ListenMode,
    pub reporter: Reporter,
    pub scope: ListenerScope,
    /// Where the far side's sockets are made (in-pod mode: the source pod's namespace).
    pub sockets: SocketFactory,
}

pub async fn accept_loop(listener: TcpListener, ctx: Arc<OutboundContext>) {
    let scope = ctx.scope.clone();
    scope
        .accept_loop(
            listener,
            &ctx.shared.stats,
            &ctx.reporter,
            "outbound",
            |tcp, source, admission| proxy_accepted(tcp, source, ctx.clone(), admission),
        )
        .await;
}

/// Carry a stream handed over by Python: establish first and report the outcome through
/// `on_ready` (None, or the error text), then copy.
pub async fn tunnel_stream<S: LocalStream>(
    local: S,
    source: Option<SocketAddr>,
    plan: Plan,
    shared: Arc<Shared>,
    on_ready: impl FnOnce(Option<String>) + Send + 'static,
) {
    let count = ConnectionCount::open(plan.counters());
    let far = match establish(&plan, source, None, &shared.sockets, &shared).await {
        Ok(far) => far,
        Err(e) => {
            count.finish(e.flag());
            on_ready(Some(e.to_string()));
            return;
        }
    };
    on_ready(None);
    let transferred = Transferred::default();
    let closing = CancellationToken::new();
    let hard = shared.hard_stop.clone();
    let cut = Cut::by([hard.clone(), closing.clone()]);
    let carrying = carry(local, far, &shared, &transferred, plan.counters(), cut);
    // Registered like any connection, so it is listed, can be closed and is counted when cut.
    let source = source.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
    let destination = plan_destination(&plan);
    let registered = shared.connections.run(
        Subject::Plan(plan.clone()),
        source,
        destination,
        closing,
        carrying,
    );
    let result = tokio::select! {
        biased;
        result = registered => result,
        _ = hard.cancelled() => Ok(Err(io::Error::other("cut"))),
    };
    let cut_reason = hard
        .is_cancelled()
        .then(|| "cut: the drain deadline passed while the data plane was closing".to_string());
    if let Some(error) = ending::carried(result, cut_reason, count, &shared.stats) {
        log::debug!("tunnel ended: {error}");
    }
}

/// Where a plan sends a connection, as the registry lists it.
fn plan_destination(plan: &Plan) -> String {
    match plan {
        Plan::Hbone(t) => t.get().authority.clone(),
        Plan::Tcp(t) => t.get().address.to_string(),
        Plan::Deny(_) => String::new(),
    }
}
