//! UDP sockets, bound or connected: saved with the address their
//! application bound (the virtual one of a multiplexed port) and options,
//! made again on restore, bound through the caller (a new real port for a
//! multiplexed one). A connected socket's peer is the kernel's: datagram
//! routing rewrites below the socket. Datagrams queued at the snapshot
//! are not saved.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::sys::socket::{
    connect, getpeername, getsockname, getsockopt, setsockopt, sockopt, SockaddrStorage,
};

use super::Stub;
use crate::error::{ListenError, RestoreError, SnapshotError};
use crate::image::model::{FdImage, FdKind, UdpSocket};

fn inet(a: &SockaddrStorage) -> Option<SocketAddr> {
    a.as_sockaddr_in()
        .map(|a| SocketAddr::V4((*a).into()))
        .or_else(|| a.as_sockaddr_in6().map(|a| SocketAddr::V6((*a).into())))
}

/// A UDP socket of the process (our duplicate of it); `virtualize` maps
/// its real address to the one its application bound.
pub fn save(
    pid: u32,
    fd: i32,
    sock: &OwnedFd,
    flags: i32,
    virtualize: &dyn Fn(SocketAddr) -> SocketAddr,
) -> Result<FdKind, SnapshotError> {
    let e = |call: &'static str| move |e: nix::Error| SnapshotError::fd_call(pid, fd, call, e);
    let local: SockaddrStorage = getsockname(sock.as_raw_fd()).map_err(e("getsockname"))?;
    let local = inet(&local).ok_or_else(|| SnapshotError::UnsupportedFd {
        pid,
        fd,
        what: "UDP socket of an unknown family".into(),
    })?;
    let peer = getpeername::<SockaddrStorage>(sock.as_raw_fd())
        .ok()
        .as_ref()
        .and_then(inet);
    Ok(FdKind::Udp(UdpSocket {
        addr: virtualize(local).to_string(),
        peer: peer.map(|p| p.to_string()),
        flags,
        v6only: local.is_ipv6()
            && getsockopt(sock, sockopt::Ipv6V6Only).map_err(e("IPV6_V6ONLY"))?,
        reuseaddr: getsockopt(sock, sockopt::ReuseAddr).map_err(e("SO_REUSEADDR"))?,
        reuseport: getsockopt(sock, sockopt::ReusePort).map_err(e("SO_REUSEPORT"))?,
        broadcast: getsockopt(sock, sockopt::Broadcast).map_err(e("SO_BROADCAST"))?,
        // The kernel reports twice what was asked for.
        sndbuf: (getsockopt(sock, sockopt::SndBuf).map_err(e("SO_SNDBUF"))? / 2) as u32,
        rcvbuf: (getsockopt(sock, sockopt::RcvBuf).map_err(e("SO_RCVBUF"))? / 2) as u32,
    }))
}

/// Makes the UDP socket `u` of `f` in the stub: options, bind (by
/// `bind`), connect.
pub fn restore(
    stub: &Stub,
    f: &FdImage,
    u: &UdpSocket,
    bind: &dyn Fn(SocketAddr, OwnedFd) -> Result<(), ListenError>,
) -> Result<(), SnapshotError> {
    let Stub { inj, pid, .. } = *stub;
    let parse = |a: &str| {
        a.parse::<SocketAddr>()
            .map_err(|_| RestoreError::BadAddress {
                fd: f.fd,
                addr: a.to_string(),
            })
    };
    let local = parse(&u.addr)?;
    let peer = u.peer.as_deref().map(parse).transpose()?;
    let domain = if local.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    let kind = (libc::SOCK_DGRAM | libc::SOCK_CLOEXEC) as u64;
    let temp =
        (stub.to_high)(inj.ok(pid, "socket", libc::SYS_socket, &[domain as u64, kind, 0])?)?;
    let pfd = appshot_sys::pidfd::open_thread(pid)
        .map_err(|e| SnapshotError::process(pid, "pidfd_open", e))?;
    let s = appshot_sys::pidfd::get_fd(&pfd, temp as i32)
        .map_err(|e| SnapshotError::process(pid, format!("pidfd_getfd {temp}"), e))?;
    let fail = |what: &str| {
        let what = format!("fd {}: UDP socket {local}: {what}", f.fd);
        move |e: nix::Error| SnapshotError::process(pid, what, e)
    };
    if local.is_ipv6() {
        setsockopt(&s, sockopt::Ipv6V6Only, &u.v6only).map_err(fail("IPV6_V6ONLY"))?;
    }
    setsockopt(&s, sockopt::ReuseAddr, &u.reuseaddr).map_err(fail("SO_REUSEADDR"))?;
    setsockopt(&s, sockopt::ReusePort, &u.reuseport).map_err(fail("SO_REUSEPORT"))?;
    setsockopt(&s, sockopt::Broadcast, &u.broadcast).map_err(fail("SO_BROADCAST"))?;
    setsockopt(&s, sockopt::SndBuf, &(u.sndbuf as usize)).map_err(fail("SO_SNDBUF"))?;
    setsockopt(&s, sockopt::RcvBuf, &(u.rcvbuf as usize)).map_err(fail("SO_RCVBUF"))?;
    if local.port() != 0 || !local.ip().is_unspecified() {
        let ours = s.try_clone().map_err(|e| {
            SnapshotError::process(pid, format!("fd {}: duplicating the UDP socket", f.fd), e)
        })?;
        bind(local, ours).map_err(|error| RestoreError::Udp {
            fd: f.fd,
            addr: local,
            error,
        })?;
    }
    if let Some(peer) = peer {
        connect(s.as_raw_fd(), &SockaddrStorage::from(peer))
            .map_err(fail(&format!("connect to {peer}")))?;
    }
    (stub.place)(temp, f, u.flags)?;
    inj.call(pid, libc::SYS_close, &[temp])?;
    Ok(())
}
