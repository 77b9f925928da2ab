//! Which backend and which endpoint a request (or a TCP stream) goes to: a backend by weight, an
//! endpoint by least request with two random choices (Istio's default), a retry on an endpoint
//! not tried yet; and the count of requests in flight each endpoint carries.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::table::{Backend, Table, Target};
use super::StreamInfo;

/// A request in flight to an endpoint, counted for least-request balancing until dropped.
pub struct Active {
    table: Arc<Table>,
    endpoint: usize,
}

impl Active {
    pub fn new(table: &Arc<Table>, endpoint: usize) -> Self {
        table.endpoints[endpoint]
            .active
            .fetch_add(1, Ordering::Relaxed);
        Self {
            table: table.clone(),
            endpoint,
        }
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.table.endpoints[self.endpoint]
            .active
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// The less loaded of two endpoints picked at random (Envoy's least-request with two choices,
/// Istio's default), or the only one.
pub(super) fn least_request(table: &Table, candidates: &[(usize, u16)]) -> Option<(usize, u16)> {
    let load = |c: &(usize, u16)| table.endpoints[c.0].active.load(Ordering::Relaxed);
    match candidates.len() {
        0 => None,
        1 => Some(candidates[0]),
        n => {
            let a = rand::random_range(0..n);
            let mut b = rand::random_range(0..n - 1);
            if b >= a {
                b += 1;
            }
            let (a, b) = (candidates[a], candidates[b]);
            Some(if load(&b) < load(&a) { b } else { a })
        }
    }
}

/// A backend by weight (weight 0 is never chosen); None when every weight is 0.
pub(super) fn weighted(backends: &[Backend]) -> Option<&Backend> {
    let total: u64 = backends.iter().map(|b| u64::from(b.weight)).sum();
    if total == 0 {
        return None;
    }
    let mut pick = rand::random_range(0..total);
    for b in backends {
        let w = u64::from(b.weight);
        if pick < w {
            return Some(b);
        }
        pick -= w;
    }
    None
}

/// The endpoint for a stream to a TCP port: a pod target is its own endpoint; a Service's is
/// picked by least request among its endpoints on that port.
pub fn endpoint_for_stream(table: &Table, info: &StreamInfo) -> Option<(usize, u16)> {
    match table.targets.get(&info.target.ip())? {
        Target::Workload { endpoint } => Some((*endpoint, info.target.port())),
        Target::Service { service } => {
            let port = table.services[*service].ports.get(&info.target.port())?;
            let backend = weighted(&port.default.backends)?;
            least_request(table, &backend.endpoints)
        }
    }
}

/// The endpoint for a retry: least request among the backend's endpoints not tried yet (Envoy's
/// previous-hosts predicate), or None when every one was.
pub(super) fn retry_endpoint(
    table: &Table,
    backend: &Backend,
    tried: &[usize],
) -> Option<(usize, u16)> {
    let untried: Vec<(usize, u16)> = backend
        .endpoints
        .iter()
        .copied()
        .filter(|(i, _)| !tried.contains(i))
        .collect();
    least_request(table, &untried)
}
