//! What the multiplexer decides for a notified bind, connect, getsockname
//! or getpeername: from the task's request, the instance's settings and
//! the host-wide registry, which syscalls to make on the task's socket and
//! what to answer. It reaches the kernel only through [`Task`] and
//! [`Kernel`], so the decisions are unit-tested with a recording double
//! (`tests.rs`), without root; `kernel.rs` is the real implementation.

use std::collections::{BTreeSet, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use appshot_sys::seccomp::Response;
use appshot_vpm::{CachedRegistry, PortRange, Protocol, Registry, Route, Translation};
use tracing::{debug, info, warn};

use super::fresh::FreshRegistry;
use crate::multiplex::sockaddr;

/// How often a bind waiting for a free real port looks again.
pub const ALLOCATION_RETRY: Duration = Duration::from_millis(50);

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
    pub cluster: Arc<crate::net::remote::Cluster>,
    /// Whether the instance is in a cgroup of its AID, through which the
    /// kernel routes datagrams (`udproutes`); without, UDP ports are left
    /// alone, as they were before UDP was multiplexed.
    pub route_udp: bool,
}

/// The notifying task's socket, duplicated into the supervisor. Every call
/// the policy makes acts on this duplicate: whatever the task puts behind
/// its fd number meanwhile is never touched.
pub enum TaskSocket<S> {
    /// An `AF_INET` or `AF_INET6` socket.
    Inet {
        socket: S,
        domain: i32,
        /// Its local address (port 0 while unbound).
        local: Option<SocketAddr>,
    },
    /// A socket of another family (Unix, netlink, …).
    Other(S),
}

/// The task whose notified call is decided.
pub trait Task {
    type Socket;
    /// The address argument (pointer in arg 1, length in arg 2), copied out
    /// of the task's memory once.
    fn address(&self) -> Result<Vec<u8>, i32>;
    /// The socket behind the fd in arg 0, duplicated and described.
    fn socket(&self) -> Result<TaskSocket<Self::Socket>, i32>;
    /// The protocol of an INET socket [`socket`](Self::socket) gave:
    /// `None` when neither TCP nor UDP (raw, ICMP, UDP-Lite), never
    /// multiplexed. Asked apart, as it costs a syscall that most names
    /// do without.
    fn protocol(&self, socket: &Self::Socket) -> Result<Option<Protocol>, i32>;
    /// Whether the task holds CAP_NET_BIND_SERVICE in its effective set.
    fn may_bind_privileged(&self) -> bool;
}

/// The syscalls the policy makes on sockets it holds, and what it reads of
/// the host.
pub trait Kernel {
    type Socket;
    fn bind(&self, socket: &Self::Socket, addr: SocketAddr) -> Result<(), i32>;
    /// connect with the task's own address bytes.
    fn connect_raw(&self, socket: &Self::Socket, bytes: &[u8]) -> Result<(), i32>;
    /// getpeername: `None` when the peer is not INET.
    fn peer_name(&self, socket: &Self::Socket) -> Result<Option<SocketAddr>, i32>;
    /// The socket's inode, which names it in the registry.
    fn inode(&self, socket: &Self::Socket) -> Result<u64, i32>;
    /// The inodes of every socket the instance's processes hold now.
    fn live_sockets(&self) -> HashSet<u64>;
    /// Whether `ip` is one of the host's own interface addresses.
    fn is_host_address(&self, ip: IpAddr) -> bool;
}

/// What to do with a bind.
pub enum Bind<S> {
    Answer(Response),
    /// The kernel judges this bind by the task's identity (another family,
    /// an unmultiplexed port, a malformed address): perform it with the
    /// task's own bytes, as the task.
    AsTask {
        socket: S,
        bytes: Vec<u8>,
    },
    /// No real port is free now: try again until the allocation timeout.
    Wait {
        socket: S,
        protocol: Protocol,
        addr: SocketAddr,
    },
}

