//! The multiplexer's policy driven through its seam with a recording
//! double (as youki's `TestHelperSyscall`): each test gives the task's
//! request and what the kernel holds, and asserts what the policy did to
//! the kernel and what it answers. No process, no root: the registry is a
//! temporary directory.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeSet, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use appshot_sys::seccomp::Response;
use appshot_vpm::{
    CachedRegistry, InstanceLock, InstanceRecord, PortRange, Protocol, Registry, Translation,
};

use super::policy::{Bind, Connect, Kernel, Name, Policy, Side, Task, TaskSocket};
use super::{PortSet, Settings};
use crate::multiplex::sockaddr;
use crate::net::remote::{Cluster, ClusterSettings};

/// A socket the double holds, by number; its inode is 1000 + that number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Sock(u64);

impl Sock {
    fn inode(self) -> u64 {
        1000 + self.0
    }
}

/// A syscall the policy made, as the double recorded it.
#[derive(Debug, PartialEq, Eq)]
enum Op {
    Bind(Sock, SocketAddr),
    ConnectRaw(Sock, Vec<u8>),
    PeerName(Sock),
}

/// The kernel as the tests arrange it, recording every call that acts.
#[derive(Default)]
struct Recorder {
    ops: RefCell<Vec<Op>>,
    /// Real ports some other socket on the host holds: bind gets
    /// EADDRINUSE.
    busy: HashSet<u16>,
    /// What getpeername answers.
    peer: Option<SocketAddr>,
}

impl Kernel for Recorder {
    type Socket = Sock;

    fn bind(&self, socket: &Sock, addr: SocketAddr) -> Result<(), i32> {
        self.ops.borrow_mut().push(Op::Bind(*socket, addr));
        if self.busy.contains(&addr.port()) {
            return Err(libc::EADDRINUSE);
        }
        Ok(())
    }

    fn connect_raw(&self, socket: &Sock, bytes: &[u8]) -> Result<(), i32> {
        self.ops
            .borrow_mut()
            .push(Op::ConnectRaw(*socket, bytes.to_vec()));
        Ok(())
    }

    fn peer_name(&self, socket: &Sock) -> Result<Option<SocketAddr>, i32> {
        self.ops.borrow_mut().push(Op::PeerName(*socket));
        self.peer.map(Some).ok_or(libc::ENOTCONN)
    }

    fn inode(&self, socket: &Sock) -> Result<u64, i32> {
        Ok(socket.inode())
    }

    fn live_sockets(&self) -> HashSet<u64> {
        (1000..1100).collect()
    }

    fn is_host_address(&self, _ip: IpAddr) -> bool {
        false
    }
}

/// What is behind the task's fd number each time the policy looks.
#[derive(Clone, Copy)]
enum Behind {
    Tcp {
        sock: Sock,
        v6: bool,
        local: Option<SocketAddr>,
    },
    Udp {
        sock: Sock,
        local: Option<SocketAddr>,
    },
    Unix {
        sock: Sock,
    },
}

/// The notifying task: its address bytes, and what its fd holds on the
/// first look and on any later one (another thread's dup2 in between).
struct FakeTask {
    address: Vec<u8>,
    first: Behind,
    later: Behind,
    looks: Cell<u32>,
    cap_net_bind_service: bool,
}

impl FakeTask {
    fn new(address: Vec<u8>, behind: Behind) -> FakeTask {
        FakeTask {
            address,
            first: behind,
            later: behind,
            looks: Cell::new(0),
            cap_net_bind_service: false,
        }
    }

    /// The fd holds `first` when the call is decided and `later` after.
    fn swapped(address: Vec<u8>, first: Behind, later: Behind) -> FakeTask {
        FakeTask {
            later,
            ..FakeTask::new(address, first)
        }
    }
}

impl Task for FakeTask {
    type Socket = Sock;

    fn address(&self) -> Result<Vec<u8>, i32> {
        Ok(self.address.clone())
    }

    fn socket(&self) -> Result<TaskSocket<Sock>, i32> {
        let behind = if self.looks.get() == 0 {
            self.first
        } else {
            self.later
        };
        self.looks.set(self.looks.get() + 1);
        Ok(match behind {
            Behind::Tcp { sock, v6, local } => TaskSocket::Inet {
                socket: sock,
                domain: if v6 { libc::AF_INET6 } else { libc::AF_INET },
                local,
            },
            Behind::Udp { sock, local } => TaskSocket::Inet {
                socket: sock,
                domain: libc::AF_INET,
                local,
            },
            Behind::Unix { sock } => TaskSocket::Other(sock),
        })
    }

