//! The virtual port multiplexer as the supervisor runs it: bind, connect,
//! getsockname and getpeername of a supervised instance, decided by the
//! host-wide registry (`appshot_vpm`) and performed on the task's own socket.
//!
//! `policy` decides, through a seam in front of the kernel (its `Task` and
//! `Kernel` traits); `kernel` is the real side of that seam; this module
//! carries the decisions out for a notification: answers, calls made as
//! the task, waits for a free port and blocking connects off the receive
//! loop. Dependencies point one way: here → policy, here → kernel →
//! policy.

mod fresh;
mod kernel;
mod policy;
mod restored;
mod sockaddr;
#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Instant;

use appshot_snapshot::restore::ListenSpec;
use appshot_snapshot::ListenError;
use appshot_sys::net::{bind_raw, connect_raw};
use appshot_sys::seccomp::Response;
use appshot_vpm::{CachedRegistry, Protocol, Registry};
use nix::sys::socket::{listen, setsockopt, sockopt, Backlog};
use tracing::{debug, warn};

use self::kernel::{connect_to, connect_unblocked, errno, CallTask, Connecting, Host};
use self::policy::{Bind, Connect, Kernel, Name, Policy, Side, ALLOCATION_RETRY};
pub use self::policy::{PortSet, Settings};
use crate::seccomp::astask;
use crate::seccomp::notify::{Call, Handler};
use crate::seccomp::pool::Pool;

pub struct Multiplexer {
    policy: Policy,
    host: Host,
    workers: Pool,
}

impl Multiplexer {
    pub fn new(settings: Settings, registry: Registry, cache: CachedRegistry) -> Multiplexer {
        // Every client process has its own supervisor; starting each at a
        // different place spreads them over a same-AID group.
        let first_pick = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos() as usize)
            .unwrap_or(0)
            ^ std::process::id() as usize;
        let unprivileged_port_start =
            std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(1024);
        let host = Host::new(settings.init_pid);
        Multiplexer {
            policy: Policy::new(
                settings,
                registry,
                cache,
                unprivileged_port_start,
                first_pick,
            ),
            host,
            workers: Pool::default(),
        }
    }

    /// Never CONTINUE a bind or connect: by then another thread may have
    /// put a TCP socket behind the same fd number. Calls the kernel judges
    /// by the caller's identity run as the task, on the socket duplicated
    /// when the call was decided.
    fn bind(self: &Arc<Self>, call: Call) {
        match self.policy.bind(&self.host, &CallTask(&call)) {
            Bind::Answer(r) => call.answer(r),
            Bind::AsTask { socket, bytes } => {
                astask::perform(call, move || bind_raw(&socket, &bytes).map_err(errno))
            }
            Bind::Wait {
                socket,
                protocol,
                addr,
            } => {
                // Exhausted: wait for a port to come free, off the receive
                // loop so the instance's other calls go on meanwhile.
                let mux = Arc::clone(self);
                self.workers
                    .run(move || mux.wait_for_port(call, socket, protocol, addr));
            }
        }
    }

    fn wait_for_port(&self, call: Call, socket: OwnedFd, protocol: Protocol, addr: SocketAddr) {
        let s = &self.policy.settings;
        let deadline = Instant::now() + s.allocation_timeout;
        while Instant::now() < deadline && call.still_pending() {
            std::thread::sleep(ALLOCATION_RETRY);
            match self
                .policy
                .allocate(&self.host, &socket, protocol, addr, None)
            {
                Ok(Some(_)) => return call.answer(Response::Value(0)),
                Ok(None) => {}
                Err(e) => return call.answer(Response::Errno(e)),
            }
        }
        warn!(
            instance = %s.instance,
            aid = %s.aid,
            port = addr.port(),
            range = %s.range,
            "no real port free for virtual port {} within {:?}: bind fails with EADDRINUSE",
            addr.port(),
            s.allocation_timeout
        );
        call.answer(Response::Errno(libc::EADDRINUSE));
    }

    /// Sets up a restored process's unconnected TCP socket (`fd` duplicates
    /// it): options, a real port for `spec.addr` chosen exactly as the
    /// application's own bind would get one (none if it was never bound),
    /// and listen if it listened.
    pub fn listen_restored(&self, spec: &ListenSpec, fd: OwnedFd) -> Result<(), ListenError> {
        let port = spec.addr.port();
        let failed =
            |call: &'static str, error: std::io::Error| ListenError::Socket { call, port, error };
        let opt = |r: nix::Result<()>, name: &'static str| r.map_err(|e| failed(name, e.into()));
        opt(
            setsockopt(&fd, sockopt::ReuseAddr, &spec.reuseaddr),
            "SO_REUSEADDR",
        )?;
        opt(
            setsockopt(&fd, sockopt::ReusePort, &spec.reuseport),
            "SO_REUSEPORT",
        )?;
        if spec.addr.is_ipv6() {
            opt(
                setsockopt(&fd, sockopt::Ipv6V6Only, &spec.v6only),
                "IPV6_V6ONLY",
            )?;
        }
        self.policy
            .bind_restored_tcp(&self.host, &fd, spec.addr, spec.real_port)?;
        if !spec.listen {
            return Ok(());
        }
        let backlog = Backlog::new(i32::MAX).unwrap_or(Backlog::MAXCONN);
        listen(&fd, backlog).map_err(|e| failed("listen", e.into()))
    }

    /// Binds a restored process's UDP socket (`fd` duplicates it) for
    /// `addr`, the address its application bound: a real port chosen as
    /// the application's own bind would get one.
    pub fn bind_restored_udp(&self, addr: SocketAddr, fd: OwnedFd) -> Result<(), ListenError> {
        self.policy.bind_restored_udp(&self.host, &fd, addr)
    }

    fn connect(self: &Arc<Self>, call: Call) {
        match self.policy.connect(&self.host, &CallTask(&call)) {
            Connect::Answer(r) => call.answer(r),
            Connect::AsTask { socket, bytes } => {
                astask::perform(call, move || connect_raw(&socket, &bytes).map_err(errno))
            }
            Connect::Negotiate {
                socket,
                protocol,
                dest,
            } => {
                // Negotiating takes a round trip to the other host: off the
                // receive loop, like a blocking connect.
                let mux = Arc::clone(self);
                self.workers
                    .run(move || mux.connect_remote(call, socket, protocol, dest));
            }
            Connect::To { socket, target } => match connect_unblocked(&socket, target) {
                Connecting::Done(r) => call.answer(Response::of(r)),
                Connecting::InProgress => {
                    // As long as the network takes: off the receive loop.
                    self.workers
                        .run(move || call.answer(Response::of(connect_to(&socket, target))));
                }
            },
        }
    }

    /// A connect to another host, after asking its agent (FIG. 6): to the
    /// real port it names, refused, or as the application asked.
    fn connect_remote(&self, call: Call, socket: OwnedFd, protocol: Protocol, dest: SocketAddr) {
        let cluster = &self.policy.settings.cluster;
        let target = match cluster.negotiate(protocol, dest) {
            crate::net::remote::Route::Plain => dest,
            crate::net::remote::Route::Refused => {
                debug!(
                    tid = call.tid,
                    "connect to {dest} refused by its host's agent"
                );
                return call.answer(Response::Errno(libc::ECONNREFUSED));
            }
            crate::net::remote::Route::To(real) => {
                if let Ok(inode) = self.host.inode(&socket) {
                    cluster.remember_peer(inode, real, dest.port());
                }
                real
            }
        };
        call.answer(Response::of(connect_to(&socket, target)));
    }

    fn get_name(&self, call: Call, side: Side) {
        match self.policy.name(&self.host, &CallTask(&call), side) {
            Name::Continue => call.answer(Response::Continue),
            Name::Errno(e) => call.answer(Response::Errno(e)),
            Name::Write(addr) => {
                let written = write_sockaddr(&call, &addr);
                call.answer(Response::of(written));
            }
        }
    }
}

