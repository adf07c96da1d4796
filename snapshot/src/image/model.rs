//! What an image holds: one instance's processes (its tree), their threads,
//! memory layout, file descriptors and the VPM view of their sockets.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub created_unix: u64,
    /// What wrote the image, e.g. `appshot 0.1.0 (commit 1a2b3c4d5e6f)`.
    pub writer: String,
    pub instance: InstanceInfo,
    /// Every process of the instance, parents before their children; the
    /// first is the instance's main process.
    pub processes: Vec<ProcessImage>,
    /// System V IPC objects of the instance's own IPC namespace.
    pub ipc: SysvIpc,
    /// memfd objects, each once, whatever fds and mappings name them.
    pub memfds: Vec<MemfdObject>,
    /// Names the state the image holds: random, drawn by the dump. A
    /// merged image keeps the id of the image it flattens (same state),
    /// so a later incremental snapshot may name either as its parent.
    pub id: u128,
    /// The image an incremental snapshot was taken on top of: its pages
    /// not written since are referenced there ([`PageRun::layer`]).
    pub parent: Option<ParentRef>,
}

/// How an incremental image names its parent: by path, and by what it
/// held when the child was taken, so that a parent replaced or rewritten
/// since is refused rather than read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParentRef {
    /// Relative to the child's directory (a chain moved as one directory
    /// still resolves), or absolute when they were in different ones.
    pub path: String,
    pub id: u128,
    pub pages_crc: u32,
    pub manifest_crc: u32,
}

impl Manifest {
    pub fn main(&self) -> &ProcessImage {
        &self.processes[0]
    }

    /// Bytes of pages the image refers to: the memory it restores, in its
    /// own pages section or, for an incremental image, in its parents'. A
    /// pre-copied image also holds earlier copies of pages written during
    /// the pre-copy, which nothing refers to.
    pub fn pages_bytes(&self) -> u64 {
        let page = crate::image::PAGE;
        let processes: u64 = self.processes.iter().map(|p| p.pages_bytes).sum();
        let memfds: u64 = self
            .memfds
            .iter()
            .flat_map(|o| &o.runs)
            .map(|r| r.pages * page)
            .sum();
        let shm: u64 = self
            .ipc
            .shm
            .iter()
            .map(|s| s.size.div_ceil(page) * page)
            .sum();
        processes + memfds + shm
    }

    /// Processes whose parent is not in the image (the namespace init's
    /// children): the ones init forks stubs for.
    pub fn top_level(&self) -> impl Iterator<Item = &ProcessImage> {
        self.processes
            .iter()
            .filter(|p| !self.processes.iter().any(|q| q.ns_pid == p.ns_ppid))
    }
}

/// A memfd (`memfd_create`): its bytes that hold data are in the pages
/// section, one [`PageRun`] per run with `addr` its offset in the file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemfdObject {
    pub inode: u64,
    pub name: String,
    pub size: u64,
    /// `F_GET_SEALS`.
    pub seals: i32,
    pub runs: Vec<PageRun>,
}

/// The System V IPC objects of an IPC namespace, each with its id (which
/// the application holds as a number and must find again).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SysvIpc {
    pub shm: Vec<SysvShm>,
    pub sem: Vec<SysvSem>,
    pub msg: Vec<SysvMsg>,
}

