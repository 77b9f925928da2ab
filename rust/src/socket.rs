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
            Some(netns) => netns.tcp_socket(domain)?,
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
    /// `avoid_ports`: source ports this connection must not use — those of the clients from
    /// the same IP whose connections to the app were redirected inside the same pod (below).
    pub async fn connect(
        &self,
        dest: SocketAddr,
        source: Option<IpAddr>,
        avoid_ports: Option<&[u16]>,
    ) -> io::Result<TcpStream> {
        let (Some(ip), Some(avoid)) = (source, avoid_ports) else {
            // The kernel chooses the port at connect time, knowing the destination: a port
            // bound before connect cannot be shared across destinations nor reuse TIME_WAIT
            // ones, and a busy proxy connecting from one IP would run out of them.
            return self.connect_from(dest, source).await;
        };
        // A plaintext client's connection to the app was redirected to us inside the pod, so
        // the pod's conntrack holds its tuple (client ip:port -> app). A connection to the app
        // from the client's IP must not take the port of any such client: conntrack would take
        // it for that client's and the client's connection would stall (the soak lost a
        // long-lived connection this way about every five minutes; reproduced by hand). Nor
        // should a later client from that IP pick the port ours holds: its SYN would reach the
        // app's socket of our connection. So the port is chosen here, never one of the live
        // clients', and below the kernel's ephemeral range, where clients' ports come from.
        // A chosen port whose tuple is still in TIME_WAIT refuses the connect
        // (EADDRNOTAVAIL, which the kernel's own choice would have skipped): another is tried.
        let mut avoid = std::borrow::Cow::Borrowed(avoid);
        for _ in 0..CONNECT_TRIES {
            let socket = self.socket_from(dest, ip)?;
            let port = bind_avoiding(&socket, ip, &avoid)?;
            match self.finish_connect(socket, dest).await {
                Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => {
                    avoid.to_mut().push(port)
                }
                result => return result,
            }
        }
        Err(io::Error::new(
            io::ErrorKind::AddrNotAvailable,
            format!("no free source port from {ip} to {dest} in {CONNECT_TRIES} tries"),
        ))
    }

    /// Connect from `source` (when given) and a port the kernel chooses.
    async fn connect_from(
        &self,
        dest: SocketAddr,
        source: Option<IpAddr>,
    ) -> io::Result<TcpStream> {
        let Some(ip) = source else {
            let socket = self.new_socket(&dest)?;
            return self.finish_connect(socket, dest).await;
        };
        let socket = self.socket_from(dest, ip)?;
        #[cfg(target_os = "linux")]
        set_bind_address_no_port(&socket)?;
        socket.bind(&SocketAddr::new(ip, 0).into())?;
        self.finish_connect(socket, dest).await
    }

    /// A socket to connect to `dest` from `ip`: transparent in-pod, where `ip` may be the
    /// client's rather than the pod's.
    fn socket_from(&self, dest: SocketAddr, ip: IpAddr) -> io::Result<Socket> {
        let socket = self.new_socket(&dest)?;
        #[cfg(target_os = "linux")]
        if self.netns.is_some() {
            set_transparent(&socket, ip)?;
        }
        #[cfg(not(target_os = "linux"))]
        let _ = ip;
        Ok(socket)
    }

    async fn finish_connect(&self, socket: Socket, dest: SocketAddr) -> io::Result<TcpStream> {
        let socket = tokio::net::TcpSocket::from_std_stream(socket.into());
        let stream = socket.connect(dest).await?;
        tune_stream(&stream)?;
        Ok(stream)
    }
}

/// How many chosen ports a connection to the app tries before it fails.
const CONNECT_TRIES: usize = 7;

/// The source ports `bind_avoiding` chooses from: below Linux's default ephemeral range
/// (`net.ipv4.ip_local_port_range`, 32768-60999), from which clients' own ports come.
const CHOSEN_PORTS: std::ops::Range<u16> = 10000..32768;

/// Bind to `ip` and a port of `CHOSEN_PORTS`, none of `avoid`; returns the port. The ports are
/// tried in order from a random one, so a free one is found however many are avoided.
fn bind_avoiding(socket: &Socket, ip: IpAddr, avoid: &[u16]) -> io::Result<u16> {
    socket.set_reuse_address(true)?;
    let (first, len) = (CHOSEN_PORTS.start, CHOSEN_PORTS.len() as u16);
    let offset = rand::random_range(0..len);
    let mut last = io::Error::new(
        io::ErrorKind::AddrInUse,
        format!("every source port of {CHOSEN_PORTS:?} on {ip} is taken"),
    );
    let mut bind_failures = 0;
    for port in (0..len).map(|i| first + (offset + i) % len) {
        if avoid.contains(&port) {
            continue;
        }
        match socket.bind(&SocketAddr::new(ip, port).into()) {
            Ok(()) => return Ok(port),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse && bind_failures < 64 => {
                bind_failures += 1;
                last = e;
            }
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
    fn a_port_chosen_to_avoid_the_clients_is_never_one_of_theirs() {
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        // Three ports in four taken by clients: a free one is found every time, never one of theirs.
        let avoid: Vec<u16> = CHOSEN_PORTS.filter(|p| p % 4 != 0).collect();
        for _ in 0..200 {
            let socket = new_tcp_socket(Domain::IPV4).unwrap();
            bind_avoiding(&socket, ip, &avoid).unwrap();
            let port = socket.local_addr().unwrap().as_socket().unwrap().port();
            assert!(!avoid.contains(&port) && CHOSEN_PORTS.contains(&port));
        }
    }

    #[test]
    fn a_chosen_port_whose_tuple_is_taken_is_given_up_for_another() {
        // Two ports left to choose from; one's tuple to the destination is held by a live
        // connection, so a connect from it fails (EADDRNOTAVAIL): the other must be taken,
        // whichever is tried first (the choice is random: 20 rounds, each to a new destination).
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let source: IpAddr = "127.0.0.1".parse().unwrap();
            let [taken, free] = [CHOSEN_PORTS.start + 7, CHOSEN_PORTS.start + 11];
            let avoid: Vec<u16> = CHOSEN_PORTS
                .filter(|p| ![taken, free].contains(p))
                .collect();
            let factory = SocketFactory::default();
            for _ in 0..20 {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                let dest = listener.local_addr().unwrap();
                let holder = new_tcp_socket(Domain::IPV4).unwrap();
                holder.set_reuse_address(true).unwrap();
                holder.bind(&SocketAddr::new(source, taken).into()).unwrap();
                let _held = tokio::net::TcpSocket::from_std_stream(holder.into())
                    .connect(dest)
                    .await
                    .unwrap();
                let stream = factory
                    .connect(dest, Some(source), Some(&avoid))
                    .await
                    .unwrap();
                assert_eq!(stream.local_addr().unwrap().port(), free);
            }
        });
    }
}
