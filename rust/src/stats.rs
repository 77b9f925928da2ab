//! Counters of the data plane, kept as atomics so the hot path never takes a lock to count and
//! Python can read them at any time without stopping traffic.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

macro_rules! counters {
    ($( $(#[$doc:meta])* $name:ident : $ty:ty ),* $(,)?) => {
        #[derive(Default, Debug)]
        pub struct Stats {
            $( $(#[$doc])* pub $name: $ty, )*
        }

        impl Stats {
            /// Every counter by name, as Python's `Core.stats()` returns them.
            pub fn snapshot(&self) -> Vec<(&'static str, i64)> {
                vec![$( (stringify!($name), self.$name.load(Ordering::Relaxed) as i64), )*]
            }
        }
    };
}

counters! {
    /// TCP connections accepted on any listener (HBONE or plain).
    connections_accepted: AtomicU64,
    /// Mutual-TLS handshakes completed, as server or client.
    tls_handshakes: AtomicU64,
    /// Handshakes that failed: no client certificate, wrong trust domain, wrong SAN, not TLS...
    tls_handshake_failures: AtomicU64,
    /// HTTP/2 handshakes (preface and SETTINGS) that failed or timed out after TLS succeeded.
    h2_handshake_failures: AtomicU64,
    /// Connections closed at accept because a listener's or a source's cap was reached.
    connections_over_cap: AtomicU64,
    /// HBONE connections the server closed because no stream was open on them for too long.
    hbone_connections_idle_closed: AtomicU64,
    /// HBONE connections the server closed (GOAWAY ENHANCE_YOUR_CALM) for resetting too many
    /// streams before their response: the HTTP/2 rapid-reset attack.
    hbone_connections_reset_flood: AtomicU64,
    /// CONNECT streams the client reset before their response; the server stopped working on
    /// them (decision, upstream connect).
    hbone_requests_reset_by_client: AtomicU64,
    /// SOCKS5 clients refused: malformed greeting or request, unsupported command, timeout.
    socks5_refused: AtomicU64,
    /// HBONE (mTLS + HTTP/2) connections this core dialed as a client.
    hbone_connections_dialed: AtomicU64,
    /// CONNECT streams this core opened as a client and that got `200`.
    hbone_streams_opened: AtomicU64,
    /// CONNECT streams this core opened as a client and that were refused or failed.
    hbone_streams_failed: AtomicU64,
    /// CONNECT requests this core received as a server.
    hbone_requests_received: AtomicU64,
    /// Of those, answered with something other than `200`.
    hbone_requests_refused: AtomicU64,
    /// Upstream TCP connects that failed (refused, unreachable, timed out).
    upstream_connect_failures: AtomicU64,
    /// Connections refused by a decision (`Deny`) on either side.
    decisions_denied: AtomicU64,
    /// Decision callbacks that raised or returned something unusable.
    decision_errors: AtomicU64,
    /// Connections refused because the decision queue was full.
    decisions_rejected: AtomicU64,
    /// Connections cut by a drain deadline, a closed listener or a removed pod.
    connections_cut: AtomicU64,
    /// Connections closed because a policy change no longer allows them.
    connections_closed_by_policy: AtomicU64,
    /// Proxied connections currently carrying bytes.
    active_tunnels: AtomicI64,
    /// Bytes carried from the connection's initiator towards its destination.
    bytes_sent: AtomicU64,
    /// Bytes carried from the destination back to the initiator.
    bytes_received: AtomicU64,
}

impl Stats {
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Keeps `active_tunnels` right even when a tunnel ends by panic or cancellation.
pub struct ActiveGuard<'a>(&'a AtomicI64);

impl<'a> ActiveGuard<'a> {
    pub fn new(gauge: &'a AtomicI64) -> Self {
        gauge.fetch_add(1, Ordering::Relaxed);
        ActiveGuard(gauge)
    }
}

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