/// Key, id, owner and mode, common to every System V object.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpcPerm {
    pub key: i32,
    pub id: i32,
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SysvShm {
    pub perm: IpcPerm,
    pub size: u64,
    /// Its bytes, page-padded, at this offset of the pages section.
    pub offset: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SysvSem {
    pub perm: IpcPerm,
    pub values: Vec<u16>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SysvMsg {
    pub perm: IpcPerm,
    /// (type, text) in queue order.
    pub messages: Vec<(i64, Vec<u8>)>,
}

/// The instance the image was taken from. The AID and the virtual ports of
/// its listening sockets are what restore re-registers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceInfo {
    pub name: String,
    pub aid: String,
    pub command: Vec<String>,
    /// Ports the instance multiplexes (empty: all below the ephemeral range).
    pub multiplexed: Vec<u16>,
    /// Taken to be cloned: clones map its pages instead of copying them.
    pub template: bool,
    /// Taken with `--leave-running`: the original kept its connections, so
    /// a restore of this image closes its copies of them.
    #[serde(default)]
    pub left_running: bool,
}

/// A UDP socket: addresses as the application and the kernel both see
/// them (UDP is not multiplexed), and options.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UdpSocket {
    /// Local address (port 0: never bound).
    pub addr: String,
    /// The peer it is connected to.
    pub peer: Option<String>,
    pub flags: i32,
    pub v6only: bool,
    pub reuseaddr: bool,
    pub reuseport: bool,
    pub broadcast: bool,
    pub sndbuf: u32,
    pub rcvbuf: u32,
}

/// `struct tcp_repair_window`, as saved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpWindow {
    pub snd_wl1: u32,
    pub snd_wnd: u32,
    pub max_window: u32,
    pub rcv_wnd: u32,
    pub rcv_wup: u32,
}

/// A connected TCP socket: its addresses, sequence numbers, queues and the
/// options of its handshake, read in repair mode.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpConn {
    pub flags: i32,
    /// The kernel's (real) addresses.
    pub local: String,
    pub peer: String,
    /// As the application sees them (virtual ports).
    pub local_virtual: String,
    pub peer_virtual: String,
    /// TCP state at the snapshot (1: established). Any other is restored
    /// as a connection reset by its peer.
    pub state: u8,
    /// Sequence number after the last byte of the send queue.
    pub snd_seq: u32,
    /// Sequence number after the last byte of the receive queue.
    pub rcv_seq: u32,
    /// Sent-but-unacknowledged bytes, then `unsent` bytes never sent.
    pub send: Vec<u8>,
    pub unsent: u32,
    /// Received bytes the application has not read.
    pub recv: Vec<u8>,
    pub mss: u32,
    /// (send, receive) window scale, if negotiated.
    pub wscale: Option<(u8, u8)>,
    pub sack: bool,
    /// The timestamp clock, if timestamps were negotiated.
    pub timestamp: Option<u32>,
    pub window: TcpWindow,
    pub nodelay: bool,
    pub keepalive: bool,
    pub sndbuf: u32,
    pub rcvbuf: u32,
}

