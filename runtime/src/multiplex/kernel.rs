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
use nix::sys::socket::{
    getpeername, getsockname, getsockopt, sockopt, AddressFamily, SockType, SockaddrIn,
    SockaddrIn6, SockaddrLike, SockaddrStorage,
};

use super::policy::{Kernel, Task, TaskSocket};
use crate::notify::Call;
use crate::{astask, sockaddr, tree};

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
                    if get_int_opt(socket, libc::SOL_SOCKET, libc::SO_PROTOCOL).map_err(errno)?
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

pub fn to_std(s: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = s.as_sockaddr_in() {
        return Some(SocketAddr::V4((*v4).into()));
    }
    s.as_sockaddr_in6().map(|v6| SocketAddr::V6((*v6).into()))
}

pub fn errno(e: std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EINVAL)
}