/// What to do with a connect.
pub enum Connect<S> {
    Answer(Response),
    /// A socket of another family: its own bytes, as the task.
    AsTask {
        socket: S,
        bytes: Vec<u8>,
    },
    /// Connect to `target`: the real port serving the virtual one, or the
    /// destination as asked.
    To {
        socket: S,
        target: SocketAddr,
    },
    /// Ask the agent of the destination's host first.
    Negotiate {
        socket: S,
        protocol: Protocol,
        dest: SocketAddr,
    },
}

/// What to answer getsockname or getpeername.
#[derive(Debug, PartialEq, Eq)]
pub enum Name {
    /// The kernel's own answer is the right one (not an INET socket, or an
    /// address no translation rewrites), and it changes nothing: the task
    /// runs the call itself, which spares writing its answer across
    /// address spaces. Should another thread swap the fd meanwhile, the
    /// task learns the new socket's address as the kernel names it; a name
    /// grants nothing.
    Continue,
    Errno(i32),
    /// Write this address into the task's buffer.
    Write(SocketAddr),
}

#[derive(Clone, Copy, Debug)]
pub enum Side {
    Local,
    Peer,
}

pub struct Policy {
    pub settings: Settings,
    pub registry: Registry,
    cache: Mutex<FreshRegistry>,
    next_pick: AtomicUsize,
    /// Ports below this need CAP_NET_BIND_SERVICE.
    unprivileged_port_start: u16,
}

impl Policy {
    /// `first_pick` chooses where, among a same-AID group and a port range,
    /// this instance starts.
    pub fn new(
        settings: Settings,
        registry: Registry,
        cache: CachedRegistry,
        unprivileged_port_start: u16,
        first_pick: usize,
    ) -> Policy {
        Policy {
            settings,
            registry,
            cache: Mutex::new(FreshRegistry::new(cache)),
            next_pick: AtomicUsize::new(first_pick),
            unprivileged_port_start,
        }
    }

    pub fn bind<K, T>(&self, kernel: &K, task: &T) -> Bind<K::Socket>
    where
        K: Kernel,
        T: Task<Socket = K::Socket>,
    {
        let bytes = match task.address() {
            Ok(b) => b,
            Err(e) => return Bind::Answer(Response::Errno(e)),
        };
        let (socket, domain, local) = match task.socket() {
            Ok(TaskSocket::Inet {
                socket,
                domain,
                local,
            }) => (socket, domain, local),
            Ok(TaskSocket::Other(socket)) => return Bind::AsTask { socket, bytes },
            Err(e) => return Bind::Answer(Response::Errno(e)),
        };
        let protocol = match task.protocol(&socket) {
            Ok(p) => p,
            Err(e) => return Bind::Answer(Response::Errno(e)),
        };
        let Ok(addr) = sockaddr::decode_bind(domain, &bytes) else {
            // Malformed: the kernel says how, with its own errno.
            return Bind::AsTask { socket, bytes };
        };
        let port = addr.port();
        let multiplexed = port != 0
            && self.settings.multiplexed.contains(port)
            && match protocol {
                Some(Protocol::Tcp) => true,
                Some(Protocol::Udp) => self.settings.route_udp,
                None => false,
            };
        // The supervisor binds a real port of its own choosing; holding the
        // privilege the virtual port needs is the task's affair.
        if multiplexed && port < self.unprivileged_port_start && !task.may_bind_privileged() {
            return Bind::Answer(Response::Errno(libc::EACCES));
        }
        // A bind interrupted by a signal after the supervisor performed it
        // is restarted by the kernel: the same bind again succeeds.
        if self.already_bound(kernel, &socket, protocol, local, addr, multiplexed) {
            return Bind::Answer(Response::Value(0));
        }
        if !multiplexed {
            if protocol.is_some_and(|p| self.is_others_real_port(p, port)) {
                // Another instance's real port: binding it would capture
                // that instance's clients.
                return Bind::Answer(Response::Errno(libc::EADDRINUSE));
            }
            return Bind::AsTask { socket, bytes };
        }
        // Multiplexed: TCP or UDP.
        let protocol = protocol.unwrap_or(Protocol::Tcp);
        match self.allocate(kernel, &socket, protocol, addr, None) {
            Ok(Some(_)) => Bind::Answer(Response::Value(0)),
            Err(e) => Bind::Answer(Response::Errno(e)),
            Ok(None) => Bind::Wait {
                socket,
                protocol,
                addr,
            },
        }
    }

