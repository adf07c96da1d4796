//! The virtual port multiplexer as the supervisor runs it: bind, connect,
//! getsockname and getpeername of a supervised instance, decided by the
//! host-wide registry (`appshot_vpm`) and performed on the task's own socket.

use std::collections::{BTreeSet, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use appshot_snapshot::restore::ListenSpec;
use appshot_sys::net::{bind_raw, connect_raw};
use appshot_sys::seccomp::Response;
use appshot_vpm::{CachedRegistry, PortRange, Protocol, Registry, Route, Translation};
use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::socket::{
    getpeername, getsockname, getsockopt, listen, setsockopt, sockopt, AddressFamily, Backlog,
    SockType, SockaddrIn, SockaddrIn6, SockaddrLike, SockaddrStorage,
};
use tracing::{debug, info, warn};

use crate::astask;
use crate::notify::Call;
use crate::pool::Pool;
use crate::sockaddr;
use crate::tree;

/// Which virtual ports this instance multiplexes.
#[derive(Clone, Debug)]
pub enum PortSet {
    /// Ports named by `--port` or the config.
    Listed(BTreeSet<u16>),
    /// Every port below the start of the ephemeral range.
    Below(u16),
}

impl PortSet {
    pub fn contains(&self, port: u16) -> bool {
        match self {
            PortSet::Listed(set) => set.contains(&port),
            PortSet::Below(limit) => port < *limit,
        }
    }
}

/// What the multiplexer needs to know about its instance.
pub struct Settings {
    pub instance: String,
    pub aid: String,
    pub multiplexed: PortSet,
    pub range: PortRange,
    pub allocation_timeout: Duration,
    /// PID (ours) of the instance's namespace init; its descendants are the
    /// instance.
    pub init_pid: u32,
    /// Source rules and negotiation with other hosts.
    pub cluster: Arc<crate::remote::Cluster>,
    /// Whether the instance is in a cgroup of its AID, through which the
    /// kernel routes datagrams (`udproutes`); without, UDP ports are left
    /// alone, as they were before UDP was multiplexed.
    pub route_udp: bool,
}

/// Bit of CAP_NET_BIND_SERVICE in a capability set.
const CAP_NET_BIND_SERVICE: u64 = 1 << 10;
/// How often a bind waiting for a free real port looks again.
const ALLOCATION_RETRY: Duration = Duration::from_millis(50);
/// How long the host's own addresses are trusted before they are re-read.
const LOCAL_ADDRS_TTL: Duration = Duration::from_secs(2);

pub struct Multiplexer {
    settings: Settings,
    registry: Registry,
    cache: Mutex<CachedRegistry>,
    next_pick: AtomicUsize,
    local_addrs: Mutex<(Instant, HashSet<IpAddr>)>,
    workers: Pool,
    /// Ports below this need CAP_NET_BIND_SERVICE.
    unprivileged_port_start: u16,
}

/// A task's INET socket, duplicated into the supervisor.
struct InetSocket {
    fd: OwnedFd,
    domain: i32,
    /// `None`: neither TCP nor UDP (raw, ICMP, UDP-Lite): never multiplexed.
    protocol: Option<Protocol>,
    /// Its local address, read to learn the family.
    local: SockaddrStorage,
}

enum Side {
    Local,
    Peer,
}

impl Multiplexer {
    pub fn new(settings: Settings, registry: Registry, cache: CachedRegistry) -> Multiplexer {
        Multiplexer {
            settings,
            registry,
            cache: Mutex::new(cache),
            // Every client process has its own supervisor; starting each
            // at a different place spreads them over a same-AID group.
            next_pick: AtomicUsize::new(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.subsec_nanos() as usize)
                    .unwrap_or(0)
                    ^ std::process::id() as usize,
            ),
            local_addrs: Mutex::new((Instant::now() - LOCAL_ADDRS_TTL, HashSet::new())),
            workers: Pool::default(),
            unprivileged_port_start: std::fs::read_to_string(
                "/proc/sys/net/ipv4/ip_unprivileged_port_start",
            )
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(1024),
        }
    }

    pub fn handle(self: &Arc<Self>, call: Call) {
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

    /// The task's socket: INET ones are multiplexed; for others the
    /// multiplexer only performs the call (`Err(Other)`), never letting the
    /// kernel continue: by then another thread may have put a TCP socket
    /// behind the same fd number.
    fn task_socket(call: &Call) -> Result<Result<InetSocket, Other>, i32> {
        let fd = call.task_fd(call.int_arg(0))?;
        let local: SockaddrStorage = getsockname(fd.as_raw_fd()).map_err(|e| e as i32)?;
        let domain = match local.family() {
            Some(AddressFamily::Inet) => libc::AF_INET,
            Some(AddressFamily::Inet6) => libc::AF_INET6,
            _ => return Ok(Err(Other { fd })),
        };
        let protocol = match getsockopt(&fd, sockopt::SockType).map_err(|e| e as i32)? {
            SockType::Stream => Some(Protocol::Tcp),
            SockType::Datagram
                if appshot_sys::net::get_int_opt(&fd, libc::SOL_SOCKET, libc::SO_PROTOCOL)
                    .map_err(errno)?
                    == libc::IPPROTO_UDP =>
            {
                Some(Protocol::Udp)
            }
            _ => None,
        };
        Ok(Ok(InetSocket {
            fd,
            domain,
            protocol,
            local,
        }))
    }

    /// For `getsockname`/`getpeername`: `Ok(None)` for sockets of other
    /// families, whose names the multiplexer does not change.
    fn inet_socket(call: &Call) -> Result<Option<InetSocket>, i32> {
        Ok(Self::task_socket(call)?.ok())
    }

    /// bind or connect on a socket of another family (Unix, netlink, …)
    /// with the task's own address bytes, as the task: the kernel resolves
    /// its paths and judges its permissions and capabilities as for the
    /// task's own call. Never CONTINUE: by then another thread may have put
    /// a TCP socket behind the same fd number.
    fn other_family(call: Call, sock: Other, bytes: Vec<u8>, bind: bool) {
        astask::perform(call, move || {
            let r = if bind {
                bind_raw(&sock.fd, &bytes)
            } else {
                connect_raw(&sock.fd, &bytes)
            };
            r.map_err(errno)
        });
    }

    /// A bind whose address the kernel judges as given (not multiplexed,
    /// or malformed), performed as the task, so that the kernel's own
    /// privileged-port and permission checks see the task.
    fn bind_as_task(call: Call, fd: OwnedFd, bytes: Vec<u8>) {
        astask::perform(call, move || bind_raw(&fd, &bytes).map_err(errno));
    }

    /// The address argument (pointer in arg 1, length in arg 2).
    fn address_arg(call: &Call) -> Result<Vec<u8>, i32> {
        let len = call.args[2] as u32 as usize;
        if len > sockaddr::MAX_LEN {
            return Err(libc::EINVAL);
        }
        call.read(call.args[1], len)
    }

    fn bind(self: &Arc<Self>, call: Call) {
        let bytes = match Self::address_arg(&call) {
            Ok(b) => b,
            Err(e) => return call.answer(Response::Errno(e)),
        };
        let sock = match Self::task_socket(&call) {
            Ok(Ok(s)) => s,
            Ok(Err(other)) => return Self::other_family(call, other, bytes, true),
            Err(e) => return call.answer(Response::Errno(e)),
        };
        let Ok(addr) = sockaddr::decode_bind(sock.domain, &bytes) else {
            // Malformed: the kernel says how, with its own errno.
            return Self::bind_as_task(call, sock.fd, bytes);
        };
        let port = addr.port();
        let multiplexed = port != 0
            && self.settings.multiplexed.contains(port)
            && match sock.protocol {
                Some(Protocol::Tcp) => true,
                Some(Protocol::Udp) => self.settings.route_udp,
                None => false,
            };
        // The supervisor binds a real port of its own choosing; holding the
        // privilege the virtual port needs is the task's affair.
        if multiplexed
            && port < self.unprivileged_port_start
            && astask::effective_caps(call.tid) & CAP_NET_BIND_SERVICE == 0
        {
            return call.answer(Response::Errno(libc::EACCES));
        }
        // A bind interrupted by a signal after the supervisor performed it
        // is restarted by the kernel: the same bind again succeeds.
        if self.already_bound(&sock, addr, multiplexed) {
            return call.answer(Response::Value(0));
        }
        if !multiplexed {
            if sock
                .protocol
                .is_some_and(|p| self.is_others_real_port(p, port))
            {
                // Another instance's real port: binding it would capture
                // that instance's clients.
                return call.answer(Response::Errno(libc::EADDRINUSE));
            }
            return Self::bind_as_task(call, sock.fd, bytes);
        }
        match self.allocate(&sock, addr, None) {
            Ok(Some(_)) => call.answer(Response::Value(0)),
            Err(e) => call.answer(Response::Errno(e)),
            Ok(None) => {
                // Exhausted: wait for a port to come free, off the receive
                // loop so the instance's other calls go on meanwhile.
                let mux = Arc::clone(self);
                self.workers.run(move || {
                    let deadline = Instant::now() + mux.settings.allocation_timeout;
                    while Instant::now() < deadline && call.still_pending() {
                        std::thread::sleep(ALLOCATION_RETRY);
                        match mux.allocate(&sock, addr, None) {
                            Ok(Some(_)) => return call.answer(Response::Value(0)),
                            Ok(None) => {}
                            Err(e) => return call.answer(Response::Errno(e)),
                        }
                    }
                    warn!(
                        instance = %mux.settings.instance,
                        aid = %mux.settings.aid,
                        port = addr.port(),
                        range = %mux.settings.range,
                        "no real port free for virtual port {} within {:?}: bind fails with EADDRINUSE",
                        addr.port(),
                        mux.settings.allocation_timeout
                    );
                    call.answer(Response::Errno(libc::EADDRINUSE));
                });
            }
        }
    }

    /// Whether the socket is bound already as this bind asks: directly to
    /// `addr`, or (multiplexed) to a real port recorded for it and `addr`.
    fn already_bound(&self, sock: &InetSocket, addr: SocketAddr, multiplexed: bool) -> bool {
        let Some(local) = to_std(&sock.local).filter(|l| l.port() != 0) else {
            return false;
        };
        if !multiplexed {
            return local == addr;
        }
        let Ok(inode) = nix::sys::stat::fstat(sock.fd.as_raw_fd()).map(|st| st.st_ino) else {
            return false;
        };
        let mut cache = self.cache.lock().expect("registry cache lock");
        cache.get().is_ok_and(|st| {
            st.translations_of(&self.settings.instance).any(|t| {
                Some(t.protocol) == sock.protocol
                    && t.socket_inode == inode
                    && t.virtual_port == addr.port()
                    && t.addr == addr.ip()
                    && t.real_port == local.port()
            })
        })
    }

    /// Whether `port` is the real port of another instance's translation.
    fn is_others_real_port(&self, protocol: Protocol, port: u16) -> bool {
        let mut cache = self.cache.lock().expect("registry cache lock");
        cache.get().is_ok_and(|st| {
            st.translations.iter().any(|t| {
                t.protocol == protocol && t.real_port == port && t.owner != self.settings.instance
            })
        })
    }

    /// Binds the socket to the first real port the registry offers that the
    /// kernel accepts, and records the translation. `Ok(None)`: none free.
    /// Binds `sock` to a free real port standing for `addr` and records
    /// the translation; `exact` asks for that real port alone (a restore
    /// taking back its connections' port).
    fn allocate(
        &self,
        sock: &InetSocket,
        addr: SocketAddr,
        exact: Option<u16>,
    ) -> Result<Option<u16>, i32> {
        let inode = nix::sys::stat::fstat(sock.fd.as_raw_fd())
            .map_err(|e| e as i32)?
            .st_ino;
        let protocol = sock.protocol.unwrap_or(Protocol::Tcp);
        let s = &self.settings;
        let hint = std::process::id() as usize + self.next_pick.fetch_add(1, Ordering::Relaxed);
        let live = tree::socket_inodes(s.init_pid);
        let result = self.registry.transaction(|state| {
            // Translations whose socket the instance has closed since: their
            // ports are free again, and routing to them would fail.
            let closed: Vec<u64> = state
                .translations_of(&s.instance)
                .map(|t| t.socket_inode)
                .filter(|i| !live.contains(i))
                .collect();
            for i in closed {
                state.remove_socket(&s.instance, i);
            }
            let candidates = match exact {
                Some(p) if state.translations.iter().any(|t| t.real_port == p) => Vec::new(),
                Some(p) => vec![p],
                None => {
                    state.bind_candidates(protocol, addr.ip(), addr.port(), &s.aid, s.range, hint)
                }
            };
            // Under source rules the fixed port itself must stay free, so
            // that every connection to it meets the rules.
            let rules = s.cluster.source_rules_active();
            for real_port in candidates
                .into_iter()
                .filter(|&p| !(rules && p == addr.port()))
            {
                let mut real = addr;
                real.set_port(real_port);
                match bind_to(&sock.fd, real) {
                    Ok(()) => {
                        state.insert(Translation {
                            protocol,
                            addr: addr.ip(),
                            virtual_port: addr.port(),
                            aid: s.aid.clone(),
                            real_port,
                            owner: s.instance.clone(),
                            socket_inode: inode,
                        });
                        return Ok(Some(real_port));
                    }
                    Err(libc::EADDRINUSE) => continue,
                    Err(e) => return Err(e),
                }
            }
            Ok(None)
        });
        match result {
            Ok(Ok(Some(real))) => {
                info!(instance = %s.instance, aid = %s.aid, "{protocol} {addr} -> real port {real}");
                s.cluster.after_bind(&self.registry);
                Ok(Some(real))
            }
            Ok(other) => other,
            Err(e) => {
                warn!(instance = %s.instance, "registry unusable, bind of {addr} refused: {e}");
                Err(libc::ENOBUFS)
            }
        }
    }

    /// Sets up a restored process's unconnected TCP socket (`fd` duplicates
    /// it): options, a real port for `spec.addr` chosen exactly as the
    /// application's own bind would get one (none if it was never bound),
    /// and listen if it listened.
    pub fn listen_restored(&self, spec: &ListenSpec, fd: OwnedFd) -> Result<(), String> {
        let domain = if spec.addr.is_ipv4() {
            libc::AF_INET
        } else {
            libc::AF_INET6
        };
        let opt = |r: nix::Result<()>, name: &str| r.map_err(|e| format!("{name}: {e}"));
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
        let local = getsockname(fd.as_raw_fd()).map_err(|e| format!("getsockname: {e}"))?;
        let sock = InetSocket {
            fd,
            domain,
            protocol: Some(Protocol::Tcp),
            local,
        };
        let port = spec.addr.port();
        if port != 0 && self.settings.multiplexed.contains(port) && spec.real_port != 0 {
            // The instance's connections use this real port: it or nothing.
            let taken = || {
                format!(
                    "real port {} (virtual port {port}) is taken; its connections cannot come back (restore with --tcp-close to drop them)",
                    spec.real_port
                )
            };
            match self.allocate(&sock, spec.addr, Some(spec.real_port)) {
                Ok(Some(_)) => {}
                Ok(None) | Err(libc::EADDRINUSE) => return Err(taken()),
                Err(e) => return Err(std::io::Error::from_raw_os_error(e).to_string()),
            }
        } else if port != 0 && self.settings.multiplexed.contains(port) {
            let deadline = Instant::now() + self.settings.allocation_timeout;
            loop {
                match self.allocate(&sock, spec.addr, None) {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < deadline => std::thread::sleep(ALLOCATION_RETRY),
                    Ok(None) => {
                        return Err(format!(
                            "no real port free for virtual port {port} in {}",
                            self.settings.range
                        ))
                    }
                    Err(e) => return Err(std::io::Error::from_raw_os_error(e).to_string()),
                }
            }
        } else if port != 0 || !spec.addr.ip().is_unspecified() {
            bind_to(&sock.fd, spec.addr)
                .map_err(|e| std::io::Error::from_raw_os_error(e).to_string())?;
        }
        if !spec.listen {
            return Ok(());
        }
        let backlog = Backlog::new(i32::MAX).unwrap_or(Backlog::MAXCONN);
        listen(&sock.fd, backlog).map_err(|e| format!("listen: {e}"))
    }

    /// Binds a restored process's UDP socket (`fd` duplicates it) for
    /// `addr`, the address its application bound: a real port chosen as
    /// the application's own bind would get one.
    pub fn bind_restored_udp(&self, addr: SocketAddr, fd: OwnedFd) -> Result<(), String> {
        let local = getsockname(fd.as_raw_fd()).map_err(|e| format!("getsockname: {e}"))?;
        let sock = InetSocket {
            fd,
            domain: if addr.is_ipv4() {
                libc::AF_INET
            } else {
                libc::AF_INET6
            },
            protocol: Some(Protocol::Udp),
            local,
        };
        let port = addr.port();
        if !(self.settings.route_udp && port != 0 && self.settings.multiplexed.contains(port)) {
            return bind_to(&sock.fd, addr)
                .map_err(|e| std::io::Error::from_raw_os_error(e).to_string());
        }
        let deadline = Instant::now() + self.settings.allocation_timeout;
        loop {
            match self.allocate(&sock, addr, None) {
                Ok(Some(_)) => return Ok(()),
                Ok(None) if Instant::now() < deadline => std::thread::sleep(ALLOCATION_RETRY),
                Ok(None) => {
                    return Err(format!(
                        "no real port free for virtual port {port} in {}",
                        self.settings.range
                    ))
                }
                Err(e) => return Err(std::io::Error::from_raw_os_error(e).to_string()),
            }
        }
    }

    fn connect(self: &Arc<Self>, call: Call) {
        let bytes = match Self::address_arg(&call) {
            Ok(b) => b,
            Err(e) => return call.answer(Response::Errno(e)),
        };
        let sock = match Self::task_socket(&call) {
            Ok(Ok(s)) => s,
            Ok(Err(other)) => return Self::other_family(call, other, bytes, false),
            Err(e) => return call.answer(Response::Errno(e)),
        };
        let decoded = sockaddr::decode(sock.domain, &bytes);
        let dest = match decoded {
            Ok(a) if sock.protocol == Some(Protocol::Tcp) => a,
            // Datagrams are routed by the kernel (`udproutes`) whatever the
            // socket is connected to, and an address that does not decode
            // (AF_UNSPEC, an IPv4 address on an IPv6 socket, a short one)
            // is the kernel's to judge: the task's own bytes.
            _ => return call.answer(outcome(connect_raw(&sock.fd, &bytes).map_err(errno))),
        };
        if self.settings.cluster.negotiates(dest.ip()) && !self.is_local(dest.ip()) {
            // Negotiating takes a round trip to the other host: off the
            // receive loop, like a blocking connect.
            let mux = Arc::clone(self);
            self.workers
                .run(move || mux.connect_remote(call, sock, dest));
            return;
        }
        let target = match self.route(dest) {
            Ok(t) => t,
            Err(e) => {
                debug!(
                    tid = call.tid,
                    "connect to {dest} refused: no instance of AID {}", self.settings.aid
                );
                return call.answer(Response::Errno(e));
            }
        };
        if is_blocking(&sock.fd) {
            // A blocking connect may take as long as the network does; the
            // receive loop must not wait on it.
            self.workers
                .run(move || call.answer(outcome(connect_to(&sock.fd, target))));
        } else {
            call.answer(outcome(connect_to(&sock.fd, target)));
        }
    }

    /// A connect to another host, after asking its agent (FIG. 6): to the
    /// real port it names, refused, or as the application asked.
    fn connect_remote(&self, call: Call, sock: InetSocket, dest: SocketAddr) {
        let cluster = &self.settings.cluster;
        let target = match cluster.negotiate(dest) {
            crate::remote::Route::Plain => dest,
            crate::remote::Route::Refused => {
                debug!(
                    tid = call.tid,
                    "connect to {dest} refused by its host's agent"
                );
                return call.answer(Response::Errno(libc::ECONNREFUSED));
            }
            crate::remote::Route::To(real) => {
                if let Ok(st) = nix::sys::stat::fstat(sock.fd.as_raw_fd()) {
                    cluster.remember_peer(st.st_ino, real, dest.port());
                }
                real
            }
        };
        call.answer(outcome(connect_to(&sock.fd, target)));
    }

    /// Where a connect to `dest` really goes, or the errno that refuses it.
    fn route(&self, dest: SocketAddr) -> Result<SocketAddr, i32> {
        if !self.is_local(dest.ip()) {
            return Ok(dest);
        }
        let pick = self.next_pick.fetch_add(1, Ordering::Relaxed);
        let mut cache = self.cache.lock().expect("registry cache lock");
        let state = match cache.get() {
            Ok(s) => s,
            Err(e) => {
                warn!("registry unreadable, connect to {dest} refused: {e}");
                return Err(libc::ECONNREFUSED);
            }
        };
        match state.route(
            Protocol::Tcp,
            dest.ip(),
            dest.port(),
            &self.settings.aid,
            pick,
        ) {
            Route::PassThrough => Ok(dest),
            Route::To { real_port, owner } => {
                debug!(%dest, real_port, %owner, "connect routed");
                let mut real = dest;
                real.set_port(real_port);
                Ok(real)
            }
            Route::Refused => Err(libc::ECONNREFUSED),
        }
    }

    fn is_local(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        if ip.is_loopback() || ip.is_unspecified() {
            return true;
        }
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

    fn get_name(&self, call: Call, side: Side) {
        let sock = match Self::inet_socket(&call) {
            Ok(Some(s)) => s,
            Ok(None) => return call.answer(Response::Continue),
            Err(e) => return call.answer(Response::Errno(e)),
        };
        let raw: Result<SockaddrStorage, Errno> = match side {
            Side::Local => Ok(sock.local),
            Side::Peer => getpeername(sock.fd.as_raw_fd()),
        };
        let mut addr = match raw.map(|s| to_std(&s)) {
            Ok(Some(a)) => a,
            Ok(None) => return call.answer(Response::Errno(libc::EAFNOSUPPORT)),
            Err(e) => return call.answer(Response::Errno(e as i32)),
        };
        let Some(protocol) = sock.protocol else {
            let written = write_sockaddr(&call, &addr);
            return call.answer(outcome(written));
        };
        let negotiated = match side {
            Side::Peer if protocol == Protocol::Tcp && self.settings.cluster.has_peers() => {
                nix::sys::stat::fstat(sock.fd.as_raw_fd())
                    .ok()
                    .and_then(|st| self.settings.cluster.peer_virtual_port(st.st_ino, addr))
            }
            _ => None,
        };
        // A connected UDP socket's peer is the virtual port it connected to:
        // the kernel's NAT is below the socket.
        let names_real_port = match side {
            Side::Local => true,
            Side::Peer => protocol == Protocol::Tcp && self.is_local(addr.ip()),
        };
        if let Some(v) = negotiated {
            addr.set_port(v);
        } else if names_real_port {
            // A peer on another host is never one of this registry's
            // sockets, whatever its port.
            let mut cache = self.cache.lock().expect("registry cache lock");
            if let Ok(state) = cache.get() {
                if let Some(v) = state.virtual_port_of(protocol, addr.ip(), addr.port()) {
                    addr.set_port(v);
                }
            }
        }
        let written = write_sockaddr(&call, &addr);
        call.answer(outcome(written));
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

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

fn to_std(s: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = s.as_sockaddr_in() {
        return Some(SocketAddr::V4((*v4).into()));
    }
    s.as_sockaddr_in6().map(|v6| SocketAddr::V6((*v6).into()))
}

fn bind_to(fd: &OwnedFd, addr: SocketAddr) -> Result<(), i32> {
    let r = match addr {
        SocketAddr::V4(a) => nix::sys::socket::bind(fd.as_raw_fd(), &SockaddrIn::from(a)),
        SocketAddr::V6(a) => nix::sys::socket::bind(fd.as_raw_fd(), &SockaddrIn6::from(a)),
    };
    r.map_err(|e| e as i32)
}

fn connect_to(fd: &OwnedFd, addr: SocketAddr) -> Result<(), i32> {
    let r = match addr {
        SocketAddr::V4(a) => nix::sys::socket::connect(fd.as_raw_fd(), &SockaddrIn::from(a)),
        SocketAddr::V6(a) => nix::sys::socket::connect(fd.as_raw_fd(), &SockaddrIn6::from(a)),
    };
    r.map_err(|e| e as i32)
}

/// A task's non-INET socket.
struct Other {
    fd: OwnedFd,
}

fn errno(e: std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EINVAL)
}

fn is_blocking(fd: &OwnedFd) -> bool {
    fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL)
        .map(|f| !OFlag::from_bits_truncate(f).contains(OFlag::O_NONBLOCK))
        .unwrap_or(true)
}

pub(crate) fn outcome(r: Result<(), i32>) -> Response {
    match r {
        Ok(()) => Response::Value(0),
        Err(e) => Response::Errno(e),
    }
}