/// Identity of a file the image refers to instead of copying: restore
/// refuses to map a file that changed since.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRef {
    pub path: String,
    pub size: u64,
    pub mtime_ns: i64,
    pub ino: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmFields {
    pub start_code: u64,
    pub end_code: u64,
    pub start_data: u64,
    pub end_data: u64,
    pub start_brk: u64,
    pub brk: u64,
    pub start_stack: u64,
    pub arg_start: u64,
    pub arg_end: u64,
    pub env_start: u64,
    pub env_end: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessImage {
    /// PID inside the instance's PID namespace (restored exactly).
    pub ns_pid: u32,
    /// Parent, process group and session in the instance's PID namespace
    /// (0: outside it, as for a session the supervisor started).
    pub ns_ppid: u32,
    pub ns_pgid: u32,
    pub ns_sid: u32,
    pub exe: FileRef,
    pub cwd: String,
    pub umask: u32,
    /// (resource, soft, hard)
    pub rlimits: Vec<(u32, u64, u64)>,
    pub mm: MmFields,
    pub auxv: Vec<u64>,
    pub vmas: Vec<Vma>,
    pub sigactions: Vec<SigAction>,
    /// Raw siginfo of signals pending for the whole process.
    pub shared_pending: Vec<Vec<u8>>,
    pub threads: Vec<ThreadImage>,
    pub fds: Vec<FdImage>,
    /// The armed ones of ITIMER_REAL, ITIMER_VIRTUAL and ITIMER_PROF.
    pub itimers: Vec<ITimer>,
    /// timer_create timers, by id.
    pub posix_timers: Vec<PosixTimer>,
    /// fds that are, at the same number, the very open file description
    /// the parent holds: kept from the fork that creates the process.
    pub inherited: Vec<InheritedFd>,
    /// fds sharing an open file description first held by an earlier
    /// process of the image: taken from it (pidfd_getfd) at restore.
    pub fetched: Vec<FetchedFd>,
    /// fds of `fds` that exist only for later processes to fetch (the
    /// other end of a pipe this process no longer holds, a later process's
    /// Unix socket connected to one of this process's); closed once every
    /// process is rebuilt.
    pub stashed: Vec<i32>,
    /// Bytes of page data in the image's pages section.
    pub pages_bytes: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InheritedFd {
    pub fd: i32,
    pub cloexec: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchedFd {
    pub fd: i32,
    pub cloexec: bool,
    /// The earlier process (ns pid) and its fd that hold the description.
    pub from_pid: u32,
    pub from_fd: i32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vma {
    pub start: u64,
    pub end: u64,
    /// PROT_* bits.
    pub prot: u32,
    pub shared: bool,
    pub kind: VmaKind,
    /// Saved pages, in address order.
    pub pages: Vec<PageRun>,
    /// The parent has the same mapping at the same place: the process
    /// keeps the one its fork gave it, and only `pages` are written in it.
    pub inherited: bool,
    /// Of an inherited mapping, the (address, pages) runs still shared
    /// copy-on-write with the parent: neither saved nor written. Every
    /// other page of it that is not in `pages` is dropped (MADV_DONTNEED).
    pub cow: Vec<(u64, u64)>,
    /// What madvise, mlock and mmap flags set on it beyond its protection.
    pub advice: Advice,
}

/// What a process set on a mapping with madvise, mlock and mmap's flags,
/// as /proc/PID/smaps shows it (VmFlags). Made again on restore, once
/// every process of the tree is forked (a mapping kept from fork would
/// otherwise be missing or wiped in a child).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Advice {
    pub huge: HugePages,
    pub access: Access,
    pub lock: Lock,
    /// MADV_DONTFORK (`dc`).
    pub dont_fork: bool,
    /// MADV_WIPEONFORK (`wf`).
    pub wipe_on_fork: bool,
    /// MADV_DONTDUMP (`dd`).
    pub dont_dump: bool,
    /// MADV_MERGEABLE (`mg`): offered to KSM.
    pub mergeable: bool,
    /// Mapped with MAP_NORESERVE (`nr`): no swap space accounted for it.
    pub no_reserve: bool,
}

/// Transparent huge pages for a mapping.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum HugePages {
    /// As the system's setting says.
    #[default]
    System,
    /// MADV_HUGEPAGE (`hg`).
    Wanted,
    /// MADV_NOHUGEPAGE (`nh`).
    Refused,
}

/// The read-ahead a mapping asked for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Access {
    #[default]
    Normal,
    /// MADV_SEQUENTIAL (`sr`).
    Sequential,
    /// MADV_RANDOM (`rr`).
    Random,
}

/// Whether a mapping's pages are locked in memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Lock {
    #[default]
    Unlocked,
    /// mlock (`lo`): every page in memory, now.
    Locked,
    /// mlock2 MLOCK_ONFAULT (`lo lf`): pages locked as they are touched.
    OnFault,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmaKind {
    Anon,
    /// The main thread's stack, which must keep growing down after restore.
    Stack,
    File {
        file: FileRef,
        offset: u64,
    },
    /// MAP_SHARED|MAP_ANONYMOUS memory (`/dev/zero (deleted)`), one object
    /// per inode: its pages are saved with the first process that maps it,
    /// and every other process maps that process's object.
    SharedAnon {
        inode: u64,
    },
    /// `[vvar]`, `[vvar_vclock]` or `[vdso]`: moved as one block.
    Vdso(String),
    Vsyscall,
    /// A mapping of a memfd of [`Manifest::memfds`], shared or private, at
    /// `offset` in it.
    Memfd {
        inode: u64,
        offset: u64,
    },
    /// A System V shared memory segment attached whole (`shmat`); its
    /// bytes are in [`SysvIpc`], not in the mapping's pages.
    SysvShm {
        id: i32,
    },
}

/// `pages` contiguous pages from `addr`, stored at `offset` of the pages
/// section (page-aligned, so a restore can map them directly) of image
/// `layer` of the chain: 0 this image, 1 its parent, 2 the parent's
/// parent... Only a private mapping's runs are ever in another layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageRun {
    pub addr: u64,
    pub pages: u64,
    pub offset: u64,
    pub layer: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SigAction {
    pub signo: u32,
    pub handler: u64,
    pub flags: u64,
    pub restorer: u64,
    pub mask: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThreadImage {
    pub ns_tid: u32,
    /// Thread name (/proc/TID/comm).
    pub comm: String,
    /// `user_regs_struct`, field by field.
    pub regs: Vec<u64>,
    pub xstate: Vec<u8>,
    pub sigmask: u64,
    pub pending: Vec<Vec<u8>>,
    pub tid_address: u64,
    pub robust_list: (u64, u64),
    /// (ss_sp, ss_flags, ss_size)
    pub altstack: (u64, u32, u64),
    /// (pointer, len, signature), if the thread registered rseq.
    pub rseq: Option<(u64, u32, u32)>,
    /// Credentials are per thread in Linux, so each has its own.
    pub creds: Credentials,
}

/// Who a thread is to the kernel.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credentials {
    /// Real, effective, saved and filesystem uid.
    pub uids: [u32; 4],
    /// Real, effective, saved and filesystem gid.
    pub gids: [u32; 4],
    pub groups: Vec<u32>,
    pub caps: CapSets,
    /// `prctl(PR_GET_SECUREBITS)`.
    pub securebits: u32,
    pub no_new_privs: bool,
}

/// Capability sets, bit N for capability N.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapSets {
    pub inheritable: u64,
    pub permitted: u64,
    pub effective: u64,
    pub bounding: u64,
    pub ambient: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FdImage {
    pub fd: i32,
    pub cloexec: bool,
    pub kind: FdKind,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FdKind {
    /// 0, 1, 2: the restoring supervisor's own stdio takes their place, as a
    /// terminal or log of the old supervisor may not exist any more.
    Stdio,
    /// Regular file, directory or device, reopened by path.
    Path {
        file: FileRef,
        flags: i32,
        pos: u64,
    },
    Pipe {
        inode: u64,
        write_end: bool,
        flags: i32,
        capacity: u32,
        /// Unread bytes, stored once per pipe (on its lowest fd).
        data: Vec<u8>,
    },
    /// An unconnected TCP socket: listening, bound, or not yet bound
    /// (port 0).
    TcpSocket {
        /// The address the application believes it bound (virtual port).
        addr: String,
        listening: bool,
        flags: i32,
        v6only: bool,
        reuseaddr: bool,
        reuseport: bool,
        /// The real port it was bound to (0: none), taken again by a
        /// restore that owns the instance's connections.
        #[serde(default)]
        real_port: u16,
    },
    /// A connected TCP socket, saved in repair mode.
    TcpConn(Box<TcpConn>),
    /// A UDP socket, bound or connected (queued datagrams not saved).
    Udp(UdpSocket),
    Epoll {
        flags: i32,
        targets: Vec<EpollTarget>,
    },
    EventFd {
        count: u64,
        flags: i32,
        semaphore: bool,
    },
    /// A FIFO (named pipe) opened by path, with its unread bytes (stored
    /// once per FIFO, with its first fd).
    Fifo {
        file: FileRef,
        flags: i32,
        capacity: u32,
        data: Vec<u8>,
    },
    /// An open file description of a memfd of [`Manifest::memfds`].
    Memfd {
        inode: u64,
        flags: i32,
        pos: u64,
    },
    /// Shares the open file description of the lower fd `of` (made by
    /// `dup`, `dup2`, `F_DUPFD`): offset and status flags are one.
    Dup {
        of: i32,
    },
    Unix(UnixSocket),
    TimerFd(TimerFd),
    SignalFd {
        /// Bit N-1 for signal N.
        mask: u64,
        flags: i32,
    },
    /// Events queued but not read are not kept.
    Inotify {
        flags: i32,
        watches: Vec<InotifyWatch>,
    },
}

/// Time left and period of a timer when it was saved, in nanoseconds; a
/// zero `value_ns` is a disarmed timer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimerTime {
    pub value_ns: u64,
    pub interval_ns: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimerFd {
    pub clockid: i32,
    pub flags: i32,
    pub time: TimerTime,
    /// Expirations counted but not read yet.
    pub ticks: u64,
}

/// An interval timer (setitimer), re-armed with the time it had left.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ITimer {
    /// ITIMER_REAL, ITIMER_VIRTUAL or ITIMER_PROF.
    pub which: i32,
    pub time: TimerTime,
}

/// A timer_create timer, recreated under its id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PosixTimer {
    pub id: i32,
    pub clockid: i32,
    /// SIGEV_SIGNAL, SIGEV_NONE, or either with SIGEV_THREAD_ID.
    pub notify: i32,
    pub signo: i32,
    /// `sigev_value`, handed back in the signal's siginfo.
    pub sigval: u64,
    /// With SIGEV_THREAD_ID: the thread signalled (TID in the namespace).
    pub thread: Option<u32>,
    pub time: TimerTime,
}