impl Handler for Multiplexer {
    /// Decides the call's answer (now or on another thread) and makes
    /// the calls it needs.
    fn handle(self: &Arc<Self>, call: Call) {
        match call.nr {
            libc::SYS_bind => self.bind(call),
            libc::SYS_connect => self.connect(call),
            libc::SYS_getsockname => self.get_name(call, Side::Local),
            libc::SYS_getpeername => self.get_name(call, Side::Peer),
            libc::SYS_sendto | libc::SYS_sendmsg | libc::SYS_sendmmsg => {
                // A TCP Fast Open send connects without routing.
                debug!(tid = call.tid, "MSG_FASTOPEN refused: connect is routed");
                call.answer(Response::Errno(libc::EOPNOTSUPP));
            }
            nr => {
                warn!(tid = call.tid, nr, "unexpected notified syscall");
                call.answer(Response::Errno(libc::ENOSYS));
            }
        }
    }
}

/// Writes `addr` to the (pointer, length pointer) pair in args 1 and 2 with
/// the kernel's truncation rule: copy at most the caller's length, report
/// the full length.
fn write_sockaddr(call: &Call, addr: &SocketAddr) -> Result<(), i32> {
    let len_bytes = call.read(call.args[2], 4)?;
    let len = i32::from_ne_bytes(len_bytes.try_into().expect("4 bytes"));
    if len < 0 {
        return Err(libc::EINVAL);
    }
    let encoded = sockaddr::encode(addr);
    let n = encoded.len().min(len as usize);
    let full_len = (encoded.len() as u32).to_ne_bytes();
    call.write(&[(call.args[1], &encoded[..n]), (call.args[2], &full_len)])
}