    /// The protocol of whichever socket the fd held that is `socket`.
    fn protocol(&self, socket: &Sock) -> Result<Option<Protocol>, i32> {
        [self.first, self.later]
            .into_iter()
            .find_map(|b| match b {
                Behind::Tcp { sock, .. } if sock == *socket => Some(Some(Protocol::Tcp)),
                Behind::Udp { sock, .. } if sock == *socket => Some(Some(Protocol::Udp)),
                _ => None,
            })
            .ok_or(libc::EBADF)
    }

    fn may_bind_privileged(&self) -> bool {
        self.cap_net_bind_service
    }
}

/// One instance `web` of AID `a` multiplexing port 9000 (and 80), real
/// ports from 20000-20009, with a registry of its own; other instances are
/// added with [`World::other`].
struct World {
    _dir: tempfile::TempDir,
    registry: Registry,
    policy: Policy,
    _locks: Vec<InstanceLock>,
}

const INSTANCE: &str = "web";
const AID: &str = "a";

impl World {
    fn new() -> World {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        let registry = Registry::open(&run).unwrap();
        let lock = InstanceLock::acquire(&registry, INSTANCE).unwrap();
        register(&registry, INSTANCE, AID);
        let cluster = Cluster::new(&ClusterSettings::default(), &run, INSTANCE, AID).unwrap();
        let settings = Settings {
            instance: INSTANCE.into(),
            aid: AID.into(),
            multiplexed: PortSet::Listed(BTreeSet::from([80, 9000])),
            range: PortRange {
                start: 20000,
                end: 20009,
            },
            allocation_timeout: Duration::from_millis(0),
            init_pid: 1,
            cluster: Arc::clone(&cluster),
            route_udp: false,
        };
        let policy = Policy::new(
            settings,
            Registry::open(&run).unwrap(),
            CachedRegistry::new(Registry::open(&run).unwrap()),
            1024,
            0,
        );
        World {
            _dir: dir,
            registry,
            policy,
            _locks: vec![lock],
        }
    }

    /// Another running instance `name` of `aid` whose socket bound virtual
    /// port 9000 on 0.0.0.0 and really holds `real_port`.
    fn other(&mut self, name: &str, aid: &str, real_port: u16) {
        self.other_at(name, aid, "0.0.0.0", real_port);
    }

    /// As [`World::other`], bound to `ip`.
    fn other_at(&mut self, name: &str, aid: &str, ip: &str, real_port: u16) {
        self._locks
            .push(InstanceLock::acquire(&self.registry, name).unwrap());
        register(&self.registry, name, aid);
        self.translate_at(name, aid, ip, 9000, real_port, 1);
    }

    fn translate(&self, owner: &str, aid: &str, virtual_port: u16, real_port: u16, inode: u64) {
        self.translate_at(owner, aid, "0.0.0.0", virtual_port, real_port, inode);
    }

    fn translate_at(
        &self,
        owner: &str,
        aid: &str,
        ip: &str,
        virtual_port: u16,
        real_port: u16,
        inode: u64,
    ) {
        self.registry
            .transaction(|s| {
                s.insert(Translation {
                    protocol: Protocol::Tcp,
                    addr: ip.parse().unwrap(),
                    virtual_port,
                    aid: aid.into(),
                    real_port,
                    owner: owner.into(),
                    socket_inode: inode,
                })
            })
            .unwrap();
    }

    fn translations_of(&self, owner: &str) -> Vec<(u16, u16)> {
        self.registry
            .read()
            .unwrap()
            .translations_of(owner)
            .map(|t| (t.virtual_port, t.real_port))
            .collect()
    }
}