/// One inotify watch under the number the application knows it by.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InotifyWatch {
    pub wd: i32,
    pub path: String,
    /// Events, with IN_ONESHOT and IN_EXCL_UNLINK if they were asked for.
    pub mask: u32,
}

/// A Unix socket whose every peer is in the process.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnixSocket {
    /// The socket's inode: how other sockets of the image name it.
    pub inode: u64,
    /// SOCK_STREAM, SOCK_DGRAM or SOCK_SEQPACKET.
    pub sock_type: i32,
    pub flags: i32,
    pub name: Option<UnixName>,
    pub role: UnixRole,
    pub passcred: bool,
    /// As `getsockopt` reports them (twice what was asked for).
    pub sndbuf: i32,
    pub rcvbuf: i32,
    /// SO_PEEK_OFF (-1: off).
    pub peek_off: i32,
    /// What waits to be read: messages (datagram, seqpacket) or runs of
    /// bytes (stream), oldest first; sent again by the peer on restore.
    pub queue: Vec<Vec<u8>>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnixName {
    /// `sun_path` as bound: a leading NUL for an abstract name, otherwise
    /// the path as the application gave it (maybe relative).
    pub sun_path: Vec<u8>,
    /// A path name's socket file: its absolute path, the directory a
    /// relative `sun_path` is bound in, owner and mode.
    pub file: Option<UnixFile>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnixFile {
    pub path: String,
    pub dir: String,
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum UnixRole {
    /// Bound or not, neither listening nor connected.
    Unconnected,
    /// `pending`: the client sockets of its not yet accepted connections,
    /// in the order they would be accepted.
    Listening { backlog: u32, pending: Vec<u64> },
    /// Connected to the socket of the image with inode `peer`. A socket
    /// `accepted` from a listener of the image is rebuilt by connecting to
    /// it and accepting, so both ends keep their addresses.
    Connected {
        peer: u64,
        accepted_from: Option<u64>,
    },
    /// Connected to the listener `listener` of the image and not accepted
    /// yet.
    Pending { listener: u64 },
    /// Connected to a peer outside the instance, saved by `appshot snapshot
    /// --external-unix close`: restored as a socket whose peer has closed
    /// (reads see EOF, writes EPIPE or ECONNREFUSED). What the outside peer
    /// had sent and the socket's name are not kept.
    Closed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpollTarget {
    pub fd: i32,
    pub events: u32,
    pub data: u64,
}

impl ProcessImage {
    /// Virtual ports of the listening sockets, for display and registration.
    pub fn listening(&self) -> impl Iterator<Item = &str> {
        self.fds.iter().filter_map(|f| match &f.kind {
            FdKind::TcpSocket {
                addr,
                listening: true,
                ..
            } => Some(addr.as_str()),
            _ => None,
        })
    }
}
