//! TCP sockets. Unconnected ones (listening, bound or new) are saved with
//! the address the application believes it bound and their options; on
//! restore a new socket is handed to the caller (`RestoreHooks::listen`),
//! which binds a real port standing for that address and listens.
//!
//! Connected ones are saved in repair mode (`TCP_REPAIR`, the way CRIU's
//! `--tcp-established` does): sequence numbers, both queues (the send
//! queue with its unsent tail), the handshake's options, the window. They
//! stay in repair mode until their process is killed (closing a socket in
//! repair mode sends nothing to the peer) or the dump is given up
//! ([`Repairs::resume`]). A restore that owns the connections rebuilds
//! them in repair mode with the same real addresses, without a handshake;
//! one that cannot own them (a copy beside the original, a clone) gives
//! the application a socket reset by its peer instead.

use std::cell::RefCell;
use std::collections::HashSet;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, OwnedFd};

use appshot_sys::net::set_int_opt;
use appshot_sys::pidfd;
use appshot_sys::tcprepair::{self as repair, Negotiated, Queue, RepairWindow};
use nix::sys::socket::{
    bind, connect, getpeername, getsockname, getsockopt, setsockopt, sockopt, SockType,
    SockaddrStorage,
};

use super::Stub;
use crate::error::{ListenError, RestoreError, SnapshotError};
use crate::image::model::{FdImage, FdKind, Manifest, TcpConn, TcpWindow};

/// `TCP_ESTABLISHED` in `tcp_info`.
const ESTABLISHED: u8 = 1;
/// The application shut its writing side down and the peer acknowledged
/// the FIN; the peer still sends.
const FIN_WAIT2: u8 = 5;
/// The peer shut its writing side down (its FIN was received); the
/// application still sends.
const CLOSE_WAIT: u8 = 8;

/// Whether a connection saved in `state` over `local` is rebuilt on a
/// restore that owns it: established ones, and half-closed ones over IPv4
/// (the FIN of the closed half is brought back with a forged segment,
/// which is built for IPv4 only).
fn rebuildable(state: u8, local: &str) -> bool {
    state == ESTABLISHED
        || (matches!(state, FIN_WAIT2 | CLOSE_WAIT)
            && local.parse::<SocketAddr>().is_ok_and(|a| a.is_ipv4()))
}

/// What a restore does with the image's connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Connections {
    /// Rebuild them with their real addresses: the restore of a stopped
    /// instance, whose connections nobody else holds.
    Own,
    /// Give the application sockets reset by their peer: copies (live
    /// snapshots restored beside their original, clones) and `--tcp-close`.
    Close,
}

/// The connected sockets a dump put in repair mode (duplicates of them).
#[derive(Default)]
pub struct Repairs(RefCell<Vec<OwnedFd>>);

impl Repairs {
    /// Takes every socket out of repair mode without sending anything: the
    /// instance runs on (a live snapshot, a failed dump).
    pub fn resume(self) {
        for fd in self.0.into_inner() {
            // A socket its process closed meanwhile needs nothing.
            let _ = repair::repair_off(&fd, false);
        }
    }
}

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
    /// The real port to take again (0: any the multiplexer picks).
    pub real_port: u16,
}

fn inet(a: &SockaddrStorage) -> Option<SocketAddr> {
    a.as_sockaddr_in()
        .map(|a| SocketAddr::V4((*a).into()))
        .or_else(|| a.as_sockaddr_in6().map(|a| SocketAddr::V6((*a).into())))
}