pub(super) fn register(registry: &Registry, name: &str, aid: &str) {
    registry
        .transaction(|s| {
            s.instances.insert(
                name.into(),
                InstanceRecord {
                    name: name.into(),
                    aid: aid.into(),
                    supervisor_pid: std::process::id(),
                    pid: std::process::id(),
                    command: vec!["server".into()],
                    started_unix: 0,
                    multiplexed: vec![9000],
                    config: None,
                    user: None,
                    port_range: None,
                },
            );
        })
        .unwrap();
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn bytes(s: &str) -> Vec<u8> {
    sockaddr::encode(&addr(s))
}

const S1: Sock = Sock(1);
const S2: Sock = Sock(2);

fn tcp(local: Option<&str>) -> Behind {
    Behind::Tcp {
        sock: S1,
        v6: false,
        local: local.map(addr),
    }
}

fn answer<S>(b: Bind<S>) -> Response {
    match b {
        Bind::Answer(r) => r,
        Bind::AsTask { .. } => panic!("performed as the task"),
        Bind::Wait { .. } => panic!("waits for a port"),
    }
}

#[test]
fn the_first_bind_of_a_multiplexed_port_gets_the_port_itself() {
    let w = World::new();
    let k = Recorder::default();
    let task = FakeTask::new(bytes("0.0.0.0:9000"), tcp(Some("0.0.0.0:0")));
    assert_eq!(answer(w.policy.bind(&k, &task)), Response::Value(0));
    assert_eq!(*k.ops.borrow(), [Op::Bind(S1, addr("0.0.0.0:9000"))]);
    assert_eq!(w.translations_of(INSTANCE), [(9000, 9000)]);
}

#[test]
fn a_bind_after_another_aids_gets_a_real_port_and_getsockname_answers_the_virtual_one() {
    let mut w = World::new();
    w.other("web-b", "b", 9000);
    let k = Recorder {
        busy: HashSet::from([9000]),
        ..Recorder::default()
    };
    let task = FakeTask::new(bytes("0.0.0.0:9000"), tcp(Some("0.0.0.0:0")));
    assert_eq!(answer(w.policy.bind(&k, &task)), Response::Value(0));
    let [Op::Bind(S1, real)] = k.ops.borrow()[..] else {
        panic!("one bind: {:?}", k.ops.borrow());
    };
    assert!((20000..=20009).contains(&real.port()), "{real}");
    assert_eq!(w.translations_of(INSTANCE), [(9000, real.port())]);

    let bound = FakeTask::new(Vec::new(), tcp(Some(&real.to_string())));
    assert_eq!(
        w.policy.name(&k, &bound, Side::Local),
        Name::Write(addr("0.0.0.0:9000"))
    );
}

#[test]
fn a_restarted_bind_succeeds_again_without_binding() {
    // The supervisor bound the socket to real port 20003, then a signal
    // interrupted the task, and the kernel restarts the same bind.
    let w = World::new();
    w.translate(INSTANCE, AID, 9000, 20003, S1.inode());
    let k = Recorder::default();
    let task = FakeTask::new(bytes("0.0.0.0:9000"), tcp(Some("0.0.0.0:20003")));
    assert_eq!(answer(w.policy.bind(&k, &task)), Response::Value(0));
    assert!(k.ops.borrow().is_empty(), "{:?}", k.ops.borrow());
    assert_eq!(w.translations_of(INSTANCE), [(9000, 20003)]);
}

#[test]
fn a_socket_swapped_behind_the_fd_is_never_the_one_acted_on() {
    // fdswap.c: another thread dup2()s a Unix socket over the fd between
    // the notification and the answer. The policy looks once and binds
    // the TCP socket it duplicated then; it never lets the kernel continue.
    let w = World::new();
    let k = Recorder::default();
    let task = FakeTask::swapped(
        bytes("0.0.0.0:9000"),
        tcp(Some("0.0.0.0:0")),
        Behind::Unix { sock: S2 },
    );
    assert_eq!(answer(w.policy.bind(&k, &task)), Response::Value(0));
    assert_eq!(task.looks.get(), 1);
    assert_eq!(*k.ops.borrow(), [Op::Bind(S1, addr("0.0.0.0:9000"))]);

    // And the other way round: a Unix socket at decision time is bound as
    // the task on its own duplicate, with the task's bytes, even if a TCP
    // socket is behind the fd by then.
    let task = FakeTask::swapped(
        b"\x01\x00/tmp/sock\x00".to_vec(),
        Behind::Unix { sock: S2 },
        tcp(Some("0.0.0.0:0")),
    );
    match w.policy.bind(&k, &task) {
        Bind::AsTask { socket, bytes } => {
            assert_eq!(socket, S2);
            assert_eq!(bytes, b"\x01\x00/tmp/sock\x00");
        }
        _ => panic!("a Unix bind is performed as the task"),
    }
    assert_eq!(task.looks.get(), 1);
}

#[test]
fn port_0_and_unmultiplexed_ports_are_the_tasks_own_bind() {
    let w = World::new();
    let k = Recorder::default();
    for asked in ["0.0.0.0:0", "127.0.0.1:40000"] {
        let task = FakeTask::new(bytes(asked), tcp(Some("0.0.0.0:0")));
        match w.policy.bind(&k, &task) {
            Bind::AsTask { socket, bytes: b } => {
                assert_eq!(socket, S1);
                assert_eq!(b, bytes(asked), "the task's bytes, untouched");
            }
            _ => panic!("{asked}: not performed as the task"),
        }
    }
    assert!(k.ops.borrow().is_empty());
    assert!(w.translations_of(INSTANCE).is_empty());

    // Its name, whatever the kernel chose, is the kernel's to answer.
    let bound = FakeTask::new(Vec::new(), tcp(Some("0.0.0.0:45678")));
    assert_eq!(w.policy.name(&k, &bound, Side::Local), Name::Continue);
}

#[test]
fn a_bind_of_another_instances_real_port_is_refused() {
    let mut w = World::new();
    w.other("web-b", "b", 20005);
    let k = Recorder::default();
    let task = FakeTask::new(bytes("0.0.0.0:20005"), tcp(Some("0.0.0.0:0")));
    assert_eq!(
        answer(w.policy.bind(&k, &task)),
        Response::Errno(libc::EADDRINUSE)
    );
    assert!(k.ops.borrow().is_empty());
}

#[test]
fn an_af_unspec_bind_is_multiplexed_as_inaddr_any() {
    // The kernel takes AF_UNSPEC with INADDR_ANY on an IPv4 socket as
    // AF_INET: so does the multiplexer.
    let w = World::new();
    let k = Recorder::default();
    let mut unspec = bytes("0.0.0.0:9000");
    unspec[..2].copy_from_slice(&(libc::AF_UNSPEC as u16).to_ne_bytes());
    let task = FakeTask::new(unspec, tcp(Some("0.0.0.0:0")));
    assert_eq!(answer(w.policy.bind(&k, &task)), Response::Value(0));
    assert_eq!(*k.ops.borrow(), [Op::Bind(S1, addr("0.0.0.0:9000"))]);
    assert_eq!(w.translations_of(INSTANCE), [(9000, 9000)]);
}

#[test]
fn a_privileged_virtual_port_needs_the_tasks_capability() {
    let w = World::new();
    let k = Recorder::default();
    let mut task = FakeTask::new(bytes("0.0.0.0:80"), tcp(Some("0.0.0.0:0")));
    assert_eq!(
        answer(w.policy.bind(&k, &task)),
        Response::Errno(libc::EACCES)
    );
    assert!(k.ops.borrow().is_empty());
    task.cap_net_bind_service = true;
    assert_eq!(answer(w.policy.bind(&k, &task)), Response::Value(0));
    assert_eq!(*k.ops.borrow(), [Op::Bind(S1, addr("0.0.0.0:80"))]);
}

#[test]
fn an_exhausted_range_waits_for_a_port() {
    let mut w = World::new();
    w.other("web-b", "b", 9000);
    let k = Recorder {
        busy: (20000..=20009).chain([9000]).collect(),
        ..Recorder::default()
    };
    let task = FakeTask::new(bytes("0.0.0.0:9000"), tcp(Some("0.0.0.0:0")));
    match w.policy.bind(&k, &task) {
        Bind::Wait {
            socket, addr: a, ..
        } => {
            assert_eq!((socket, a), (S1, addr("0.0.0.0:9000")));
        }
        _ => panic!("no port free: the bind waits"),
    }
    assert!(w.translations_of(INSTANCE).is_empty());
}

fn target<S>(c: Connect<S>) -> Result<SocketAddr, Response> {
    match c {
        Connect::To { target, .. } => Ok(target),
        Connect::Answer(r) => Err(r),
        Connect::AsTask { .. } => panic!("performed as the task"),
        Connect::Negotiate { .. } => panic!("negotiated"),
    }
}

#[test]
fn a_connect_to_the_virtual_port_reaches_its_own_aid_only() {
    let mut w = World::new();
    w.other("web-b", "b", 20001);
    let k = Recorder::default();
    let task = FakeTask::new(bytes("127.0.0.1:9000"), tcp(None));
    assert_eq!(
        target(w.policy.connect(&k, &task)),
        Err(Response::Errno(libc::ECONNREFUSED)),
        "no instance of AID a serves 9000"
    );
    w.other("web-a2", AID, 20002);
    assert_eq!(
        target(w.policy.connect(&k, &task)),
        Ok(addr("127.0.0.1:20002"))
    );
    assert!(
        k.ops.borrow().is_empty(),
        "the glue connects, not the policy"
    );
}

#[test]
fn a_connect_to_another_aids_real_port_is_refused() {
    let mut w = World::new();
    w.other("web-b", "b", 20001);
    let k = Recorder::default();
    let task = FakeTask::new(bytes("127.0.0.1:20001"), tcp(None));
    assert_eq!(
        target(w.policy.connect(&k, &task)),
        Err(Response::Errno(libc::ECONNREFUSED))
    );
    // A port no instance uses passes through.
    let task = FakeTask::new(bytes("127.0.0.1:5555"), tcp(None));
    assert_eq!(
        target(w.policy.connect(&k, &task)),
        Ok(addr("127.0.0.1:5555"))
    );
}

#[test]
fn a_datagram_connect_goes_to_its_aids_real_port_or_stays_on_the_closed_virtual_one() {
    let mut w = World::new();
    w.other("dns-a", AID, 20002);
    w.other("dns-b", "b", 20003);
    w.registry
        .transaction(|s| {
            for t in s.translations.iter_mut() {
                t.protocol = Protocol::Udp;
            }
        })
        .unwrap();
    let k = Recorder::default();
    let udp = |to: &str| {
        FakeTask::new(
            bytes(to),
            Behind::Udp {
                sock: S1,
                local: None,
            },
        )
    };
    // The supervisor connects it to its own AID's instance.
    assert_eq!(
        target(w.policy.connect(&k, &udp("127.0.0.1:9000"))),
        Ok(addr("127.0.0.1:20002"))
    );
    // Another AID's real port is not reached through its real port either:
    // a UDP connect to a closed port does not fail, so the task's own
    // connect is made, and the kernel's rules refuse its datagrams.
    assert_eq!(
        target(w.policy.connect(&k, &udp("127.0.0.1:20003"))),
        Err(Response::Value(0))
    );
    // A port no instance uses passes through.
    assert_eq!(
        target(w.policy.connect(&k, &udp("127.0.0.1:5555"))),
        Ok(addr("127.0.0.1:5555"))
    );
    assert_eq!(
        *k.ops.borrow(),
        [Op::ConnectRaw(S1, bytes("127.0.0.1:20003"))]
    );
}

#[test]
fn undecodable_connects_go_to_the_kernel_with_the_tasks_bytes() {
    let w = World::new();
    let k = Recorder::default();
    let mut unspec = bytes("127.0.0.1:9000");
    unspec[..2].copy_from_slice(&(libc::AF_UNSPEC as u16).to_ne_bytes());
    let disconnect = FakeTask::new(unspec.clone(), tcp(None));
    assert_eq!(
        target(w.policy.connect(&k, &disconnect)),
        Err(Response::Value(0))
    );
    assert_eq!(*k.ops.borrow(), [Op::ConnectRaw(S1, unspec)]);
}

#[test]
fn getpeername_answers_the_virtual_port_and_other_families_continue() {
    let mut w = World::new();
    w.other("web-a2", AID, 20002);
    let k = Recorder {
        peer: Some(addr("127.0.0.1:20002")),
        ..Recorder::default()
    };
    let task = FakeTask::new(Vec::new(), tcp(Some("127.0.0.1:41000")));
    assert_eq!(
        w.policy.name(&k, &task, Side::Peer),
        Name::Write(addr("127.0.0.1:9000"))
    );
    assert_eq!(*k.ops.borrow(), [Op::PeerName(S1)]);

    let unix = FakeTask::new(Vec::new(), Behind::Unix { sock: S2 });
    assert_eq!(w.policy.name(&k, &unix, Side::Local), Name::Continue);
}

#[test]
fn an_ipv6_bind_of_the_virtual_port_is_multiplexed_too() {
    let w = World::new();
    let k = Recorder::default();
    let task = FakeTask::new(
        bytes("[::]:9000"),
        Behind::Tcp {
            sock: S1,
            v6: true,
            local: Some(addr("[::]:0")),
        },
    );
    assert_eq!(answer(w.policy.bind(&k, &task)), Response::Value(0));
    assert_eq!(*k.ops.borrow(), [Op::Bind(S1, addr("[::]:9000"))]);
}

#[test]
fn a_peer_on_another_host_keeps_its_port() {
    // 20002 is a real port here, but a peer at another host's address is
    // never one of this registry's sockets.
    let mut w = World::new();
    w.other("web-a2", AID, 20002);
    let k = Recorder {
        peer: Some(addr("10.1.2.3:20002")),
        ..Recorder::default()
    };
    let task = FakeTask::new(Vec::new(), tcp(Some("10.0.0.1:41000")));
    assert_eq!(w.policy.name(&k, &task, Side::Peer), Name::Continue);
}

#[test]
fn an_ipv4_client_reaches_a_dual_stack_listener_of_its_aid() {
    let mut w = World::new();
    w.other_at("web-a6", AID, "::", 20004);
    let k = Recorder::default();
    let task = FakeTask::new(bytes("127.0.0.1:9000"), tcp(None));
    assert_eq!(
        target(w.policy.connect(&k, &task)),
        Ok(addr("127.0.0.1:20004"))
    );
}

fn udp(local: &str) -> Behind {
    Behind::Udp {
        sock: S1,
        local: Some(addr(local)),
    }
}

#[test]
fn a_udp_bind_is_multiplexed_only_where_the_kernel_routes_datagrams() {
    // Without the instance's cgroup (no datagram routing), UDP ports are
    // the task's own, as before UDP was multiplexed.
    let mut w = World::new();
    w.other("web-b", "b", 9000);
    let k = Recorder::default();
    let task = FakeTask::new(bytes("0.0.0.0:9000"), udp("0.0.0.0:0"));
    assert!(matches!(w.policy.bind(&k, &task), Bind::AsTask { .. }));
    assert!(k.ops.borrow().is_empty());

    // With it, a real port of UDP's own: another AID's TCP translation of
    // 9000 does not take the UDP port.
    w.policy.settings.route_udp = true;
    assert_eq!(answer(w.policy.bind(&k, &task)), Response::Value(0));
    assert_eq!(*k.ops.borrow(), [Op::Bind(S1, addr("0.0.0.0:9000"))]);
    let rows: Vec<_> = w
        .registry
        .read()
        .unwrap()
        .translations_of(INSTANCE)
        .map(|t| (t.protocol, t.virtual_port, t.real_port))
        .collect();
    assert_eq!(rows, [(Protocol::Udp, 9000, 9000)]);
}

#[test]
fn a_connected_udp_sockets_peer_is_the_kernels() {
    // The kernel's NAT is below the socket: the peer it reports is the
    // virtual port the task connected to, left as it is.
    let mut w = World::new();
    w.policy.settings.route_udp = true;
    w.other("web-a2", AID, 20002);
    let k = Recorder {
        peer: Some(addr("127.0.0.1:20002")),
        ..Recorder::default()
    };
    let task = FakeTask::new(Vec::new(), udp("127.0.0.1:41000"));
    assert_eq!(w.policy.name(&k, &task, Side::Peer), Name::Continue);
}

#[test]
fn names_no_translation_renames_are_the_kernels_without_a_look_at_the_socket() {
    // The first instance on a port holds the port itself: nothing renamed.
    let mut w = World::new();
    w.other("web-b", "b", 9000);
    let k = Recorder {
        peer: Some(addr("127.0.0.1:9000")),
        ..Recorder::default()
    };
    let task = FakeTask::new(Vec::new(), tcp(Some("127.0.0.1:9000")));
    for side in [Side::Local, Side::Peer] {
        assert_eq!(w.policy.name(&k, &task, side), Name::Continue);
    }
    assert_eq!(task.looks.get(), 0, "the socket was duplicated");
    assert!(k.ops.borrow().is_empty());

    // Once a port is renamed, names are looked at, and only the renamed
    // real port is answered otherwise than the kernel would.
    w.other("web-c", "c", 20003);
    assert_eq!(w.policy.name(&k, &task, Side::Local), Name::Continue);
    let renamed = FakeTask::new(Vec::new(), tcp(Some("127.0.0.1:20003")));
    assert_eq!(
        w.policy.name(&k, &renamed, Side::Local),
        Name::Write(addr("127.0.0.1:9000"))
    );
    assert_eq!((task.looks.get(), renamed.looks.get()), (1, 1));
}

/// The binds and the instance's translations after a restored socket was
/// bound, or its error.
fn restored_tcp(
    w: &World,
    k: &Recorder,
    addr_: &str,
    real_port: u16,
) -> Result<Vec<(u16, u16)>, appshot_snapshot::ListenError> {
    w.policy
        .bind_restored_tcp(k, &S1, addr(addr_), real_port)
        .map(|()| w.translations_of(INSTANCE))
}

#[test]
fn a_clones_listening_sockets_get_real_ports_of_their_own() {
    // The template runs on and holds 9000; the clone's restore asks for no
    // real port in particular (its connections are reset), so each of its
    // listeners gets a free one, registered as the clone's.
    let mut w = World::new();
    w.other("template", "a", 9000);
    let k = Recorder {
        busy: HashSet::from([9000]),
        ..Recorder::default()
    };
    let ports = restored_tcp(&w, &k, "0.0.0.0:9000", 0).unwrap();
    let [Op::Bind(S1, real)] = k.ops.borrow()[..] else {
        panic!("one bind: {:?}", k.ops.borrow());
    };
    assert!((20000..=20009).contains(&real.port()), "{real}");
    assert_eq!(ports, [(9000, real.port())]);
    assert_eq!(w.translations_of("template"), [(9000, 9000)]);
}

#[test]
fn a_restore_that_owns_its_connections_takes_their_real_port_or_fails() {
    let mut w = World::new();
    let k = Recorder::default();
    assert_eq!(
        restored_tcp(&w, &k, "0.0.0.0:9000", 20005).unwrap(),
        [(9000, 20005)]
    );
    assert_eq!(*k.ops.borrow(), [Op::Bind(S1, addr("0.0.0.0:20005"))]);

    // Another instance took the real port meanwhile: the connections
    // cannot come back, and no other port is taken instead.
    w.other("web-b", "b", 20006);
    let k = Recorder::default();
    assert!(matches!(
        restored_tcp(&w, &k, "0.0.0.0:80", 20006),
        Err(appshot_snapshot::ListenError::RealPortTaken {
            real_port: 20006,
            virtual_port: 80
        })
    ));
    assert!(k.ops.borrow().is_empty());
    assert_eq!(w.translations_of(INSTANCE), [(9000, 20005)]);
}

#[test]
fn a_restored_socket_outside_the_multiplexed_ports_is_bound_as_it_was() {
    let w = World::new();
    let k = Recorder::default();
    assert_eq!(restored_tcp(&w, &k, "0.0.0.0:7000", 0).unwrap(), []);
    // Never bound: left so. Bound to an address only: bound to it again.
    assert_eq!(restored_tcp(&w, &k, "0.0.0.0:0", 0).unwrap(), []);
    assert_eq!(restored_tcp(&w, &k, "127.0.0.1:0", 0).unwrap(), []);
    assert_eq!(
        *k.ops.borrow(),
        [
            Op::Bind(S1, addr("0.0.0.0:7000")),
            Op::Bind(S1, addr("127.0.0.1:0"))
        ]
    );
}

#[test]
fn a_restored_udp_socket_is_multiplexed_only_where_the_kernel_routes_datagrams() {
    let mut w = World::new();
    w.other("web-b", "b", 9000);
    let k = Recorder::default();
    w.policy
        .bind_restored_udp(&k, &S1, addr("0.0.0.0:9000"))
        .unwrap();
    assert_eq!(w.translations_of(INSTANCE), []);
    w.policy.settings.route_udp = true;
    w.policy
        .bind_restored_udp(&k, &S2, addr("0.0.0.0:9000"))
        .unwrap();
    assert_eq!(
        *k.ops.borrow(),
        [
            Op::Bind(S1, addr("0.0.0.0:9000")),
            Op::Bind(S2, addr("0.0.0.0:9000"))
        ]
    );
    assert_eq!(w.translations_of(INSTANCE), [(9000, 9000)]);
}
