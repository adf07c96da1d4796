//! TCP repair mode (`TCP_REPAIR`): reading an established connection's
//! state and queues, and rebuilding it on a new socket without a handshake.

use std::io;
use std::os::fd::AsRawFd;

use crate::net::{get_int_opt, set_int_opt};

/// `TCP_REPAIR` values.
const REPAIR_ON: i32 = 1;
const REPAIR_OFF: i32 = 0;
const REPAIR_OFF_NO_WP: i32 = -1;
/// `TCP_REPAIR_QUEUE` values.
const RECV_QUEUE: i32 = 1;
const SEND_QUEUE: i32 = 2;
/// `SIOCOUTQNSD`: bytes of the send queue not sent yet.
const SIOCOUTQNSD: libc::c_ulong = 0x894B;
/// `tcpi_options` bits.
pub const OPT_TIMESTAMPS: u8 = 1;
pub const OPT_SACK: u8 = 2;
pub const OPT_WSCALE: u8 = 4;
/// TCP option kinds for `TCP_REPAIR_OPTIONS`.
const TCPOPT_MAXSEG: u32 = 2;
const TCPOPT_WINDOW: u32 = 3;
const TCPOPT_SACK_PERM: u32 = 4;
const TCPOPT_TIMESTAMP: u32 = 8;

/// `struct tcp_repair_window` (linux/tcp.h).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RepairWindow {
    pub snd_wl1: u32,
    pub snd_wnd: u32,
    pub max_window: u32,
    pub rcv_wnd: u32,
    pub rcv_wup: u32,
}

/// `struct tcp_repair_opt` (linux/tcp.h).
#[repr(C)]
#[derive(Clone, Copy)]
struct RepairOpt {
    opt_code: u32,
    opt_val: u32,
}

/// The head of `struct tcp_info`: state and negotiated options.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Info {
    /// `TCP_ESTABLISHED` = 1, …
    pub state: u8,
    /// `OPT_*` bits.
    pub options: u8,
    pub snd_wscale: u8,
    pub rcv_wscale: u8,
}

/// Which queue the queue calls act on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Queue {
    Recv,
    Send,
}

impl Queue {
    fn id(self) -> i32 {
        match self {
            Queue::Recv => RECV_QUEUE,
            Queue::Send => SEND_QUEUE,
        }
    }
}

/// Options negotiated at the handshake, given back to a repaired socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Negotiated {
    pub mss: u32,
    /// (send, receive) window scale, if negotiated.
    pub wscale: Option<(u8, u8)>,
    pub sack: bool,
    pub timestamps: bool,
}

pub fn repair_on(fd: &impl AsRawFd) -> io::Result<()> {
    set_int_opt(fd, libc::IPPROTO_TCP, libc::TCP_REPAIR, REPAIR_ON)
}

/// Leaves repair mode; `probe` sends a window probe so the peer learns
/// the connection goes on (after a restore), without it nothing is sent
/// (a connection that was only read).
pub fn repair_off(fd: &impl AsRawFd, probe: bool) -> io::Result<()> {
    let v = if probe { REPAIR_OFF } else { REPAIR_OFF_NO_WP };
    set_int_opt(fd, libc::IPPROTO_TCP, libc::TCP_REPAIR, v)
}

pub fn info(fd: &impl AsRawFd) -> io::Result<Info> {
    let mut b = [0u8; 8];
    let mut len = b.len() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `b`, a live
    // buffer of that size, and updates `len`.
    let ret = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            b.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Info {
        state: b[0],
        options: b[5],
        // `tcpi_snd_wscale:4, tcpi_rcv_wscale:4`, low bits first.
        snd_wscale: b[6] & 0xf,
        rcv_wscale: b[6] >> 4,
    })
}

fn ioctl_int(fd: &impl AsRawFd, req: libc::c_ulong) -> io::Result<u32> {
    let mut v: libc::c_int = 0;
    // SAFETY: these ioctls write one int into `v`, a live int.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), req, &mut v as *mut libc::c_int) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(v as u32)
}

