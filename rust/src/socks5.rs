//! SOCKS5 (RFC 1928), the outbound entry of loopback mode where nothing captures traffic: an
//! application asks its ztunnel to CONNECT somewhere, by address or by name. Only what Istio's
//! ztunnel supports: no authentication, the CONNECT command, IPv4, IPv6 and domain names.
//! The reply is sent only once the far side is established, so a refused connection is visible
//! to the application as a SOCKS error, not as a connection that closes at once.

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const VERSION: u8 = 5;
const NO_AUTHENTICATION: u8 = 0;
const NO_ACCEPTABLE_METHOD: u8 = 0xFF;
const CMD_CONNECT: u8 = 1;
const ATYP_IPV4: u8 = 1;
const ATYP_DOMAIN: u8 = 3;
const ATYP_IPV6: u8 = 4;
/// A client that has not finished asking within this time is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Reply codes of RFC 1928 section 6.
#[derive(Clone, Copy, Debug)]
pub enum Reply {
    Succeeded = 0,
    GeneralFailure = 1,
    NotAllowed = 2,
    HostUnreachable = 4,
    ConnectionRefused = 5,
    CommandNotSupported = 7,
    AddressTypeNotSupported = 8,
}

/// Where the client asked to go.
#[derive(Clone, Debug)]
pub enum Destination {
    Address(SocketAddr),
    Name(String, u16),
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Destination::Address(addr) => write!(f, "{addr}"),
            Destination::Name(name, port) => write!(f, "{name}:{port}"),
        }
    }
}

fn protocol_error(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("SOCKS5: {what}"))
}

/// Read the greeting and the request. Errors name what was wrong; the client has been answered
/// where the protocol has an answer for it.
pub async fn accept(stream: &mut TcpStream) -> io::Result<Destination> {
    tokio::time::timeout(HANDSHAKE_TIMEOUT, negotiate(stream))
        .await
        .map_err(|_| protocol_error(format!("no request within {HANDSHAKE_TIMEOUT:?}")))?
}

async fn negotiate(stream: &mut TcpStream) -> io::Result<Destination> {
    let mut header = [0u8; 2];
    stream.read_exact(&mut header).await?;
    if header[0] != VERSION {
        return Err(protocol_error(format!(
            "version {} (expected 5)",
            header[0]
        )));
    }
    let mut methods = vec![0u8; header[1] as usize];
    stream.read_exact(&mut methods).await?;
    if !methods.contains(&NO_AUTHENTICATION) {
        stream.write_all(&[VERSION, NO_ACCEPTABLE_METHOD]).await?;
        return Err(protocol_error(
            "client offers no 'no authentication' method".into(),
        ));
    }
    stream.write_all(&[VERSION, NO_AUTHENTICATION]).await?;

    let mut request = [0u8; 4];
    stream.read_exact(&mut request).await?;
    if request[0] != VERSION {
        return Err(protocol_error(format!("request version {}", request[0])));
    }
    let destination = match request[3] {
        ATYP_IPV4 => {
            let mut ip = [0u8; 4];
            stream.read_exact(&mut ip).await?;
            let port = stream.read_u16().await?;
            Destination::Address(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), port))
        }
        ATYP_IPV6 => {
            let mut ip = [0u8; 16];
            stream.read_exact(&mut ip).await?;
            let port = stream.read_u16().await?;
            Destination::Address(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), port))
        }
        ATYP_DOMAIN => {
            let len = stream.read_u8().await? as usize;
            let mut name = vec![0u8; len];
            stream.read_exact(&mut name).await?;
            let port = stream.read_u16().await?;
            let name = String::from_utf8(name)
                .map_err(|_| protocol_error("domain name is not UTF-8".into()))?;
            // A client may send an address as a "name"; treat it as the address it is.
            match name.parse::<IpAddr>() {
                Ok(ip) => Destination::Address(SocketAddr::new(ip, port)),
                Err(_) => Destination::Name(name, port),
            }
        }
        other => {
            reply(stream, Reply::AddressTypeNotSupported).await?;
            return Err(protocol_error(format!("address type {other}")));
        }
    };
    // Refused only once the whole request is read: closing with the client's address still
    // unread would reset the connection, and the client might lose the reply that says why.
    if request[1] != CMD_CONNECT {
        reply(stream, Reply::CommandNotSupported).await?;
        return Err(protocol_error(format!(
            "command {} (only CONNECT)",
            request[1]
        )));
    }
    Ok(destination)
}

/// Answer the request. The bound address is not meaningful for a proxy; send zeros, as is usual.
pub async fn reply(stream: &mut TcpStream, code: Reply) -> io::Result<()> {
    stream
        .write_all(&[VERSION, code as u8, 0, ATYP_IPV4, 0, 0, 0, 0, 0, 0])
        .await
}
