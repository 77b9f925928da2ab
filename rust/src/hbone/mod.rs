//! HBONE: one HTTP/2 `CONNECT` stream per proxied TCP connection, over mutual TLS 1.3.
//!
//! The HTTP/2 settings are Istio ztunnel's, so both ends size their buffers alike.

pub mod batch;
pub mod client;
pub mod io;
pub mod server;

use std::time::Duration;

use h2::{Ping, PingPong};

/// Per-stream flow-control window: large enough that one bulk stream is not window-limited on a
/// fast link.
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
/// Connection-level window: several bulk streams share one pooled connection.
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
/// Largest DATA frame we accept; large frames mean fewer headers and TLS records per byte.
pub const MAX_FRAME_SIZE: u32 = 1024 * 1024;
/// Keepalive: a PING every 10 s; a connection whose PING is unanswered for 20 s is dead.
pub const PING_INTERVAL: Duration = Duration::from_secs(10);
pub const PING_TIMEOUT: Duration = Duration::from_secs(20);
/// Upper bound for a TLS + HTTP/2 handshake, so a silent peer cannot hold a task forever.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Upper bound for a TCP connect to an upstream or a peer.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Ping the peer until it stops answering; returns why the connection should be dropped.
pub async fn keepalive(mut ping_pong: PingPong) -> String {
    loop {
        tokio::time::sleep(PING_INTERVAL).await;
        match tokio::time::timeout(PING_TIMEOUT, ping_pong.ping(Ping::opaque())).await {
            Ok(Ok(_pong)) => continue,
            Ok(Err(e)) => return format!("keepalive PING failed: {e}"),
            Err(_) => return format!("no PING answer within {PING_TIMEOUT:?}"),
        }
    }
}
