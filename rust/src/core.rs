//! `Core`: the Python object that owns a tokio runtime and everything running on it — identities,
//! the HBONE pool, listeners, tunnels and counters — with start (listen/serve), drain and stop.

use std::net::SocketAddr;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pyo3::exceptions::{PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::accesslog::AccessLog;
use crate::decision::{DecisionPool, InboundDecider, OutboundDecider, Plan};
use crate::engine::Engine;
use crate::hbone::server::{self, InboundContext, Role};
use crate::identity::{IdentityMaterial, IdentityStore};
use crate::limits::{Caps, ConnectionLimiter};
use crate::netns::Netns;
use crate::outbound::{self, ListenMode, OutboundContext};
use crate::plan::HboneTarget;
use crate::pool::Pool;
use crate::probe;
use crate::registry::ConnectionRegistry;
use crate::report::{ReportQueue, Reporter};
use crate::scope::ListenerScope;
use crate::socket::SocketFactory;
use crate::stats::Stats;
use crate::waypoint::upstream::{Dialer, Upstreams};
use crate::waypoint::{Waypoint, WaypointTable};

/// Istio's ztunnel keeps idle pooled connections for five minutes.
const DEFAULT_POOL_IDLE_TIMEOUT: f64 = 300.0;
/// At most this many concurrent streams per pooled connection (or the peer's limit if lower).
const DEFAULT_POOL_MAX_STREAMS: usize = 100;
/// How often the pool looks for idle connections, at most.
const POOL_SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// Threads that run Python decisions: decisions hold the GIL, so more threads only help while one
/// of them waits on something else (a user's decider doing I/O).
const DEFAULT_DECISION_THREADS: usize = 4;
/// Decisions that may wait for a thread; past this a new connection is refused at once.
const DEFAULT_MAX_PENDING_DECISIONS: usize = 1024;
/// Connections per listener, and per source IP on one listener; 0 lifts a cap.
const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
const DEFAULT_MAX_CONNECTIONS_PER_SOURCE: usize = 1_000;
/// An HBONE connection (server side) with no stream for this long is closed; longer than the
/// clients' pool idle timeout (Istio's: 5 minutes), so a client normally closes first.
const DEFAULT_HBONE_IDLE_TIMEOUT: f64 = 600.0;
/// How long closing waits for the last reports to reach Python.
const REPORTS_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);
/// What a connection cut at the drain deadline is told.
const DRAIN_CUT: &str = "cut: the drain deadline passed while the proxy was shutting down";

/// State shared by every task of one core.
pub struct Shared {
    pub identities: IdentityStore,
    pub pool: Pool,
    pub stats: Stats,
    pub sockets: SocketFactory,
    /// Cancelled when the core drains: listeners stop accepting, HBONE servers send GOAWAY.
    pub draining: CancellationToken,
    /// Cancelled at the drain deadline: every remaining connection is closed.
    pub hard_stop: CancellationToken,
    /// Tunnels handed over by Python (`tunnel_fd`), which belong to no listener.
    pub tunnels: TaskTracker,
    /// Connection reports on their way to Python.
    pub reports: Arc<ReportQueue>,
    /// Connections carrying bytes, which decisions may revisit.
    pub connections: ConnectionRegistry,
    /// Where Python decisions run.
    pub decisions: Arc<DecisionPool>,
    /// The caps every new listener gets.
    pub caps: Caps,
    /// Server-side idle timeout of HBONE connections.
    pub hbone_idle_timeout: Duration,
}

fn duration(name: &str, seconds: f64) -> PyResult<Duration> {
    Duration::try_from_secs_f64(seconds).map_err(|_| {
        PyValueError::new_err(format!(
            "{name}: expected a non-negative number of seconds, got {seconds}"
        ))
    })
}

fn parse_listen_address(address: &str) -> PyResult<SocketAddr> {
    address.parse().map_err(|_| {
        PyValueError::new_err(format!(
            "listen address: expected 'ip:port' (IPv6 as '[ip]:port'), got {address:?}"
        ))
    })
}

/// A listening socket of the core (HBONE or plain outbound).
#[pyclass(frozen, module = "ambient._core")]
pub struct Listener {
    local_address: SocketAddr,
    scope: ListenerScope,
    handle: Handle,
    /// The core's hard stop: once it fired, the runtime may be gone and there is nothing to drain.
    core_stopped: CancellationToken,
}