/// (bytes in the send queue, of which not sent yet, bytes in the receive
/// queue).
pub fn queue_lengths(fd: &impl AsRawFd) -> io::Result<(u32, u32, u32)> {
    Ok((
        ioctl_int(fd, libc::TIOCOUTQ)?,
        ioctl_int(fd, SIOCOUTQNSD)?,
        ioctl_int(fd, libc::FIONREAD)?,
    ))
}

pub fn select_queue(fd: &impl AsRawFd, q: Queue) -> io::Result<()> {
    set_int_opt(fd, libc::IPPROTO_TCP, libc::TCP_REPAIR_QUEUE, q.id())
}

/// The sequence number after the last byte of `q` (selected first).
pub fn queue_seq(fd: &impl AsRawFd, q: Queue) -> io::Result<u32> {
    select_queue(fd, q)?;
    Ok(get_int_opt(fd, libc::IPPROTO_TCP, libc::TCP_QUEUE_SEQ)? as u32)
}

/// Sets the sequence number of the first byte `q` will hold.
pub fn set_queue_seq(fd: &impl AsRawFd, q: Queue, seq: u32) -> io::Result<()> {
    select_queue(fd, q)?;
    set_int_opt(fd, libc::IPPROTO_TCP, libc::TCP_QUEUE_SEQ, seq as i32)
}

