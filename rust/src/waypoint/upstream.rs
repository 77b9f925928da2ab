//! The waypoint's side of the second tunnel: HTTP connections to endpoints, each carried on an
//! HBONE CONNECT stream (`podIP:15008`, authority `podIP:targetPort`) dialed with the waypoint's
//! own certificate from the core's HBONE pool, and kept for the next request.
//!
//! HTTP/1.1 connections are reused one request at a time; an HTTP/2 connection carries many
//! requests at once. So a request pays neither a TLS handshake (the HBONE pool) nor a CONNECT
//! (this pool) once the endpoint has been reached before.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use h2::{RecvStream, SendStream};
use http::{Request, Response};
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

use crate::core::Shared;
use crate::hbone::client::HboneError;
use crate::hbone::io::H2Io;
use crate::hbone::CONNECT_TIMEOUT;
use crate::pool::{Lease, PoolKey};
use crate::socket::SocketFactory;

pub type Body = BoxBody<Bytes, hyper::Error>;

/// Idle HTTP/1.1 connections kept per endpoint; more are closed when they finish.
const MAX_IDLE_PER_ENDPOINT: usize = 64;

#[derive(Clone, Hash, PartialEq, Eq, Debug)]
pub struct UpstreamKey {
    /// `podIP:targetPort`: the CONNECT authority (or, outside the mesh, the TCP address).
    pub address: SocketAddr,
    /// The endpoint's ztunnel (`podIP:15008`) and the identity it must prove; None: plain TCP.
    pub hbone: Option<(SocketAddr, Arc<str>)>,
    pub http2: bool,
}

/// Why a request could not be sent to an endpoint.
#[derive(Debug)]
pub enum UpstreamError {
    Connect(String),
    Http(hyper::Error),
}

impl std::fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpstreamError::Connect(why) => f.write_str(why),
            UpstreamError::Http(e) => {
                // hyper's own text is terse ("http2 error"): the cause says what happened.
                write!(f, "{e}")?;
                let mut cause = std::error::Error::source(e);
                while let Some(c) = cause {
                    write!(f, ": {c}")?;
                    cause = c.source();
                }
                Ok(())
            }
        }
    }
}

enum Sender {
    Http1(http1::SendRequest<Body>),
    Http2(http2::SendRequest<Body>),
}

#[derive(Default)]
pub struct Upstreams {
    /// HTTP/1.1 connections, possibly still reading a response body (not `is_ready` then).
    http1: Mutex<HashMap<UpstreamKey, Vec<http1::SendRequest<Body>>>>,
    http2: Mutex<HashMap<UpstreamKey, http2::SendRequest<Body>>>,
}

impl Upstreams {
    fn idle(&self, key: &UpstreamKey) -> Option<Sender> {
        if key.http2 {
            let mut conns = self.http2.lock().unwrap();
            let sender = conns.get(key)?;
            if sender.is_closed() {
                conns.remove(key);
                return None;
            }
            return Some(Sender::Http2(sender.clone()));
        }
        let mut conns = self.http1.lock().unwrap();
        let list = conns.get_mut(key)?;
        list.retain(|s| !s.is_closed());
        let ready = list.iter().position(|s| s.is_ready())?;
        Some(Sender::Http1(list.swap_remove(ready)))
    }

    /// Back in the pool as soon as the response head is in: it is taken again once its body is
    /// read (`is_ready`). An upgraded connection never is, and closes with its tunnel.
    fn keep(&self, key: UpstreamKey, sender: http1::SendRequest<Body>) {
        let mut conns = self.http1.lock().unwrap();
        let list = conns.entry(key).or_default();
        if list.len() < MAX_IDLE_PER_ENDPOINT {
            list.push(sender);
        }
    }