/// A TCP socket. `virtualize` maps a real address to the one its
/// application believes in. A connected one is put in repair mode and
/// recorded in `repairs`.
pub fn save(
    pid: u32,
    fd: i32,
    sock: &OwnedFd,
    flags: i32,
    virtualize: &dyn Fn(SocketAddr) -> SocketAddr,
    repairs: &Repairs,
) -> Result<FdKind, SnapshotError> {
    let call = |call: &'static str| move |e: nix::Error| SnapshotError::fd_call(pid, fd, call, e);
    let listening = getsockopt(sock, sockopt::AcceptConn).map_err(call("SO_ACCEPTCONN"))?;
    let peer = getpeername::<SockaddrStorage>(sock.as_raw_fd())
        .ok()
        .as_ref()
        .and_then(inet);
    let stype = getsockopt(sock, sockopt::SockType).map_err(call("SO_TYPE"))?;
    let local: SockaddrStorage = getsockname(sock.as_raw_fd()).map_err(call("getsockname"))?;
    let Some(addr) = inet(&local).filter(|_| stype == SockType::Stream) else {
        return Err(SnapshotError::UnsupportedFd {
            pid,
            fd,
            what: "only TCP and UDP sockets of the Internet families can be saved".into(),
        });
    };
    if let Some(peer) = peer {
        return save_connection(pid, fd, sock, flags, addr, peer, virtualize, repairs)
            .map(|c| FdKind::TcpConn(Box::new(c)));
    }
    Ok(FdKind::TcpSocket {
        addr: virtualize(addr).to_string(),
        listening,
        flags,
        v6only: addr.is_ipv6()
            && getsockopt(sock, sockopt::Ipv6V6Only).map_err(call("IPV6_V6ONLY"))?,
        reuseaddr: getsockopt(sock, sockopt::ReuseAddr).map_err(call("SO_REUSEADDR"))?,
        reuseport: getsockopt(sock, sockopt::ReusePort).map_err(call("SO_REUSEPORT"))?,
        real_port: addr.port(),
    })
}

#[allow(clippy::too_many_arguments)]
fn save_connection(
    pid: u32,
    fd: i32,
    sock: &OwnedFd,
    flags: i32,
    local: SocketAddr,
    peer: SocketAddr,
    virtualize: &dyn Fn(SocketAddr) -> SocketAddr,
    repairs: &Repairs,
) -> Result<TcpConn, SnapshotError> {
    let ctx = |what: &'static str| {
        move |error: std::io::Error| SnapshotError::TcpConnection {
            pid,
            fd,
            local: local.to_string(),
            peer: peer.to_string(),
            what,
            error,
        }
    };
    let opt = |what: &'static str| {
        let ctx = ctx(what);
        move |e: nix::Error| ctx(e.into())
    };
    repair::repair_on(sock).map_err(ctx("TCP_REPAIR"))?;
    repairs
        .0
        .borrow_mut()
        .push(sock.try_clone().map_err(ctx("dup"))?);
    let info = repair::info(sock).map_err(ctx("TCP_INFO"))?;
    let nodelay = getsockopt(sock, sockopt::TcpNoDelay).map_err(opt("TCP_NODELAY"))?;
    let keepalive = getsockopt(sock, sockopt::KeepAlive).map_err(opt("SO_KEEPALIVE"))?;
    // The kernel reports twice what was asked for.
    let sndbuf = (getsockopt(sock, sockopt::SndBuf).map_err(opt("SO_SNDBUF"))? / 2) as u32;
    let rcvbuf = (getsockopt(sock, sockopt::RcvBuf).map_err(opt("SO_RCVBUF"))? / 2) as u32;
    let mut conn = TcpConn {
        flags,
        local: local.to_string(),
        peer: peer.to_string(),
        local_virtual: virtualize(local).to_string(),
        peer_virtual: virtualize(peer).to_string(),
        state: info.state,
        snd_seq: 0,
        rcv_seq: 0,
        send: Vec::new(),
        unsent: 0,
        recv: Vec::new(),
        mss: 0,
        wscale: None,
        sack: false,
        timestamp: None,
        window: TcpWindow::default(),
        nodelay,
        keepalive,
        sndbuf,
        rcvbuf,
    };
    if !matches!(info.state, ESTABLISHED | FIN_WAIT2 | CLOSE_WAIT) {
        // Restored as reset by the peer; nothing more to read.
        return Ok(conn);
    }
    let (outq, unsent, inq) = repair::queue_lengths(sock).map_err(ctx("queue lengths"))?;
    conn.snd_seq = repair::queue_seq(sock, Queue::Send).map_err(ctx("send sequence"))?;
    conn.rcv_seq = repair::queue_seq(sock, Queue::Recv).map_err(ctx("receive sequence"))?;
    conn.send = repair::peek_queue(sock, Queue::Send, outq).map_err(ctx("send queue"))?;
    conn.recv = repair::peek_queue(sock, Queue::Recv, inq).map_err(ctx("receive queue"))?;
    if conn.send.len() != outq as usize || conn.recv.len() != inq as usize {
        return Err(SnapshotError::UnsupportedFd {
            pid,
            fd,
            what: format!(
                "TCP connection {local} -> {peer}: queues read short ({} of {outq} bytes to send, {} of {inq} received)",
                conn.send.len(),
                conn.recv.len()
            ),
        });
    }
    conn.unsent = unsent;
    // The sequence numbers are kept as after the last byte of data: a FIN
    // (sent and acknowledged in FIN_WAIT2, received in CLOSE_WAIT) takes
    // one more, and comes back on its own on restore.
    match info.state {
        FIN_WAIT2 => conn.snd_seq = conn.snd_seq.wrapping_sub(1),
        CLOSE_WAIT => conn.rcv_seq = conn.rcv_seq.wrapping_sub(1),
        _ => {}
    }
    conn.mss = repair::mss(sock).map_err(ctx("TCP_MAXSEG"))?;
    conn.wscale =
        (info.options & repair::OPT_WSCALE != 0).then_some((info.snd_wscale, info.rcv_wscale));
    conn.sack = info.options & repair::OPT_SACK != 0;
    if info.options & repair::OPT_TIMESTAMPS != 0 {
        conn.timestamp = Some(repair::timestamp(sock).map_err(ctx("TCP_TIMESTAMP"))?);
    }
    let w = repair::window(sock).map_err(ctx("TCP_REPAIR_WINDOW"))?;
    conn.window = TcpWindow {
        snd_wl1: w.snd_wl1,
        snd_wnd: w.snd_wnd,
        max_window: w.max_window,
        rcv_wnd: w.rcv_wnd,
        rcv_wup: w.rcv_wup,
    };
    Ok(conn)
}

