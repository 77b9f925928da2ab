//! Socket creation in one place, so the same proxy code serves loopback mode and in-pod mode:
//! where a socket is bound, which source address it uses, and the options Istio's ztunnel sets.

use std::hash::{Hash, Hasher};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, SockRef, Socket, TcpKeepalive};
use tokio::net::{TcpListener, TcpStream};

use crate::netns::{new_tcp_socket, NetnsHandle};

/// Listen backlog; the kernel clamps it to `net.core.somaxconn`.
const LISTEN_BACKLOG: i32 = 1024;
/// Keepalive so a peer that vanished without a FIN is noticed (Istio turns TCP keepalive on).
const KEEPALIVE_IDLE: Duration = Duration::from_secs(180);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);

/// How the proxy's own sockets are made.
#[derive(Clone, Debug, Default)]
pub struct SocketFactory {
    /// Packet mark on every socket (Istio uses 0x539 so its redirection rules skip the proxy).
    pub mark: Option<u32>,
    /// In-pod mode: sockets are made inside this pod's network namespace, and a connection
    /// from another address than the pod's own (the client's, to the app) is transparent.
    pub netns: Option<Arc<NetnsHandle>>,
}

/// Factories are equal when they make equal sockets: same mark, same namespace. (The pool keys
/// connections by it: two pods never share an HBONE connection dialed from one's namespace.)
impl PartialEq for SocketFactory {
    fn eq(&self, other: &Self) -> bool {
        self.mark == other.mark && self.netns_inode() == other.netns_inode()
    }
}

impl Eq for SocketFactory {}

impl Hash for SocketFactory {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.mark.hash(state);
        self.netns_inode().hash(state);
    }
}

impl SocketFactory {
    /// The same options, in the namespace of `netns`.
    pub fn in_netns(&self, netns: Option<Arc<NetnsHandle>>) -> Self {
        Self {
            mark: self.mark,
            netns,
        }
    }

    pub fn netns_inode(&self) -> Option<u64> {
        self.netns.as_ref().map(|n| n.inode())
    }

    fn configure(&self, socket: Socket) -> io::Result<Socket> {
        socket.set_nonblocking(true)?;
        #[cfg(target_os = "linux")]
        if let Some(mark) = self.mark {
            socket.set_mark(mark)?;
        }
        Ok(socket)
    }

    fn new_socket(&self, addr: &SocketAddr) -> io::Result<Socket> {
        let domain = Domain::for_address(*addr);
        let socket = match &self.netns {
            Some(netns) => netns.tcp_socket_blocking(domain)?,
            None => new_tcp_socket(domain)?,
        };
        self.configure(socket)
    }

    async fn new_socket_async(&self, addr: &SocketAddr) -> io::Result<Socket> {
        let domain = Domain::for_address(*addr);
        let socket = match &self.netns {
            Some(netns) => netns.tcp_socket(domain).await?,
            None => new_tcp_socket(domain)?,
        };
        self.configure(socket)
    }

    /// A listening socket with SO_REUSEADDR and SO_REUSEPORT, as Istio's listeners.
    pub fn listen(&self, addr: SocketAddr) -> io::Result<TcpListener> {
        let socket = self.new_socket(&addr)?;
        socket.set_reuse_address(true)?;
        #[cfg(target_os = "linux")]
        socket.set_reuse_port(true)?;
        socket.bind(&addr.into())?;
        socket.listen(LISTEN_BACKLOG)?;
        TcpListener::from_std(socket.into())
    }

