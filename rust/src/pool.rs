//! The HBONE connection pool: many CONNECT streams multiplexed over few mutual-TLS connections.
//!
//! Key = (source identity, destination identities, destination address, source IP), as Istio's
//! ztunnel: two workloads never share a connection, since the TLS client certificate *is* the
//! source's identity. A connection carries at most min(limit, peer's MAX_CONCURRENT_STREAMS)
//! streams at once; past that, another is dialed. Only one dial per key runs at a time, so a burst of
//! new connections does not become a burst of handshakes. Idle connections are released after a
//! timeout; a connection that received GOAWAY is never handed out again.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::core::Shared;
use crate::hbone::client::{self, HboneConnection, HboneError};
use crate::socket::SocketFactory;

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct PoolKey {
    pub source_identity: Arc<str>,
    /// Sorted and deduplicated (`HboneTarget` does it), so equal sets are equal keys.
    pub identities: Vec<Arc<str>>,
    pub address: SocketAddr,
    pub source_ip: Option<IpAddr>,
    /// How the connection is dialed: in-pod mode, from the source pod's network namespace.
    pub sockets: SocketFactory,
}

#[derive(Default)]
struct Entry {
    conns: Vec<Arc<HboneConnection>>,
    /// Held while dialing, so only one dial per key runs at a time.
    dialing: Arc<tokio::sync::Mutex<()>>,
}

pub struct Pool {
    entries: Mutex<HashMap<PoolKey, Entry>>,
    max_streams: usize,
    idle_timeout: Duration,
}

/// A stream's claim on a pooled connection; returning it (drop) frees the slot.
pub struct Lease {
    pub conn: Arc<HboneConnection>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.conn.release_stream();
    }
}

impl Pool {
    pub fn new(max_streams: usize, idle_timeout: Duration) -> Self {
        Self {
            entries: Mutex::new(HashMap::new()),
            max_streams: max_streams.max(1),
            idle_timeout,
        }
    }

    pub fn max_streams(&self) -> usize {
        self.max_streams
    }

    pub fn idle_timeout(&self) -> Duration {
        self.idle_timeout
    }

    /// A connection with room for one more stream, reserved for the caller.
    fn try_lease(&self, key: &PoolKey) -> Option<Lease> {
        let mut entries = self.entries.lock().unwrap();
        let entry = entries.get_mut(key)?;
        entry.conns.retain(|c| !c.is_closed());
        let conn = entry.conns.iter().find(|c| c.has_room())?;
        conn.active.fetch_add(1, Ordering::AcqRel);
        Some(Lease { conn: conn.clone() })
    }

    fn dial_lock(&self, key: &PoolKey) -> Arc<tokio::sync::Mutex<()>> {
        let mut entries = self.entries.lock().unwrap();
        entries.entry(key.clone()).or_default().dialing.clone()
    }

    /// Lease a stream slot for `key`, dialing a new connection only when none has room.
    pub async fn lease(&self, key: &PoolKey, shared: &Arc<Shared>) -> Result<Lease, HboneError> {
        if let Some(lease) = self.try_lease(key) {
            return Ok(lease);
        }
        let dial_lock = self.dial_lock(key);
        let _dialing = dial_lock.lock().await;
        // Someone else's dial may have finished while we waited for the lock.
        if let Some(lease) = self.try_lease(key) {
            return Ok(lease);
        }
        let conn = Arc::new(client::dial(key, shared).await?);
        conn.active.fetch_add(1, Ordering::AcqRel);
        let mut entries = self.entries.lock().unwrap();
        entries
            .entry(key.clone())
            .or_default()
            .conns
            .push(conn.clone());
        Ok(Lease { conn })
    }

    /// Release connections that are closed, or idle for longer than the timeout. Dropping the
    /// last handle of an h2 client connection closes it gracefully (GOAWAY, then TCP close).
    pub fn evict_idle(&self) {
        let now = Instant::now();
        let mut entries = self.entries.lock().unwrap();
        for entry in entries.values_mut() {
            entry.conns.retain(|c| {
                !c.is_closed()
                    && (c.active.load(Ordering::Acquire) > 0
                        || now.duration_since(c.idle_since()) < self.idle_timeout)
            });
        }
        // Keep an empty entry only while someone is dialing for it.
        entries.retain(|_, e| !e.conns.is_empty() || Arc::strong_count(&e.dialing) > 1);
    }

    /// Open connections in the pool (closed ones not yet swept are not counted).
    pub fn connection_count(&self) -> usize {
        let entries = self.entries.lock().unwrap();
        entries
            .values()
            .flat_map(|e| e.conns.iter())
            .filter(|c| !c.is_closed())
            .count()
    }

    /// Pooled connections that take no new streams (GOAWAY received) but still carry old ones.
    pub fn goaway_count(&self) -> usize {
        let entries = self.entries.lock().unwrap();
        entries
            .values()
            .flat_map(|e| e.conns.iter())
            .filter(|c| !c.is_closed() && c.refuses_new_streams())
            .count()
    }

    /// Drop the connections dialed from the network namespace `inode` (its pod was removed):
    /// they would otherwise keep the namespace and their sockets alive until the idle timeout.
    pub fn forget_netns(&self, inode: u64) -> usize {
        let mut entries = self.entries.lock().unwrap();
        let before = entries.len();
        entries.retain(|key, _| key.sockets.netns_inode() != Some(inode));
        before - entries.len()
    }

    /// Drop every pooled connection (core shutdown).
    pub fn clear(&self) {
        self.entries.lock().unwrap().clear();
    }
}