/// Creates the TCP socket of `f` (an `FdKind::TcpSocket`) in the stub, has
/// `listen` set it up and places it.
pub fn restore(
    stub: &Stub,
    f: &FdImage,
    listen: &dyn Fn(&ListenSpec, OwnedFd) -> Result<(), ListenError>,
    owned_ports: &HashSet<u16>,
) -> Result<(), SnapshotError> {
    let FdKind::TcpSocket {
        addr,
        listening,
        flags,
        v6only,
        reuseaddr,
        reuseport,
        real_port,
    } = &f.kind
    else {
        return Ok(());
    };
    let Stub { inj, pid, .. } = *stub;
    let addr: SocketAddr = addr.parse().map_err(|_| RestoreError::BadAddress {
        fd: f.fd,
        addr: addr.clone(),
    })?;
    let spec = ListenSpec {
        addr,
        listen: *listening,
        v6only: *v6only,
        reuseaddr: *reuseaddr,
        reuseport: *reuseport,
        real_port: if owned_ports.contains(real_port) {
            *real_port
        } else {
            0
        },
    };
    let (temp, ours) = new_socket(stub, addr.is_ipv4())?;
    listen(&spec, ours).map_err(|error| RestoreError::Listen {
        fd: f.fd,
        addr,
        error,
    })?;
    (stub.place)(temp, f, *flags)?;
    inj.call(pid, libc::SYS_close, &[temp])?;
    Ok(())
}

/// The local real ports of the image's established connections.
pub fn connection_ports(m: &Manifest) -> HashSet<u16> {
    m.processes
        .iter()
        .flat_map(|p| &p.fds)
        .filter_map(|f| match &f.kind {
            FdKind::TcpConn(c) if rebuildable(c.state, &c.local) => {
                c.local.parse::<SocketAddr>().ok().map(|a| a.port())
            }
            _ => None,
        })
        .collect()
}

/// A new TCP socket made by the stub: its fd there (above the saved ones)
/// and our duplicate of it.
fn new_socket(stub: &Stub, v4: bool) -> Result<(u64, OwnedFd), SnapshotError> {
    let Stub { inj, pid, .. } = *stub;
    let domain = if v4 { libc::AF_INET } else { libc::AF_INET6 };
    let kind = (libc::SOCK_STREAM | libc::SOCK_CLOEXEC) as u64;
    let temp =
        (stub.to_high)(inj.ok(pid, "socket", libc::SYS_socket, &[domain as u64, kind, 0])?)?;
    let pfd = pidfd::open_thread(pid).map_err(|e| SnapshotError::process(pid, "pidfd_open", e))?;
    let ours = pidfd::get_fd(&pfd, temp as i32)
        .map_err(|e| SnapshotError::process(pid, format!("pidfd_getfd {temp}"), e))?;
    Ok((temp, ours))
}