    /// Connect to `dest`, from `source` when given: the pod's own IP, or in-pod mode the
    /// client's IP on a connection to the app, so the app sees who really called
    /// (`IP_TRANSPARENT`, as Istio's ztunnel; the in-pod rules route the app's replies back).
    /// `avoid_port`: a source port this connection must not use — the client's own, when the
    /// client's connection to the same app was redirected inside the same pod (see below).
    pub async fn connect(
        &self,
        dest: SocketAddr,
        source: Option<IpAddr>,
        avoid_port: Option<u16>,
    ) -> io::Result<TcpStream> {
        let socket = self.new_socket_async(&dest).await?;
        if let Some(ip) = source {
            #[cfg(target_os = "linux")]
            if self.netns.is_some() {
                set_transparent(&socket, ip)?;
            }
            match avoid_port {
                // A plaintext client's connection to the app was redirected to us inside the
                // pod, so the pod's conntrack holds its tuple (client ip:port -> app). Our
                // connection to the app from the client's IP must not pick the same port:
                // conntrack would take it for the client's and both would stall (seen once in
                // ~28,000 connections by the soak; reproduced by hand). So the port is chosen
                // here, never the client's.
                Some(port) => bind_avoiding(&socket, ip, port)?,
                // Otherwise the kernel chooses the port at connect time, knowing the
                // destination: a port bound before connect cannot be shared across
                // destinations nor reuse TIME_WAIT ones, and a busy proxy connecting from one
                // IP would run out of them.
                None => {
                    #[cfg(target_os = "linux")]
                    set_bind_address_no_port(&socket)?;
                    socket.bind(&SocketAddr::new(ip, 0).into())?;
                }
            }
        }
        let socket = tokio::net::TcpSocket::from_std_stream(socket.into());
        let stream = socket.connect(dest).await?;
        tune_stream(&stream)?;
        Ok(stream)
    }
}

/// Linux's default ephemeral port range (`net.ipv4.ip_local_port_range`).
const EPHEMERAL_PORTS: std::ops::Range<u16> = 32768..61000;

/// Bind to `ip` and a random ephemeral port other than `avoid`.
fn bind_avoiding(socket: &Socket, ip: IpAddr, avoid: u16) -> io::Result<()> {
    socket.set_reuse_address(true)?;
    let mut last = io::Error::from(io::ErrorKind::AddrInUse);
    for _ in 0..16 {
        let port = rand::random_range(EPHEMERAL_PORTS);
        if port == avoid {
            continue;
        }
        match socket.bind(&SocketAddr::new(ip, port).into()) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => last = e,
            Err(e) => return Err(e),
        }
    }
    Err(last)
}

#[cfg(target_os = "linux")]
fn set_bind_address_no_port(socket: &Socket) -> io::Result<()> {
    set_int_option(socket, libc::IPPROTO_IP, libc::IP_BIND_ADDRESS_NO_PORT)
}

/// Set a boolean socket option socket2 does not offer.
#[cfg(target_os = "linux")]
fn set_int_option(socket: &Socket, level: libc::c_int, name: libc::c_int) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let one: libc::c_int = 1;
    // SAFETY: a valid socket descriptor and a c_int option value of the declared size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Allow binding a non-local source address (the client's IP on the connection to the app).
#[cfg(target_os = "linux")]
fn set_transparent(socket: &Socket, ip: IpAddr) -> io::Result<()> {
    if ip.is_ipv4() {
        socket.set_ip_transparent_v4(true)
    } else {
        socket.set_ip_transparent_v6(true)
    }
}

/// Where a redirected connection was going before the in-pod rules sent it to us
/// (`SO_ORIGINAL_DST`, set by the iptables REDIRECT of istio-cni's rules).
#[cfg(target_os = "linux")]
pub fn original_destination(stream: &TcpStream) -> io::Result<SocketAddr> {
    let sock = SockRef::from(stream);
    let addr = if stream.local_addr()?.is_ipv4() {
        sock.original_dst_v4()?
    } else {
        sock.original_dst_v6()?
    };
    addr.as_socket()
        .ok_or_else(|| io::Error::other("SO_ORIGINAL_DST is not an IP address"))
}

/// Options every proxied TCP stream gets: no Nagle delay (HBONE frames are already batched) and
/// keepalive.
pub fn tune_stream(stream: &TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let keepalive = TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL);
    SockRef::from(stream).set_tcp_keepalive(&keepalive)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_chosen_to_avoid_the_clients_is_never_the_clients() {
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        for avoid in [EPHEMERAL_PORTS.start, 40000, EPHEMERAL_PORTS.end - 1] {
            for _ in 0..200 {
                let socket = new_tcp_socket(Domain::IPV4).unwrap();
                bind_avoiding(&socket, ip, avoid).unwrap();
                let port = socket.local_addr().unwrap().as_socket().unwrap().port();
                assert_ne!(port, avoid);
                assert!(EPHEMERAL_PORTS.contains(&port));
            }
        }
    }
}
