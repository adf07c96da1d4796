//! The real side of the policy's seam: the notifying task through its
//! seccomp notification ([`CallTask`]), and the host's syscalls on the
//! sockets the supervisor holds ([`Host`]).

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use appshot_sys::net::{connect_raw, get_int_opt};
use appshot_vpm::Protocol;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::socket::{
    getpeername, getsockname, getsockopt, sockopt, AddressFamily, SockType, SockaddrIn,
    SockaddrIn6, SockaddrLike, SockaddrStorage,
};

use super::policy::{Kernel, Task, TaskSocket};
use crate::seccomp::notify::Call;
use tracing::warn;

use crate::multiplex::sockaddr;
use crate::seccomp::astask;
use crate::tree;

/// Bit of CAP_NET_BIND_SERVICE in a capability set.
const CAP_NET_BIND_SERVICE: u64 = 1 << 10;
/// How long the host's own addresses are trusted before they are re-read.
const LOCAL_ADDRS_TTL: Duration = Duration::from_secs(2);

/// The task of a pending notification.
pub struct CallTask<'a>(pub &'a Call);

impl Task for CallTask<'_> {
    type Socket = OwnedFd;

    fn address(&self) -> Result<Vec<u8>, i32> {
        let call = self.0;
        let len = call.args[2] as u32 as usize;
        if len > sockaddr::MAX_LEN {
            return Err(libc::EINVAL);
        }
        call.read(call.args[1], len)
    }

    fn socket(&self) -> Result<TaskSocket<OwnedFd>, i32> {
        let call = self.0;
        let fd = call.task_fd(call.int_arg(0))?;
        let local: SockaddrStorage = getsockname(fd.as_raw_fd()).map_err(|e| e as i32)?;
        let domain = match local.family() {
            Some(AddressFamily::Inet) => libc::AF_INET,
            Some(AddressFamily::Inet6) => libc::AF_INET6,
            _ => return Ok(TaskSocket::Other(fd)),
        };
        Ok(TaskSocket::Inet {
            socket: fd,
            domain,
            local: to_std(&local),
        })
    }

    fn protocol(&self, socket: &OwnedFd) -> Result<Option<Protocol>, i32> {
        Ok(
            match getsockopt(socket, sockopt::SockType).map_err(|e| e as i32)? {
                SockType::Stream => Some(Protocol::Tcp),
                SockType::Datagram
                    if get_int_opt(socket, libc::SOL_SOCKET, libc::SO_PROTOCOL)
                        .map_err(errno)?
                        == libc::IPPROTO_UDP =>
                {
                    Some(Protocol::Udp)
                }
                _ => None,
            },
        )
    }

    fn may_bind_privileged(&self) -> bool {
        astask::effective_caps(self.0.tid) & CAP_NET_BIND_SERVICE != 0
    }
}

/// This host, for the instance whose namespace init is `init_pid`.
pub struct Host {
    init_pid: u32,
    local_addrs: Mutex<(Instant, HashSet<IpAddr>)>,
}

impl Host {
    pub fn new(init_pid: u32) -> Host {
        Host {
            init_pid,
            local_addrs: Mutex::new((Instant::now() - LOCAL_ADDRS_TTL, HashSet::new())),
        }
    }
}

impl Kernel for Host {
    type Socket = OwnedFd;

    fn bind(&self, socket: &OwnedFd, addr: SocketAddr) -> Result<(), i32> {
        let r = match addr {
            SocketAddr::V4(a) => nix::sys::socket::bind(socket.as_raw_fd(), &SockaddrIn::from(a)),
            SocketAddr::V6(a) => nix::sys::socket::bind(socket.as_raw_fd(), &SockaddrIn6::from(a)),
        };
        r.map_err(|e| e as i32)
    }

    fn connect_raw(&self, socket: &OwnedFd, bytes: &[u8]) -> Result<(), i32> {
        connect_raw(socket, bytes).map_err(errno)
    }

    fn peer_name(&self, socket: &OwnedFd) -> Result<Option<SocketAddr>, i32> {
        getpeername::<SockaddrStorage>(socket.as_raw_fd())
            .map(|s| to_std(&s))
            .map_err(|e| e as i32)
    }

    fn inode(&self, socket: &OwnedFd) -> Result<u64, i32> {
        nix::sys::stat::fstat(socket.as_raw_fd())
            .map(|st| st.st_ino)
            .map_err(|e| e as i32)
    }

    fn live_sockets(&self) -> HashSet<u64> {
        tree::socket_inodes(self.init_pid)
    }