/// The `len` bytes of queue `q`, left in place.
pub fn peek_queue(fd: &impl AsRawFd, q: Queue, len: u32) -> io::Result<Vec<u8>> {
    select_queue(fd, q)?;
    let mut buf = vec![0u8; len as usize];
    if len == 0 {
        return Ok(buf);
    }
    // SAFETY: recv writes at most `buf.len()` bytes into `buf`, a live
    // buffer of that size.
    let n = unsafe {
        libc::recv(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(buf)
}

/// Writes `data` whole; in repair mode into the selected queue. A
/// repaired receive queue takes one linear buffer per call, so chunks
/// the kernel refuses are halved.
pub fn send_all(fd: &impl AsRawFd, data: &[u8]) -> io::Result<()> {
    let mut off = 0;
    let mut chunk = data.len().max(1);
    while off < data.len() {
        let len = chunk.min(data.len() - off);
        // SAFETY: send reads `len` bytes of `data` from `off`, inside the
        // live slice.
        let n = unsafe { libc::send(fd.as_raw_fd(), data[off..].as_ptr().cast(), len, 0) };
        if n <= 0 {
            let err = io::Error::last_os_error();
            if chunk > 1024 {
                chunk /= 2;
                continue;
            }
            return Err(err);
        }
        off += n as usize;
    }
    Ok(())
}

pub fn mss(fd: &impl AsRawFd) -> io::Result<u32> {
    Ok(get_int_opt(fd, libc::IPPROTO_TCP, libc::TCP_MAXSEG)? as u32)
}

pub fn timestamp(fd: &impl AsRawFd) -> io::Result<u32> {
    Ok(get_int_opt(fd, libc::IPPROTO_TCP, libc::TCP_TIMESTAMP)? as u32)
}

pub fn set_timestamp(fd: &impl AsRawFd, ts: u32) -> io::Result<()> {
    set_int_opt(fd, libc::IPPROTO_TCP, libc::TCP_TIMESTAMP, ts as i32)
}

pub fn window(fd: &impl AsRawFd) -> io::Result<RepairWindow> {
    let mut w = RepairWindow::default();
    let mut len = std::mem::size_of::<RepairWindow>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `w`, a live
    // repr(C) struct of that size, and updates `len`.
    let ret = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_REPAIR_WINDOW,
            (&mut w as *mut RepairWindow).cast(),
            &mut len,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(w)
}

pub fn set_window(fd: &impl AsRawFd, w: &RepairWindow) -> io::Result<()> {
    // SAFETY: setsockopt reads size_of::<RepairWindow>() bytes from `w`, a
    // live repr(C) struct.
    let ret = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_REPAIR_WINDOW,
            (w as *const RepairWindow).cast(),
            std::mem::size_of::<RepairWindow>() as libc::socklen_t,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Gives a repaired, connected socket the options its handshake had.
pub fn set_negotiated(fd: &impl AsRawFd, n: &Negotiated) -> io::Result<()> {
    let mut opts = vec![RepairOpt {
        opt_code: TCPOPT_MAXSEG,
        opt_val: n.mss,
    }];
    if let Some((snd, rcv)) = n.wscale {
        opts.push(RepairOpt {
            opt_code: TCPOPT_WINDOW,
            opt_val: u32::from(snd) | (u32::from(rcv) << 16),
        });
    }
    if n.sack {
        opts.push(RepairOpt {
            opt_code: TCPOPT_SACK_PERM,
            opt_val: 0,
        });
    }
    if n.timestamps {
        opts.push(RepairOpt {
            opt_code: TCPOPT_TIMESTAMP,
            opt_val: 0,
        });
    }
    // SAFETY: setsockopt reads `opts.len()` repr(C) `tcp_repair_opt`
    // structs from the live vector.
    let ret = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_REPAIR_OPTIONS,
            opts.as_ptr().cast(),
            (opts.len() * std::mem::size_of::<RepairOpt>()) as libc::socklen_t,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    /// A loopback connection with bytes queued both ways is read in
    /// repair mode and rebuilt on a new socket; both ends go on.
    #[test]
    fn a_connection_is_rebuilt_in_repair_mode() {
        if !is_root() {
            return;
        }
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (server, _) = l.accept().unwrap();
        client.write_all(b"to server").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));

        repair_on(&server).unwrap();
        let i = info(&server).unwrap();
        assert_eq!(i.state, 1);
        let (outq, unsent, inq) = queue_lengths(&server).unwrap();
        assert_eq!((outq, unsent, inq), (0, 0, 9));
        let snd = queue_seq(&server, Queue::Send).unwrap();
        let rcv = queue_seq(&server, Queue::Recv).unwrap();
        let data = peek_queue(&server, Queue::Recv, inq).unwrap();
        let neg = Negotiated {
            mss: mss(&server).unwrap(),
            wscale: (i.options & OPT_WSCALE != 0).then_some((i.snd_wscale, i.rcv_wscale)),
            sack: i.options & OPT_SACK != 0,
            timestamps: i.options & OPT_TIMESTAMPS != 0,
        };
        let ts = timestamp(&server).unwrap();
        let w = window(&server).unwrap();
        let local = server.local_addr().unwrap();
        let peer = server.peer_addr().unwrap();
        drop(server);

        let s = std::net::TcpStream::from(new_socket());
        repair_on(&s).unwrap();
        set_queue_seq(&s, Queue::Send, snd).unwrap();
        set_queue_seq(&s, Queue::Recv, rcv - inq).unwrap();
        bind_connect(&s, local, peer);
        set_negotiated(&s, &neg).unwrap();
        set_timestamp(&s, ts).unwrap();
        select_queue(&s, Queue::Recv).unwrap();
        send_all(&s, &data).unwrap();
        set_window(&s, &w).unwrap();
        repair_off(&s, true).unwrap();
        let mut s = s;
        let mut got = [0u8; 9];
        s.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"to server");
        s.write_all(b"back").unwrap();
        let mut back = [0u8; 4];
        client.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"back");
    }

    fn is_root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    fn new_socket() -> std::os::fd::OwnedFd {
        use std::os::fd::FromRawFd;
        // SAFETY: socket returns a new fd we own, checked below.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        assert!(fd >= 0);
        // SAFETY: `fd` is a new, open fd owned by nobody else.
        unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }
    }

    fn bind_connect(s: &TcpStream, local: std::net::SocketAddr, peer: std::net::SocketAddr) {
        let enc = |a: std::net::SocketAddr| {
            let std::net::SocketAddr::V4(a) = a else {
                panic!("v4")
            };
            let mut b = vec![0u8; 16];
            b[0..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
            b[2..4].copy_from_slice(&a.port().to_be_bytes());
            b[4..8].copy_from_slice(&a.ip().octets());
            b
        };
        let fd = std::os::fd::OwnedFd::from(s.try_clone().unwrap());
        crate::net::bind_raw(&fd, &enc(local)).unwrap();
        crate::net::connect_raw(&fd, &enc(peer)).unwrap();
    }
}