#[pymethods]
impl Listener {
    /// The address actually bound (useful with port 0).
    #[getter]
    fn local_address(&self) -> String {
        self.local_address.to_string()
    }

    /// Connections and streams of this listener still running.
    #[getter]
    fn active(&self) -> usize {
        self.scope.tracker.len()
    }

    /// Accepted connections holding a place under this listener's caps now.
    #[getter]
    fn connections(&self) -> usize {
        self.scope.limiter.open()
    }

    /// Stop accepting (HBONE connections get GOAWAY), wait up to `deadline` seconds for live
    /// connections, then cut the rest, each reported with `reason`. Returns True when nothing
    /// had to be cut.
    #[pyo3(signature = (deadline=0.0, reason="cut: the listener was closed"))]
    fn close(&self, py: Python<'_>, deadline: f64, reason: &str) -> PyResult<bool> {
        let deadline = duration("deadline", deadline)?;
        if self.core_stopped.is_cancelled() {
            return Ok(self.scope.tracker.is_empty());
        }
        let scope = self.scope.clone();
        let handle = self.handle.clone();
        let reason = reason.to_string();
        Ok(py.detach(move || handle.block_on(async move { scope.drain(deadline, &reason).await })))
    }

    fn __repr__(&self) -> String {
        format!("Listener('{}')", self.local_address)
    }
}

/// The data-plane runtime. One per process is typical; several may coexist (tests do).
#[pyclass(frozen, module = "ambient._core")]
pub struct Core {
    engine: Mutex<Option<Engine>>,
    handle: Handle,
    shared: Arc<Shared>,
    listeners: Mutex<Vec<ListenerScope>>,
}

impl Core {
    fn register(&self, scope: ListenerScope) {
        let mut listeners = self.listeners.lock().unwrap();
        listeners.retain(|s| !(s.draining.is_cancelled() && s.tracker.is_empty()));
        listeners.push(scope);
    }

    fn bind(&self, address: &str, sockets: &SocketFactory) -> PyResult<tokio::net::TcpListener> {
        if self.shared.draining.is_cancelled() {
            return Err(PyRuntimeError::new_err("the core is draining or stopped"));
        }
        let addr = parse_listen_address(address)?;
        let _guard = self.handle.enter();
        sockets.listen(addr).map_err(|e| {
            let place = match &sockets.netns {
                Some(netns) => format!(" in {netns:?}"),
                None => String::new(),
            };
            PyOSError::new_err(format!("cannot listen on {addr}{place}: {e}"))
        })
    }

    /// The core's socket options, in `netns` when given.
    fn sockets_for(&self, netns: Option<&Bound<'_, Netns>>) -> SocketFactory {
        self.shared
            .sockets
            .in_netns(netns.map(|n| n.get().handle.clone()))
    }

    /// Run a tunnel handed over by Python: a drain waits for it, the hard stop cuts it.
    fn spawn_tunnel(&self, tunnel: impl std::future::Future<Output = ()> + Send + 'static) {
        self.shared
            .tunnels
            .spawn(crate::scope::until_cut(tunnel, &self.shared.hard_stop));
    }

    fn scope(&self) -> ListenerScope {
        ListenerScope::new(
            self.shared.draining.child_token(),
            self.shared.hard_stop.child_token(),
            ConnectionLimiter::new(self.shared.caps),
        )
    }

    fn listener(&self, local_address: SocketAddr, scope: ListenerScope) -> Listener {
        self.register(scope.clone());
        Listener {
            local_address,
            scope,
            handle: self.handle.clone(),
            core_stopped: self.shared.hard_stop.clone(),
        }
    }
}