    fn is_host_address(&self, ip: IpAddr) -> bool {
        let mut cached = self.local_addrs.lock().expect("local address lock");
        if cached.0.elapsed() >= LOCAL_ADDRS_TTL {
            let addrs = nix::ifaddrs::getifaddrs()
                .map(|it| {
                    it.filter_map(|i| i.address)
                        .filter_map(|a| {
                            a.as_sockaddr_in()
                                .map(|v4| IpAddr::V4(v4.ip()))
                                .or_else(|| a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
                        })
                        .collect()
                })
                .unwrap_or_default();
            *cached = (Instant::now(), addrs);
        }
        cached.1.contains(&ip)
    }
}

/// Connects `socket` to `addr`.
pub fn connect_to(socket: &OwnedFd, addr: SocketAddr) -> Result<(), i32> {
    let r = match addr {
        SocketAddr::V4(a) => nix::sys::socket::connect(socket.as_raw_fd(), &SockaddrIn::from(a)),
        SocketAddr::V6(a) => nix::sys::socket::connect(socket.as_raw_fd(), &SockaddrIn6::from(a)),
    };
    r.map_err(|e| e as i32)
}

/// Where a connect made for the task stands once the receive loop is done
/// with it.
pub enum Connecting {
    /// What the task's connect returns.
    Done(Result<(), i32>),
    /// A blocking connect still waiting for its handshake.
    InProgress,
}

/// Connects the task's `socket` to `target` without ever blocking the
/// receive loop. A non-blocking socket is connected as it is. A blocking
/// one is connected with `O_NONBLOCK` set for the length of two calls:
/// the first starts the handshake, which on this host is over when it
/// returns (loopback answers within the call), and the second, as on a
/// blocking socket, returns its outcome, so the answer is given at once
/// with no hand-off to another thread. Only a handshake still under way
/// (another host, a full accept queue) is left to a worker, whose
/// blocking connect waits for it. The flag lives on the task's open file
/// description: for those few syscalls another thread of the task could
/// see it (and a flag change of its own made in that moment would be
/// undone), on a socket that is being connected and so has no data path
/// to disturb yet.
pub fn connect_unblocked(socket: &OwnedFd, target: SocketAddr) -> Connecting {
    let flags = match fcntl(socket.as_raw_fd(), FcntlArg::F_GETFL) {
        Ok(f) => OFlag::from_bits_truncate(f),
        Err(e) => return Connecting::Done(Err(e as i32)),
    };
    if flags.contains(OFlag::O_NONBLOCK) {
        return Connecting::Done(connect_to(socket, target));
    }
    if let Err(e) = fcntl(
        socket.as_raw_fd(),
        FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK),
    ) {
        return Connecting::Done(Err(e as i32));
    }
    let r = match connect_to(socket, target) {
        Err(libc::EINPROGRESS) => connect_to(socket, target),
        r => r,
    };
    if let Err(e) = fcntl(socket.as_raw_fd(), FcntlArg::F_SETFL(flags)) {
        warn!("restoring the flags of a socket after connect: {e}");
    }
    match r {
        Err(libc::EALREADY) => Connecting::InProgress,
        r => Connecting::Done(r),
    }
}

pub use crate::net::to_std;

pub fn errno(e: std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EINVAL)
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use nix::sys::socket::{socket, SockFlag};

    use super::*;

    fn tcp_socket() -> OwnedFd {
        socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::empty(),
            None,
        )
        .unwrap()
    }

    fn is_blocking(fd: &OwnedFd) -> bool {
        let flags = OFlag::from_bits_truncate(fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL).unwrap());
        !flags.contains(OFlag::O_NONBLOCK)
    }

    fn outcome(c: Connecting) -> Option<Result<(), i32>> {
        match c {
            Connecting::Done(r) => Some(r),
            Connecting::InProgress => None,
        }
    }

    #[test]
    fn a_blocking_loopback_connect_is_answered_at_once_and_stays_blocking() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let s = tcp_socket();
        let r = connect_unblocked(&s, listener.local_addr().unwrap());
        assert_eq!(outcome(r), Some(Ok(())));
        assert!(is_blocking(&s), "the task's socket is left blocking");
        assert_eq!(
            getpeername::<SockaddrStorage>(s.as_raw_fd())
                .ok()
                .and_then(|a| to_std(&a)),
            Some(listener.local_addr().unwrap())
        );
        // As after a blocking connect: connected, not "in progress".
        assert_eq!(
            connect_to(&s, listener.local_addr().unwrap()),
            Err(libc::EISCONN)
        );
    }

    #[test]
    fn a_refused_connect_returns_the_error_a_blocking_one_would() {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let s = tcp_socket();
        assert_eq!(
            outcome(connect_unblocked(&s, port)),
            Some(Err(libc::ECONNREFUSED))
        );
        assert!(is_blocking(&s));
    }

    #[test]
    fn a_handshake_that_cannot_finish_now_is_left_in_progress() {
        // A listener whose accept queue is full drops the SYN: the
        // handshake waits for a retransmission, seconds away.
        let listener = tcp_socket();
        let any = SockaddrIn::new(127, 0, 0, 1, 0);
        nix::sys::socket::bind(listener.as_raw_fd(), &any).unwrap();
        nix::sys::socket::listen(&listener, nix::sys::socket::Backlog::new(0).unwrap()).unwrap();
        let addr = to_std(&getsockname::<SockaddrStorage>(listener.as_raw_fd()).unwrap()).unwrap();
        let mut queued = Vec::new();
        let s = loop {
            let s = tcp_socket();
            match connect_unblocked(&s, addr) {
                Connecting::Done(r) => {
                    assert_eq!(r, Ok(()));
                    queued.push(s);
                    assert!(queued.len() < 8, "the accept queue never filled");
                }
                Connecting::InProgress => break s,
            }
        };
        assert!(is_blocking(&s), "the task's socket is left blocking");
        // Under way, for the worker's blocking connect to wait on.
        assert_eq!(
            getpeername::<SockaddrStorage>(s.as_raw_fd()).err(),
            Some(nix::errno::Errno::ENOTCONN)
        );
    }
}