/// Restores the connection `c` of `f` and places it: rebuilt in repair
/// mode when the restore owns it (and it was established), else a socket
/// reset by its peer.
pub fn restore_connection(
    stub: &Stub,
    f: &FdImage,
    c: &TcpConn,
    connections: Connections,
) -> Result<(), SnapshotError> {
    let pid = stub.pid;
    let parse = |a: &str| {
        a.parse::<SocketAddr>()
            .map_err(|_| RestoreError::BadAddress {
                fd: f.fd,
                addr: a.to_string(),
            })
    };
    let (local, peer) = (parse(&c.local)?, parse(&c.peer)?);
    let (temp, ours) = new_socket(stub, local.is_ipv4())?;
    let err = |what: &'static str| {
        move |error: std::io::Error| SnapshotError::TcpConnection {
            pid,
            fd: f.fd,
            local: c.local.clone(),
            peer: c.peer.clone(),
            what,
            error,
        }
    };
    if connections == Connections::Own && rebuildable(c.state, &c.local) {
        rebuild(&ours, c, local, peer).map_err(|(what, e)| err(what)(e))?;
    } else {
        if connections == Connections::Own {
            tracing::warn!(
                pid,
                fd = f.fd,
                "TCP connection {local} -> {peer} was in state {} (neither established nor half-closed over IPv4) at the snapshot: restored as reset",
                c.state
            );
        }
        reset(&ours, local.is_ipv4()).map_err(err("making a reset connection"))?;
    }
    (stub.place)(temp, f, c.flags)?;
    stub.inj.call(pid, libc::SYS_close, &[temp])?;
    Ok(())
}