#[pymethods]
impl Core {
    #[new]
    #[pyo3(signature = (
        worker_threads=None,
        *,
        pool_max_streams=DEFAULT_POOL_MAX_STREAMS,
        pool_idle_timeout=DEFAULT_POOL_IDLE_TIMEOUT,
        mark=None,
        decision_threads=DEFAULT_DECISION_THREADS,
        max_pending_decisions=DEFAULT_MAX_PENDING_DECISIONS,
        max_connections=DEFAULT_MAX_CONNECTIONS,
        max_connections_per_source=DEFAULT_MAX_CONNECTIONS_PER_SOURCE,
        hbone_idle_timeout=DEFAULT_HBONE_IDLE_TIMEOUT,
    ))]
    // Python keyword arguments, mirrored one to one: a struct would only move the list.
    #[allow(clippy::too_many_arguments)]
    fn new(
        worker_threads: Option<usize>,
        pool_max_streams: usize,
        pool_idle_timeout: f64,
        mark: Option<u32>,
        decision_threads: usize,
        max_pending_decisions: usize,
        max_connections: usize,
        max_connections_per_source: usize,
        hbone_idle_timeout: f64,
    ) -> PyResult<Self> {
        if worker_threads == Some(0) {
            return Err(PyValueError::new_err("worker_threads: expected at least 1"));
        }
        if decision_threads == 0 {
            return Err(PyValueError::new_err(
                "decision_threads: expected at least 1",
            ));
        }
        let hbone_idle_timeout = duration("hbone_idle_timeout", hbone_idle_timeout)?;
        let pool_idle_timeout = duration("pool_idle_timeout", pool_idle_timeout)?;
        let engine = Engine::start(worker_threads)
            .map_err(|e| PyRuntimeError::new_err(format!("cannot start the tokio runtime: {e}")))?;
        let decisions = DecisionPool::start(decision_threads, max_pending_decisions)
            .map_err(|e| PyRuntimeError::new_err(format!("cannot start decision threads: {e}")))?;
        let shared = Arc::new(Shared {
            identities: IdentityStore::default(),
            pool: Pool::new(pool_max_streams, pool_idle_timeout),
            stats: Stats::default(),
            sockets: SocketFactory { mark, netns: None },
            draining: CancellationToken::new(),
            hard_stop: CancellationToken::new(),
            tunnels: TaskTracker::new(),
            reports: ReportQueue::start(),
            connections: ConnectionRegistry::default(),
            decisions,
            caps: Caps {
                per_listener: max_connections,
                per_source: max_connections_per_source,
            },
            hbone_idle_timeout,
        });
        let sweeper = shared.clone();
        engine.handle().spawn(async move {
            let every = POOL_SWEEP_INTERVAL.min(sweeper.pool.idle_timeout() / 2);
            let every = every.max(Duration::from_millis(10));
            loop {
                tokio::select! {
                    _ = sweeper.hard_stop.cancelled() => return,
                    _ = tokio::time::sleep(every) => sweeper.pool.evict_idle(),
                }
            }
        });
        Ok(Self {
            handle: engine.handle().clone(),
            engine: Mutex::new(Some(engine)),
            shared,
            listeners: Mutex::new(Vec::new()),
        })
    }

    /// Load (or rotate) the certificate chain, key and trust roots of `identity`, all PEM.
    fn set_identity(
        &self,
        identity: &str,
        chain_pem: &[u8],
        key_pem: &[u8],
        roots_pem: &[u8],
    ) -> PyResult<()> {
        let material = IdentityMaterial::from_pem(identity, chain_pem, key_pem, roots_pem)
            .map_err(PyValueError::new_err)?;
        self.shared.identities.set(material);
        Ok(())
    }

    fn remove_identity(&self, identity: &str) -> bool {
        self.shared.identities.remove(identity)
    }

    fn identities(&self) -> Vec<String> {
        self.shared.identities.names()
    }

    /// Serve HBONE on `address` as `identity`; `decide` is an `Allow`/`Deny` for every stream, or
    /// a callable `(peer_identity, authority, peer_address, headers) -> Allow | Deny`.
    /// `report` as for `listen`, once per stream. With `netns` (in-pod mode) the listener and the
    /// connections to the app are made in that pod's network namespace.
    /// `remember`: the callable's answer depends only on the peer's identity and IP, the
    /// authority, the `Forwarded` host and the snapshot, so the core keeps it until
    /// `snapshot_changed` (see the `table` module).
    #[pyo3(signature = (address, identity, decide, *, report=None, netns=None, remember=false))]
    fn serve_hbone(
        &self,
        address: &str,
        identity: &str,
        decide: &Bound<'_, PyAny>,
        report: Option<&Bound<'_, PyAny>>,
        netns: Option<&Bound<'_, Netns>>,
        remember: bool,
    ) -> PyResult<Listener> {
        let reporter =
            Reporter::from_py(report, &self.shared.reports).map_err(PyValueError::new_err)?;
        if self.shared.identities.get(identity).is_none() {
            return Err(PyValueError::new_err(format!(
                "serve_hbone: no certificate loaded for {identity} (call set_identity first)"
            )));
        }
        let decider = InboundDecider::from_py(decide, remember).map_err(PyValueError::new_err)?;
        let sockets = self.sockets_for(netns);
        let tcp = self.bind(address, &sockets)?;
        let local = tcp
            .local_addr()
            .map_err(|e| PyOSError::new_err(e.to_string()))?;
        let scope = self.scope();
        let ctx = Arc::new(InboundContext {
            shared: self.shared.clone(),
            identity: identity.to_string(),
            role: Role::Ztunnel(decider),
            reporter,
            scope: scope.clone(),
            sockets,
            idle_timeout: self.shared.hbone_idle_timeout,
        });
        self.handle.spawn(server::accept_loop(tcp, ctx));
        Ok(self.listener(local, scope))
    }

    /// Serve a waypoint on `address` as `identity`: HBONE in, each stream's target checked
    /// against `table` (a Service VIP or pod IP bound to this waypoint, else 421), HTTP routed
    /// per request by `table`, and a second HBONE tunnel, as `identity` too, to the endpoint.
    /// `report` as for `serve_hbone`, for streams refused before any request.
    /// `access_log`: where each request's JSON line goes.
    #[pyo3(signature = (address, identity, table, *, report=None, netns=None, access_log=None))]
    fn serve_waypoint(
        &self,
        address: &str,
        identity: &str,
        table: Py<WaypointTable>,
        report: Option<&Bound<'_, PyAny>>,
        netns: Option<&Bound<'_, Netns>>,
        access_log: Option<Py<AccessLog>>,
    ) -> PyResult<Listener> {
        let reporter =
            Reporter::from_py(report, &self.shared.reports).map_err(PyValueError::new_err)?;
        if self.shared.identities.get(identity).is_none() {
            return Err(PyValueError::new_err(format!(
                "serve_waypoint: no certificate loaded for {identity} (call set_identity first)"
            )));
        }
        let sockets = self.sockets_for(netns);
        let tcp = self.bind(address, &sockets)?;
        let local = tcp
            .local_addr()
            .map_err(|e| PyOSError::new_err(e.to_string()))?;
        let scope = self.scope();
        let waypoint = Arc::new(Waypoint {
            table,
            upstreams: Upstreams::default(),
            dialer: Dialer {
                shared: self.shared.clone(),
                identity: Arc::from(identity),
                sockets: sockets.clone(),
                source_ip: Some(local.ip()).filter(|ip| !ip.is_unspecified()),
            },
            access_log,
        });
        let ctx = Arc::new(InboundContext {
            shared: self.shared.clone(),
            identity: identity.to_string(),
            role: Role::Waypoint(waypoint),
            reporter,
            scope: scope.clone(),
            sockets,
            idle_timeout: self.shared.hbone_idle_timeout,
        });
        self.handle.spawn(server::accept_loop(tcp, ctx));
        Ok(self.listener(local, scope))
    }

    /// Accept plain TCP on `address` and carry each connection as `route` says: a fixed
    /// `HboneTarget`/`TcpTarget`/`Deny`, or a callable `(source, destination) -> plan`.
    /// `mode` says how the destination is learned: "direct" (the listener's own address),
    /// "original_dst" (`SO_ORIGINAL_DST` after in-pod redirection) or "socks5" (the client asks).
    /// `report(subject, source, destination, sent, received, seconds, error)` is told how each
    /// connection ended. With `netns` (in-pod mode) the listener and the far side's sockets are
    /// made in that pod's network namespace, so connections leave with the pod's own IP.
    /// A callable may answer with `Routes` (the core picks one plan per connection);
    /// `remember`: its answer depends only on the destination and the snapshot, so the core
    /// keeps it until `snapshot_changed`.
    #[pyo3(signature = (address, route, *, mode="direct", report=None, netns=None, remember=false))]
    // Python keyword arguments, mirrored one to one.
    #[allow(clippy::too_many_arguments)]
    fn listen(
        &self,
        address: &str,
        route: &Bound<'_, PyAny>,
        mode: &str,
        report: Option<&Bound<'_, PyAny>>,
        netns: Option<&Bound<'_, Netns>>,
        remember: bool,
    ) -> PyResult<Listener> {
        let decider = OutboundDecider::from_py(route, remember).map_err(PyValueError::new_err)?;
        let mode = ListenMode::parse(mode).map_err(PyValueError::new_err)?;
        let reporter =
            Reporter::from_py(report, &self.shared.reports).map_err(PyValueError::new_err)?;
        let sockets = self.sockets_for(netns);
        let tcp = self.bind(address, &sockets)?;
        let local = tcp
            .local_addr()
            .map_err(|e| PyOSError::new_err(e.to_string()))?;
        let scope = self.scope();
        let ctx = Arc::new(OutboundContext {
            shared: self.shared.clone(),
            decider,
            mode,
            reporter,
            scope: scope.clone(),
            sockets,
        });
        self.handle.spawn(outbound::accept_loop(tcp, ctx));
        Ok(self.listener(local, scope))
    }

    /// Take ownership of a connected stream socket (TCP or Unix; the caller must have detached
    /// it) and carry it as `plan` says. `on_ready(error)` is called once: with None when the far
    /// side is established, or with the reason it could not be.
    fn tunnel_fd(&self, fd: RawFd, plan: &Bound<'_, PyAny>, on_ready: Py<PyAny>) -> PyResult<()> {
        if fd < 0 {
            return Err(PyValueError::new_err(format!(
                "fd: expected an open descriptor, got {fd}"
            )));
        }
        // SAFETY: the caller hands over an open descriptor it no longer uses (documented). It is
        // owned from here on, so every error below closes it.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let plan = Plan::from_py(plan).map_err(|e| PyValueError::new_err(format!("plan: {e}")))?;
        let socket = socket2::Socket::from(owned);
        let domain = socket
            .domain()
            .map_err(|e| PyOSError::new_err(format!("fd {fd} is not a socket: {e}")))?;
        socket
            .set_nonblocking(true)
            .map_err(|e| PyOSError::new_err(e.to_string()))?;
        let reports = self.shared.reports.clone();
        let report = move |error: Option<String>| {
            // Python is called off the runtime's workers, on the reporter thread.
            reports.call(move |py| {
                if let Err(e) = on_ready.call1(py, (error,)) {
                    log::error!("tunnel on_ready callback raised: {e}");
                }
            });
        };
        let _guard = self.handle.enter();
        let shared = self.shared.clone();
        if domain == socket2::Domain::UNIX {
            let stream = tokio::net::UnixStream::from_std(socket.into())
                .map_err(|e| PyOSError::new_err(e.to_string()))?;
            self.spawn_tunnel(outbound::tunnel_stream(stream, None, plan, shared, report));
        } else {
            let stream = tokio::net::TcpStream::from_std(socket.into())
                .map_err(|e| PyOSError::new_err(e.to_string()))?;
            let source = stream.peer_addr().ok();
            self.spawn_tunnel(outbound::tunnel_stream(
                stream, source, plan, shared, report,
            ));
        }
        Ok(())
    }

    /// Open `count` HBONE streams to `target`, `concurrency` at a time; each sends `payload`
    /// bytes, half-closes and reads the answer to its end. With `fresh_connections`, every stream
    /// dials its own connection (a full mutual-TLS handshake) instead of using the pool.
    /// Returns counts, elapsed seconds and the first error. Used by `ambient hbone probe` and the
    /// benchmarks.
    #[pyo3(signature = (target, count, *, concurrency=1, payload=0, fresh_connections=false))]
    fn probe<'py>(
        &self,
        py: Python<'py>,
        target: Py<HboneTarget>,
        count: usize,
        concurrency: usize,
        payload: usize,
        fresh_connections: bool,
    ) -> PyResult<Bound<'py, PyDict>> {
        let shared = self.shared.clone();
        let handle = self.handle.clone();
        let options = probe::Options {
            count,
            concurrency: concurrency.max(1),
            payload,
            fresh_connections,
        };
        let target = Arc::new(target);
        let report = py.detach(move || handle.block_on(probe::run(target, options, shared)));
        let out = PyDict::new(py);
        out.set_item("ok", report.ok)?;
        out.set_item("failed", report.failed)?;
        out.set_item("seconds", report.seconds)?;
        out.set_item("bytes_received", report.bytes_received)?;
        out.set_item("first_error", report.first_error)?;
        Ok(out)
    }

    /// Connections carrying bytes now: `(id, subject, source, destination)`, where `subject` is the
    /// plan or verdict they were given (with its `tag`).
    fn connections<'py>(&self, py: Python<'py>) -> Vec<(u64, Py<PyAny>, String, String)> {
        let mut out = Vec::new();
        self.shared.connections.for_each(|id, conn| {
            out.push((
                id,
                conn.subject.to_py(py),
                conn.source.to_string(),
                conn.destination.clone(),
            ));
        });
        out
    }

    /// Drop the pooled HBONE connections dialed from `netns` (its pod was removed); returns how
    /// many pool entries went.
    fn forget_netns(&self, netns: &Bound<'_, Netns>) -> usize {
        self.shared.pool.forget_netns(netns.get().handle.inode())
    }

    /// Close a live connection (both sides); `reason` is reported as its error. False if it had
    /// already ended.
    fn close_connection(&self, id: u64, reason: String) -> bool {
        self.shared.connections.close(id, reason)
    }

    /// Python swapped its snapshot: remembered answers are forgotten, each asked again on its
    /// next connection.
    fn snapshot_changed(&self) {
        self.shared.decisions.generation.advance();
    }

    /// Counters, read without stopping traffic.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let out = PyDict::new(py);
        for (name, value) in self.shared.stats.snapshot() {
            out.set_item(name, value)?;
        }
        out.set_item("pool_connections", self.shared.pool.connection_count())?;
        out.set_item("pool_connections_goaway", self.shared.pool.goaway_count())?;
        out.set_item("live_connections", self.shared.connections.len())?;
        out.set_item(
            "reports_dropped",
            self.shared.reports.dropped.load(Ordering::Relaxed),
        )?;
        out.set_item(
            "reports_suppressed",
            self.shared.reports.suppressed.load(Ordering::Relaxed),
        )?;
        let decisions = &self.shared.decisions;
        out.set_item("decisions_asked", decisions.asked.load(Ordering::Relaxed))?;
        out.set_item(
            "decisions_remembered",
            decisions.remembered.load(Ordering::Relaxed),
        )?;
        let (suppressed, dropped) = crate::logging::log_stats();
        out.set_item("log_lines_suppressed", suppressed)?;
        out.set_item("log_lines_dropped", dropped)?;
        Ok(out)
    }

    /// Drain everything: listeners stop accepting, HBONE servers send GOAWAY, live connections get
    /// until `deadline` seconds to finish, then are cut; the pool is emptied. True when nothing
    /// had to be cut. The core accepts no new listeners afterwards.
    #[pyo3(signature = (deadline=0.0))]
    fn drain(&self, py: Python<'_>, deadline: f64) -> PyResult<bool> {
        let deadline = duration("deadline", deadline)?;
        if self.shared.hard_stop.is_cancelled() {
            return Ok(true); // already drained (or closed)
        }
        let scopes = self.listeners.lock().unwrap().clone();
        let shared = self.shared.clone();
        let handle = self.handle.clone();
        Ok(py.detach(move || {
            handle.block_on(async move {
                // Every tracker is closed before anything waits, so the wait below ends once
                // every connection has, whichever listener it is on.
                shared.draining.cancel();
                for scope in &scopes {
                    scope.tracker.close();
                }
                shared.tunnels.close();
                let all = async {
                    for scope in &scopes {
                        scope.tracker.wait().await;
                    }
                    shared.tunnels.wait().await;
                };
                let finished = tokio::time::timeout(deadline, all).await.is_ok();
                for scope in &scopes {
                    scope.set_cut_reason(DRAIN_CUT);
                }
                shared.hard_stop.cancel();
                for scope in &scopes {
                    scope.tracker.wait().await;
                }
                shared.tunnels.wait().await;
                shared.pool.clear();
                finished
            })
        }))
    }

    /// Drain with `deadline`, then stop the runtime. Idempotent.
    #[pyo3(signature = (deadline=0.0))]
    fn close(&self, py: Python<'_>, deadline: f64) -> PyResult<bool> {
        let finished = self.drain(py, deadline)?;
        let engine = self.engine.lock().unwrap().take();
        let reports = self.shared.reports.clone();
        py.detach(move || {
            if let Some(engine) = engine {
                engine.shutdown_timeout(Duration::from_secs(1));
            }
            reports.close_and_wait(REPORTS_FLUSH_TIMEOUT);
        });
        self.shared.decisions.close();
        Ok(finished)
    }

    #[getter]
    fn closed(&self) -> bool {
        self.engine.lock().unwrap().is_none()
    }
}

impl Drop for Core {
    fn drop(&mut self) {
        self.shared.reports.close();
        self.shared.decisions.close();
        self.shared.draining.cancel();
        self.shared.hard_stop.cancel();
        if let Some(engine) = self.engine.lock().unwrap().take() {
            // Never block here: this may run with the GIL held while a blocking task waits for it.
            engine.shutdown_background();
        }
    }
}
