//! TCP sockets that are not connected (listening, bound or new): saved
//! with the address the application believes it bound and their options;
//! on restore a new socket is handed to the caller (`RestoreHooks::listen`),
//! which binds a real port standing for that address and listens.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};

use appshot_sys::pidfd;
use nix::sys::socket::{getpeername, getsockname, getsockopt, sockopt, SockType, SockaddrStorage};

use super::Stub;
use crate::error::SnapshotError;
use crate::image::model::{FdImage, FdKind};

/// A listening socket the caller must set up on a new TCP socket of the
/// process (given to it as a duplicate): options, a real port that stands
/// for `addr`, listen.
pub struct ListenSpec {
    /// Port 0: the socket was never bound.
    pub addr: SocketAddr,
    /// Listening, or only bound.
    pub listen: bool,
    pub v6only: bool,
    pub reuseaddr: bool,
    pub reuseport: bool,
}

/// An unconnected TCP socket. Connected ones (established connections)
/// cannot be saved yet. `virtualize` maps its real address to the one its
/// application believes it bound.
pub fn save(
    sock: &OwnedFd,
    flags: i32,
    virtualize: &dyn Fn(SocketAddr) -> SocketAddr,
) -> Result<FdKind, String> {
    let listening = getsockopt(sock, sockopt::AcceptConn).map_err(|e| e.to_string())?;
    let connected = getpeername::<SockaddrStorage>(sock.as_raw_fd()).is_ok();
    let stype = getsockopt(sock, sockopt::SockType).map_err(|e| e.to_string())?;
    let local: SockaddrStorage = getsockname(sock.as_raw_fd()).map_err(|e| e.to_string())?;
    let addr: Option<SocketAddr> = local
        .as_sockaddr_in()
        .map(|a| SocketAddr::V4((*a).into()))
        .or_else(|| local.as_sockaddr_in6().map(|a| SocketAddr::V6((*a).into())));
    let Some(addr) = addr.filter(|_| !connected && stype == SockType::Stream) else {
        return Err("only unconnected TCP sockets (listening, bound or new) can be saved yet; established connections, UDP and Unix sockets cannot".into());
    };
    Ok(FdKind::TcpSocket {
        addr: virtualize(addr).to_string(),
        listening,
        flags,
        v6only: addr.is_ipv6()
            && getsockopt(sock, sockopt::Ipv6V6Only).map_err(|e| e.to_string())?,
        reuseaddr: getsockopt(sock, sockopt::ReuseAddr).map_err(|e| e.to_string())?,
        reuseport: getsockopt(sock, sockopt::ReusePort).map_err(|e| e.to_string())?,
    })
}

/// Creates the TCP socket of `f` (an `FdKind::TcpSocket`) in the stub, has
/// `listen` set it up and places it.
pub fn restore(
    stub: &Stub,
    f: &FdImage,
    listen: &dyn Fn(&ListenSpec, OwnedFd) -> Result<(), String>,
) -> Result<(), SnapshotError> {
    let FdKind::TcpSocket {
        addr,
        listening,
        flags,
        v6only,
        reuseaddr,
        reuseport,
    } = &f.kind
    else {
        return Ok(());
    };
    let Stub { inj, pid, .. } = *stub;
    let to_high = stub.to_high;
    let addr: SocketAddr = addr
        .parse()
        .map_err(|_| SnapshotError::Restore(format!("fd {}: bad address {addr}", f.fd)))?;
    let spec = ListenSpec {
        addr,
        listen: *listening,
        v6only: *v6only,
        reuseaddr: *reuseaddr,
        reuseport: *reuseport,
    };
    let domain = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    let kind = (libc::SOCK_STREAM | libc::SOCK_CLOEXEC) as u64;
    let temp = to_high(inj.ok(pid, "socket", libc::SYS_socket, &[domain as u64, kind, 0])?)?;
    let pfd = pidfd::open_thread(pid).map_err(|e| SnapshotError::process(pid, "pidfd_open", e))?;
    let ours = pidfd::get_fd(&pfd, temp as i32)
        .map_err(|e| SnapshotError::process(pid, format!("pidfd_getfd {temp}"), e))?;
    listen(&spec, ours)
        .map_err(|e| SnapshotError::Restore(format!("fd {}: TCP socket for {addr}: {e}", f.fd)))?;
    (stub.place)(temp, f, *flags)?;
    inj.call(pid, libc::SYS_close, &[temp])?;
    Ok(())
}
