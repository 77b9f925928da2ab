//! Socket creation in one place, so the same proxy code serves loopback mode and in-pod mode:
//! where a socket is bound, which source address it uses, and the options Istio's ztunnel sets.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};
use tokio::net::{TcpListener, TcpStream};

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
}

impl SocketFactory {
    fn new_socket(&self, addr: &SocketAddr) -> io::Result<Socket> {
        let socket = Socket::new(
            Domain::for_address(*addr),
            Type::STREAM,
            Some(Protocol::TCP),
        )?;
        socket.set_nonblocking(true)?;
        #[cfg(target_os = "linux")]
        if let Some(mark) = self.mark {
            socket.set_mark(mark)?;
        }
        Ok(socket)
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

    /// Connect to `dest`, from `source` when given (the pod's own IP in loopback mode).
    pub async fn connect(&self, dest: SocketAddr, source: Option<IpAddr>) -> io::Result<TcpStream> {
        let socket = self.new_socket(&dest)?;
        if let Some(ip) = source {
            // Choose the source port at connect time, knowing the destination: a port bound
            // before connect cannot be shared across destinations nor reuse TIME_WAIT ones, and
            // a busy proxy connecting from one IP would run out of them.
            #[cfg(target_os = "linux")]
            set_bind_address_no_port(&socket)?;
            socket.bind(&SocketAddr::new(ip, 0).into())?;
        }
        let socket = tokio::net::TcpSocket::from_std_stream(socket.into());
        let stream = socket.connect(dest).await?;
        tune_stream(&stream)?;
        Ok(stream)
    }
}

#[cfg(target_os = "linux")]
fn set_bind_address_no_port(socket: &Socket) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let one: libc::c_int = 1;
    // SAFETY: a valid socket descriptor and a c_int option value of the declared size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
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