    /// Whether the socket is bound already as this bind asks: directly to
    /// `addr`, or (multiplexed) to a real port recorded for it and `addr`.
    fn already_bound<K: Kernel>(
        &self,
        kernel: &K,
        socket: &K::Socket,
        protocol: Option<Protocol>,
        local: Option<SocketAddr>,
        addr: SocketAddr,
        multiplexed: bool,
    ) -> bool {
        let Some(local) = local.filter(|l| l.port() != 0) else {
            return false;
        };
        if !multiplexed {
            return local == addr;
        }
        let Ok(inode) = kernel.inode(socket) else {
            return false;
        };
        let mut cache = self.cache.lock().expect("registry cache lock");
        cache.get().is_ok_and(|st| {
            st.translations_of(&self.settings.instance).any(|t| {
                Some(t.protocol) == protocol
                    && t.socket_inode == inode
                    && t.virtual_port == addr.port()
                    && t.addr == addr.ip()
                    && t.real_port == local.port()
            })
        })
    }

    /// Whether a translation (of any protocol and address) has a real port
    /// other than its virtual one: `real_port`, or any (`None`).
    fn renames(&self, real_port: Option<u16>, look: Look) -> bool {
        let mut cache = self.cache.lock().expect("registry cache lock");
        match look {
            Look::Fresh => cache.renames(real_port),
            Look::Again => cache.renames_last(real_port),
        }
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

    /// Binds `socket` (of `protocol`) to a free real port standing for
    /// `addr` (the first the registry offers that the kernel accepts) and
    /// records the translation; `exact` asks for that real port alone (a
    /// restore taking back its connections' port). `Ok(None)`: none free.
    pub fn allocate<K: Kernel>(
        &self,
        kernel: &K,
        socket: &K::Socket,
        protocol: Protocol,
        addr: SocketAddr,
        exact: Option<u16>,
    ) -> Result<Option<u16>, i32> {
        let inode = kernel.inode(socket)?;
        let s = &self.settings;
        let hint = std::process::id() as usize + self.next_pick.fetch_add(1, Ordering::Relaxed);
        let live = kernel.live_sockets();
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
                match kernel.bind(socket, real) {
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

    pub fn connect<K, T>(&self, kernel: &K, task: &T) -> Connect<K::Socket>
    where
        K: Kernel,
        T: Task<Socket = K::Socket>,
    {
        let bytes = match task.address() {
            Ok(b) => b,
            Err(e) => return Connect::Answer(Response::Errno(e)),
        };
        let (socket, domain) = match task.socket() {
            Ok(TaskSocket::Inet { socket, domain, .. }) => (socket, domain),
            Ok(TaskSocket::Other(socket)) => return Connect::AsTask { socket, bytes },
            Err(e) => return Connect::Answer(Response::Errno(e)),
        };
        let protocol = match task.protocol(&socket) {
            Ok(p) => p,
            Err(e) => return Connect::Answer(Response::Errno(e)),
        };
        let remote = |a: &SocketAddr| {
            self.settings.cluster.negotiates(a.ip()) && !self.is_local(kernel, a.ip())
        };
        // An address that does not decode (AF_UNSPEC, an IPv4 address on
        // an IPv6 socket, a short one) is the kernel's to judge: the task's
        // own bytes.
        let (dest, protocol) = match (sockaddr::decode(domain, &bytes), protocol) {
            (Ok(a), Some(p)) => (a, p),
            _ => return Connect::Answer(Response::of(kernel.connect_raw(&socket, &bytes))),
        };
        if remote(&dest) {
            // Another host's port is negotiated with its agent, for UDP
            // as for TCP.
            return Connect::Negotiate {
                socket,
                protocol,
                dest,
            };
        }
        match self.route(kernel, protocol, dest) {
            Ok(target) => Connect::To { socket, target },
            // A UDP socket stays connected to the virtual port, where the
            // kernel refuses its datagrams as a closed port's (`udproutes`):
            // connect itself does not fail for a closed UDP port.
            Err(_) if protocol == Protocol::Udp => {
                Connect::Answer(Response::of(kernel.connect_raw(&socket, &bytes)))
            }
            Err(e) => {
                debug!(
                    "connect to {dest} refused: no instance of AID {}",
                    self.settings.aid
                );
                Connect::Answer(Response::Errno(e))
            }
        }
    }

    /// Where a connect to `dest` really goes, or the errno that refuses
    /// it.
    fn route<K: Kernel>(
        &self,
        kernel: &K,
        protocol: Protocol,
        dest: SocketAddr,
    ) -> Result<SocketAddr, i32> {
        if !self.is_local(kernel, dest.ip()) {
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
        match state.route(protocol, dest.ip(), dest.port(), &self.settings.aid, pick) {
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

    pub fn is_local<K: Kernel>(&self, kernel: &K, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        ip.is_loopback() || ip.is_unspecified() || kernel.is_host_address(ip)
    }

    pub fn name<K, T>(&self, kernel: &K, task: &T, side: Side) -> Name
    where
        K: Kernel,
        T: Task<Socket = K::Socket>,
    {
        let cluster = &self.settings.cluster;
        // Only a translation's real port, or a peer negotiated with another
        // host, is named otherwise than the kernel names it: with neither
        // on the host, the socket need not even be looked at.
        let negotiable = matches!(side, Side::Peer) && cluster.has_peers();
        if !negotiable && !self.renames(None, Look::Fresh) {
            return Name::Continue;
        }
        let (socket, local) = match task.socket() {
            Ok(TaskSocket::Inet { socket, local, .. }) => (socket, local),
            Ok(TaskSocket::Other(_)) => return Name::Continue,
            Err(e) => return Name::Errno(e),
        };
        let raw = match side {
            Side::Local => Ok(local),
            Side::Peer => kernel.peer_name(&socket),
        };
        let kernels = match raw {
            Ok(Some(a)) => a,
            Ok(None) => return Name::Errno(libc::EAFNOSUPPORT),
            Err(e) => return Name::Errno(e),
        };
        if !negotiable && !self.renames(Some(kernels.port()), Look::Again) {
            return Name::Continue;
        }
        let protocol = match task.protocol(&socket) {
            Ok(Some(p)) => p,
            Ok(None) => return Name::Continue,
            Err(e) => return Name::Errno(e),
        };
        let mut addr = kernels;
        let negotiated = match side {
            Side::Peer if cluster.has_peers() => kernel
                .inode(&socket)
                .ok()
                .and_then(|inode| cluster.peer_virtual_port(inode, addr)),
            _ => None,
        };
        let names_real_port = match side {
            Side::Local => true,
            Side::Peer => self.is_local(kernel, addr.ip()),
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
        if addr == kernels {
            Name::Continue
        } else {
            Name::Write(addr)
        }
    }
}

/// How a call reads the registry.
#[derive(Clone, Copy)]
enum Look {
    /// As of now.
    Fresh,
    /// As this call read it fresh a moment ago (the answer is then the
    /// registry's at a time after the call was made), sparing a second
    /// load of the change counter.
    Again,
}

pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}