type Step = (&'static str, std::io::Error);

/// The CRIU order that works here: sequence numbers, then bind and
/// connect (no packet in repair mode), the handshake's options, the
/// queues (receive, then the sent part of the send queue), the window,
/// out of repair mode, and the never-sent tail written as usual.
fn rebuild(s: &OwnedFd, c: &TcpConn, local: SocketAddr, peer: SocketAddr) -> Result<(), Step> {
    let at = |what: &'static str| move |e: std::io::Error| (what, e);
    let nix_at = |what: &'static str| move |e: nix::Error| (what, std::io::Error::from(e));
    repair::repair_on(s).map_err(at("TCP_REPAIR"))?;
    let send_len = c.send.len() as u32;
    repair::set_queue_seq(s, Queue::Send, c.snd_seq.wrapping_sub(send_len))
        .map_err(at("send sequence"))?;
    repair::set_queue_seq(s, Queue::Recv, c.rcv_seq.wrapping_sub(c.recv.len() as u32))
        .map_err(at("receive sequence"))?;
    bind(s.as_raw_fd(), &SockaddrStorage::from(local)).map_err(nix_at("bind"))?;
    connect(s.as_raw_fd(), &SockaddrStorage::from(peer)).map_err(nix_at("connect"))?;
    repair::set_negotiated(
        s,
        &Negotiated {
            mss: c.mss,
            wscale: c.wscale,
            sack: c.sack,
            timestamps: c.timestamp.is_some(),
        },
    )
    .map_err(at("TCP_REPAIR_OPTIONS"))?;
    if let Some(ts) = c.timestamp {
        repair::set_timestamp(s, ts).map_err(at("TCP_TIMESTAMP"))?;
    }
    // Room for the queues before they are refilled (else send blocks).
    let room = |saved: u32, len: usize| saved.max(len as u32 * 2).min(i32::MAX as u32) as i32;
    set_int_opt(
        s,
        libc::SOL_SOCKET,
        libc::SO_SNDBUFFORCE,
        room(c.sndbuf, c.send.len()),
    )
    .map_err(at("SO_SNDBUFFORCE"))?;
    set_int_opt(
        s,
        libc::SOL_SOCKET,
        libc::SO_RCVBUFFORCE,
        room(c.rcvbuf, c.recv.len()),
    )
    .map_err(at("SO_RCVBUFFORCE"))?;
    if !c.recv.is_empty() {
        repair::select_queue(s, Queue::Recv).map_err(at("receive queue"))?;
        repair::send_all(s, &c.recv).map_err(at("refilling the receive queue"))?;
    }
    let sent = c.send.len() - c.unsent as usize;
    if sent > 0 {
        repair::select_queue(s, Queue::Send).map_err(at("send queue"))?;
        repair::send_all(s, &c.send[..sent]).map_err(at("refilling the send queue"))?;
    }
    let w = &c.window;
    // The window was last advertised after the peer's FIN (CRIU's order).
    let fin_in = u32::from(c.state == CLOSE_WAIT);
    repair::set_window(
        s,
        &RepairWindow {
            snd_wl1: w.snd_wl1,
            snd_wnd: w.snd_wnd,
            max_window: w.max_window,
            rcv_wnd: w.rcv_wnd + fin_in,
            rcv_wup: w.rcv_wup.wrapping_sub(fin_in),
        },
    )
    .map_err(at("TCP_REPAIR_WINDOW"))?;
    if c.state != ESTABLISHED {
        restore_fin(s, c, local, peer)?;
    }
    setsockopt(s, sockopt::TcpNoDelay, &c.nodelay).map_err(nix_at("TCP_NODELAY"))?;
    setsockopt(s, sockopt::KeepAlive, &c.keepalive).map_err(nix_at("SO_KEEPALIVE"))?;
    repair::repair_off(s, true).map_err(at("leaving repair mode"))?;
    if c.unsent > 0 {
        repair::send_all(s, &c.send[sent..]).map_err(at("sending the unsent bytes"))?;
    }
    Ok(())
}

/// Brings back the FIN of a half-closed connection being rebuilt in repair
/// mode, as CRIU does: the application's own (FIN_WAIT2) is queued as sent
/// and the peer's ACK of it forged; the peer's (CLOSE_WAIT) is forged. The
/// forged segment goes from the peer's address to ours, marked so the
/// network lock lets it in; the socket is in its saved state once it has
/// been taken in.
fn restore_fin(s: &OwnedFd, c: &TcpConn, local: SocketAddr, peer: SocketAddr) -> Result<(), Step> {
    let (SocketAddr::V4(local), SocketAddr::V4(peer)) = (local, peer) else {
        return Err((
            "half-closed over IPv6",
            std::io::ErrorKind::Unsupported.into(),
        ));
    };
    let at = |what: &'static str| move |e: std::io::Error| (what, e);
    let window = (c.window.snd_wnd >> c.wscale.map_or(0, |w| w.0)).min(65535) as u16;
    let segment = if c.state == FIN_WAIT2 {
        repair::shutdown_sent(s).map_err(at("queueing our FIN"))?;
        repair::segment(
            peer,
            local,
            c.rcv_seq,
            c.snd_seq.wrapping_add(1),
            repair::TH_ACK,
            window,
        )
    } else {
        repair::segment(
            peer,
            local,
            c.rcv_seq,
            c.snd_seq.wrapping_sub(c.send.len() as u32),
            repair::TH_ACK | repair::TH_FIN,
            window,
        )
    };
    repair::inject(&segment, *local.ip()).map_err(at("forging the peer's segment"))?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        let state = repair::info(s).map_err(at("TCP_INFO"))?.state;
        if state == c.state {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            return Err((
                "the forged segment was not taken in",
                std::io::Error::other(format!("state {state}, wanted {}", c.state)),
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// Connects `s` over loopback to a listener of ours that resets the
/// connection at once: the application reads ECONNRESET, then EOF, as if
/// the real peer had reset it. Nothing reaches the real peer.
fn reset(s: &OwnedFd, v4: bool) -> std::io::Result<()> {
    let l = TcpListener::bind(if v4 { "127.0.0.1:0" } else { "[::1]:0" })?;
    connect(s.as_raw_fd(), &SockaddrStorage::from(l.local_addr()?))?;
    let (other, _) = l.accept()?;
    setsockopt(
        &other,
        sockopt::Linger,
        &libc::linger {
            l_onoff: 1,
            l_linger: 0,
        },
    )?;
    drop(other);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{ErrorKind, Read, Write};
    use std::net::TcpStream;
    use std::time::Duration;

    use nix::sys::socket::{socket, AddressFamily, SockFlag};

    fn pattern(i: usize) -> u8 {
        (i % 251) as u8
    }

    /// Bytes queued every way at the snapshot (sent but unacknowledged,
    /// never sent, received but unread) each arrive exactly once after
    /// the connection is saved, closed in repair mode and rebuilt.
    #[test]
    fn every_queued_byte_arrives_once_after_a_rebuild() {
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (server, _) = l.accept().unwrap();
        client.write_all(b"unread by the server").unwrap();
        // The server writes until the client's window and its own buffer
        // are full: the tail of its send queue is never sent.
        server.set_nonblocking(true).unwrap();
        let mut sent = 0;
        let mut w = &server;
        loop {
            let chunk: Vec<u8> = (sent..sent + 65536).map(pattern).collect();
            match w.write(&chunk) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
        std::thread::sleep(Duration::from_millis(100));
        let local = server.local_addr().unwrap();
        let peer = server.peer_addr().unwrap();
        let server = OwnedFd::from(server);
        let repairs = Repairs::default();
        let c = save_connection(1, 3, &server, 0, local, peer, &|a| a, &repairs).unwrap();
        assert_eq!(c.recv, b"unread by the server");
        assert!(c.unsent > 0, "nothing unsent in {} queued", c.send.len());
        drop(server);
        drop(repairs);

        let s = socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::empty(),
            None,
        )
        .unwrap();
        rebuild(&s, &c, local, peer).unwrap();
        let mut s = TcpStream::from(s);
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            let mut buf = vec![0u8; 1 << 16];
            while got.len() < sent {
                let n = client.read(&mut buf).unwrap();
                assert!(n > 0, "EOF after {} of {sent} bytes", got.len());
                got.extend_from_slice(&buf[..n]);
            }
            client.write_all(b"done").unwrap();
            got
        });
        let mut unread = [0u8; 20];
        s.read_exact(&mut unread).unwrap();
        assert_eq!(&unread, b"unread by the server");
        let got = reader.join().unwrap();
        assert_eq!(got.len(), sent);
        assert!(got.iter().enumerate().all(|(i, b)| *b == pattern(i)));
        let mut done = [0u8; 4];
        s.read_exact(&mut done).unwrap();
        assert_eq!(&done, b"done");
    }

    /// A connected pair over loopback: (client, server).
    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (server, _) = l.accept().unwrap();
        (client, server)
    }

    fn wait_state(s: &impl AsRawFd, state: u8) {
        for _ in 0..1000 {
            if repair::info(s).unwrap().state == state {
                return;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        panic!(
            "state {} never became {state}",
            repair::info(s).unwrap().state
        );
    }

    /// Saves `server`, closes it in repair mode and rebuilds it.
    fn save_and_rebuild(server: TcpStream, state: u8) -> (TcpConn, TcpStream) {
        let local = server.local_addr().unwrap();
        let peer = server.peer_addr().unwrap();
        let server = OwnedFd::from(server);
        let repairs = Repairs::default();
        let c = save_connection(1, 3, &server, 0, local, peer, &|a| a, &repairs).unwrap();
        assert_eq!(c.state, state);
        drop(server);
        drop(repairs);
        let s = socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::empty(),
            None,
        )
        .unwrap();
        rebuild(&s, &c, local, peer).unwrap();
        wait_state(&s, state);
        let s = TcpStream::from(s);
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        (c, s)
    }

    /// The application shut its writing side (FIN_WAIT2): the rebuilt
    /// socket still reads what the peer sent before and after, and may not
    /// write; the peer saw EOF once.
    #[test]
    fn a_connection_whose_writing_side_was_shut_keeps_reading_after_a_rebuild() {
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let (mut client, server) = pair();
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        (&server).write_all(b"last words").unwrap();
        server.shutdown(std::net::Shutdown::Write).unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"last words");
        wait_state(&server, FIN_WAIT2);
        client.write_all(b"unread ").unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let (c, mut s) = save_and_rebuild(server, FIN_WAIT2);
        assert_eq!(c.recv, b"unread ");
        client.write_all(b"and after").unwrap();
        drop(client);
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"unread and after");
        assert_eq!(
            s.write(b"x").map_err(|e| e.kind()),
            Err(ErrorKind::BrokenPipe)
        );
    }

    /// The peer shut its writing side (CLOSE_WAIT): the rebuilt socket
    /// reads the peer's last bytes, then EOF, and still writes to it.
    #[test]
    fn a_connection_whose_peer_shut_its_side_keeps_writing_after_a_rebuild() {
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let (mut client, server) = pair();
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        client.write_all(b"bye").unwrap();
        client.shutdown(std::net::Shutdown::Write).unwrap();
        wait_state(&server, CLOSE_WAIT);
        // Past any delayed ACK: the client never sends its FIN again.
        std::thread::sleep(Duration::from_millis(300));
        let (c, mut s) = save_and_rebuild(server, CLOSE_WAIT);
        assert_eq!(c.recv, b"bye");
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"bye");
        s.write_all(b"still here").unwrap();
        drop(s);
        let mut got = Vec::new();
        client.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"still here");
    }
}