    /// Send `request` to the endpoint of `key`, on a kept connection or a new one. A kept
    /// HTTP/1.1 connection the endpoint closed meanwhile gives the request back unsent, and it
    /// goes on a new connection.
    pub async fn send(
        &self,
        key: &UpstreamKey,
        request: Request<Body>,
        dial: &Dialer,
    ) -> Result<Response<Incoming>, UpstreamError> {
        // Dialing is boxed: its state (TLS, HTTP/2 and HTTP handshakes) would otherwise be part
        // of every request's future, moved and zeroed per request though it is rarely needed.
        let (sender, fresh) = match self.idle(key) {
            Some(s) => (s, false),
            None => (Box::pin(dial.dial(key)).await?, true),
        };
        match sender {
            Sender::Http2(mut s) => {
                if !s.is_ready() {
                    s.ready().await.map_err(UpstreamError::Http)?;
                }
                if fresh {
                    self.http2.lock().unwrap().insert(key.clone(), s.clone());
                }
                s.send_request(request).await.map_err(UpstreamError::Http)
            }
            Sender::Http1(mut s) => match s.try_send_request(request).await {
                Ok(response) => {
                    self.keep(key.clone(), s);
                    Ok(response)
                }
                Err(mut e) => match e.take_message() {
                    Some(request) if !fresh => {
                        let Sender::Http1(mut s) = Box::pin(dial.dial(key)).await? else {
                            unreachable!("an HTTP/1.1 key dials HTTP/1.1")
                        };
                        let response =
                            s.send_request(request).await.map_err(UpstreamError::Http)?;
                        self.keep(key.clone(), s);
                        Ok(response)
                    }
                    _ => Err(UpstreamError::Http(e.into_error())),
                },
            },
        }
    }
}

/// How the waypoint reaches endpoints: as which identity, from which sockets.
pub struct Dialer {
    pub shared: Arc<Shared>,
    pub identity: Arc<str>,
    pub sockets: SocketFactory,
    /// The waypoint pod's own IP (the listener's), so endpoints see connections from it, as
    /// from a pod of its own: in loopback mode the kernel would pick 127.0.0.1.
    pub source_ip: Option<std::net::IpAddr>,
}

/// A byte stream to an endpoint: an HBONE CONNECT stream (holding its slot on the pooled
/// connection), or, to a pod outside the mesh, plain TCP.
pub enum Stream {
    Hbone(SendStream<Bytes>, RecvStream, Lease),
    Tcp(TcpStream),
}

impl Dialer {
    /// A new stream to the endpoint of `key`.
    pub async fn stream(&self, key: &UpstreamKey) -> Result<Stream, UpstreamError> {
        let Some((ztunnel, identity)) = &key.hbone else {
            let tcp = tokio::time::timeout(
                CONNECT_TIMEOUT,
                self.sockets.connect(key.address, self.source_ip, None),
            )
            .await
            .map_err(|_| {
                UpstreamError::Connect(format!("TCP connect to {} timed out", key.address))
            })?
            .map_err(|e| {
                UpstreamError::Connect(format!("TCP connect to {} failed: {e}", key.address))
            })?;
            return Ok(Stream::Tcp(tcp));
        };
        let pool_key = PoolKey {
            source_identity: self.identity.clone(),
            identities: vec![identity.clone()],
            address: *ztunnel,
            source_ip: self.source_ip,
            sockets: self.sockets.clone(),
        };
        let lease = self
            .shared
            .pool
            .lease(&pool_key, &self.shared)
            .await
            .map_err(|e| connect_error(key, &e))?;
        let (send, recv) = lease
            .conn
            .connect(&key.address.to_string(), &[], None, None)
            .await
            .map_err(|e| connect_error(key, &e))?;
        Ok(Stream::Hbone(send, recv, lease))
    }

    /// A new HTTP connection to the endpoint of `key`.
    async fn dial(&self, key: &UpstreamKey) -> Result<Sender, UpstreamError> {
        match self.stream(key).await? {
            // The lease (a stream slot on the pooled connection) lives as long as the HTTP
            // connection on it.
            Stream::Hbone(send, recv, lease) => {
                handshake(key, TokioIo::new(H2Io::new(send, recv)), lease).await
            }
            Stream::Tcp(tcp) => handshake(key, TokioIo::new(tcp), ()).await,
        }
    }
}

fn connect_error(key: &UpstreamKey, e: &HboneError) -> UpstreamError {
    UpstreamError::Connect(format!("HBONE to {}: {e}", key.address))
}

async fn handshake<T, G>(key: &UpstreamKey, io: T, guard: G) -> Result<Sender, UpstreamError>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    G: Send + 'static,
{
    let address = key.address;
    if key.http2 {
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .handshake(io)
            .await
            .map_err(UpstreamError::Http)?;
        tokio::spawn(async move {
            let _guard = guard;
            if let Err(e) = conn.await {
                log::debug!("HTTP/2 connection to {address} ended: {e}");
            }
        });
        Ok(Sender::Http2(sender))
    } else {
        let (sender, conn) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(UpstreamError::Http)?;
        tokio::spawn(async move {
            let _guard = guard;
            if let Err(e) = conn.with_upgrades().await {
                log::debug!("HTTP/1.1 connection to {address} ended: {e}");
            }
        });
        Ok(Sender::Http1(sender))
    }
}
