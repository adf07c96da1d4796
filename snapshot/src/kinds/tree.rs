//! The process tree: who each process is in the instance's PID namespace
//! (parent, process group, session), which of its fds it shares with
//! processes built before it, and how a restore recreates those links:
//! children forked from their rebuilt parents (so that what was inherited is
//! inherited again), sessions and groups set, shared fds taken from the
//! process that holds them.

use std::collections::{BTreeMap, HashMap};

use appshot_sys::abi::CloneArgs;
use appshot_sys::pidfd;
use appshot_sys::sockdiag::{self, UnixDiag};

use crate::error::{RestoreError, SnapshotError};
use crate::image::model::{FdImage, FdKind, FetchedFd, InheritedFd, ProcessImage};
use crate::proc::parse;
use crate::ptrace::{Frozen, Injector, Memory};

/// A process's identity in the instance's PID namespace (0: outside it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ids {
    pub pid: u32,
    pub ppid: u32,
    pub pgid: u32,
    pub sid: u32,
}

fn innermost(status: &str, field: &str) -> Option<u32> {
    parse::status_field(status, field)?
        .split_whitespace()
        .last()?
        .parse()
        .ok()
}

/// Refuses, by name, a process a restore could not rebuild in the state it
/// is in: one stopped (by a signal or another tracer). Run before the
/// processes are frozen, which stops them too. An exited process not yet
/// reaped (a zombie) is not refused here: it usually is reaped within
/// microseconds, so the caller's freeze waits for that (and refuses one
/// that stays).
pub fn check_states(hosts: &[u32]) -> Result<(), SnapshotError> {
    for &host in hosts {
        let stat = match std::fs::read_to_string(format!("/proc/{host}/stat")) {
            Ok(stat) => stat,
            // Ended since it was listed: nothing of it to refuse.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                return Err(SnapshotError::process(
                    host,
                    format!("reading /proc/{host}/stat"),
                    e,
                ))
            }
        };
        let (comm, state) = stat
            .split_once(" (")
            .and_then(|(_, rest)| rest.rsplit_once(") "))
            .map(|(comm, rest)| (comm.to_string(), rest.chars().next().unwrap_or('?')))
            .ok_or_else(|| {
                SnapshotError::process(host, "parsing stat", std::io::ErrorKind::InvalidData)
            })?;
        let what = match state {
            'T' | 't' => "is stopped (SIGSTOP or traced), which cannot be saved yet",
            _ => continue,
        };
        return Err(SnapshotError::Unsupported {
            pid: host,
            what: format!("process {comm} {what}"),
        });
    }
    Ok(())
}

/// Reads every process's namespace ids (`hosts`: our PIDs, parents
/// first) and refuses, by name, a tree a restore could not rebuild: a
/// group or session whose leader is gone, a process in a session other
/// than its parent's that it does not lead.
pub fn identify(hosts: &[u32]) -> Result<Vec<Ids>, SnapshotError> {
    let mut ids = Vec::with_capacity(hosts.len());
    for &host in hosts {
        let read = |name: &str| {
            std::fs::read_to_string(format!("/proc/{host}/{name}")).map_err(|e| {
                SnapshotError::process(host, format!("reading /proc/{host}/{name}"), e)
            })
        };
        let status = read("status")?;
        let field = |name: &str| {
            innermost(&status, name).ok_or_else(|| {
                SnapshotError::process(
                    host,
                    format!("parsing {name} of status"),
                    std::io::ErrorKind::InvalidData,
                )
            })
        };
        let host_ppid: u32 = parse::status_field(&status, "PPid")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let ppid = std::fs::read_to_string(format!("/proc/{host_ppid}/status"))
            .ok()
            .and_then(|s| innermost(&s, "NSpid"))
            .unwrap_or(0);
        ids.push(Ids {
            pid: field("NSpid")?,
            ppid,
            pgid: field("NSpgid")?,
            sid: field("NSsid")?,
        });
    }
    for (i, me) in ids.iter().enumerate() {
        let host = hosts[i];
        let present = |pid: u32| pid == 0 || ids.iter().any(|o| o.pid == pid);
        if !present(me.sid) {
            return Err(SnapshotError::Unsupported {
                pid: host,
                what: format!(
                    "process {} is in session {} whose leader is gone",
                    me.pid, me.sid
                ),
            });
        }
        if !present(me.pgid) {
            return Err(SnapshotError::Unsupported {
                pid: host,
                what: format!(
                    "process {} is in process group {} whose leader is gone",
                    me.pid, me.pgid
                ),
            });
        }
        // A process can only have its parent's session (kept from the
        // fork) or one it leads (setsid); the namespace init's is 0 here.
        let parent_sid = ids.iter().find(|o| o.pid == me.ppid).map_or(0, |o| o.sid);
        if me.sid != parent_sid && me.sid != me.pid {
            return Err(SnapshotError::Unsupported {
                pid: host,
                what: format!(
                    "process {} is in session {}, neither its parent's nor its own",
                    me.pid, me.sid
                ),
            });
        }
    }
    Ok(ids)
}

/// What the fds of one process share with processes before it.
#[derive(Default)]
pub struct Sharing {
    pub inherited: Vec<InheritedFd>,
    pub fetched: Vec<FetchedFd>,
}

/// A Unix socket of a later process kept, until every process is rebuilt,
/// at `fd` in the earliest process holding its peer (or its listener),
/// which rebuilds the connection; read at dump from `holder`'s `holder_fd`.
pub struct UnixStash {
    pub fd: i32,
    pub inode: u64,
    pub flags: i32,
    pub holder: u32,
    pub holder_fd: i32,
}

/// The fds of the processes analysed so far, and pipe ends and Unix
/// sockets to stash.
#[derive(Default)]
pub struct FdTable {
    /// Per process (image order): its host PID, ns PID and fd numbers.
    procs: Vec<(u32, u32, Vec<i32>)>,
    /// Pipe inode → index of the first process that holds one of its ends.
    pipes: HashMap<u64, usize>,
    /// (process index, pipe inode, write end) → stash fd made for it.
    stashes: BTreeMap<(usize, u64, bool), i32>,
    /// Per process index, the stash fd images it must hold.
    pub stash_fds: BTreeMap<usize, Vec<FdImage>>,
    /// Socket inode → (index, host PID, fd) of the first process holding it.
    sockets: HashMap<u64, (usize, u32, i32)>,
    /// sock_diag of the Unix sockets, read at the first socket met.
    diag: Option<HashMap<u64, UnixDiag>>,
    /// Per process index, the Unix sockets stashed in it.
    pub unix_stashes: BTreeMap<usize, Vec<UnixStash>>,
}

fn fd_numbers(host: u32) -> Result<Vec<i32>, SnapshotError> {
    let dir = format!("/proc/{host}/fd");
    let mut fds: Vec<i32> = std::fs::read_dir(&dir)
        .map_err(|e| SnapshotError::process(host, format!("listing {dir}"), e))?
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok()))
        .collect();
    fds.sort_unstable();
    Ok(fds)
}

fn link_inode(host: u32, fd: i32, prefix: &str) -> Option<u64> {
    std::fs::read_link(format!("/proc/{host}/fd/{fd}"))
        .ok()?
        .to_str()?
        .strip_prefix(prefix)?
        .strip_suffix(']')?
        .parse()
        .ok()
}

fn pipe_inode(host: u32, fd: i32) -> Option<u64> {
    link_inode(host, fd, "pipe:[")
}

fn status_flags(host: u32, fd: i32) -> Result<i32, SnapshotError> {
    std::fs::read_to_string(format!("/proc/{host}/fdinfo/{fd}"))
        .ok()
        .and_then(|t| parse::fdinfo(&t))
        .map(|i| i.flags & !libc::O_CLOEXEC)
        .ok_or_else(|| SnapshotError::UnsupportedFd {
            pid: host,
            fd,
            what: "unreadable fdinfo".into(),
        })
}

impl FdTable {
    /// Sorts the fds of the next process (`host`, after every process
    /// before it in image order): the same description as its parent's fd
    /// of the same number is inherited; one held by an earlier process is
    /// fetched from it; the other end of a pipe an earlier process holds
    /// is stashed in that process and fetched from there, and so is a Unix
    /// socket whose peer (connected back) or listener an earlier process
    /// holds, rebuilt there with it. Returns what it shares; the rest it
    /// saves itself.
    pub fn share(
        &mut self,
        host: u32,
        me: Ids,
        parent: Option<usize>,
    ) -> Result<Sharing, SnapshotError> {
        let fds = fd_numbers(host)?;
        let index = self.procs.len();
        let mut out = Sharing::default();
        for &fd in &fds {
            // Standard streams are the restoring supervisor's anyway.
            if fd <= 2 {
                continue;
            }
            let cloexec = std::fs::read_to_string(format!("/proc/{host}/fdinfo/{fd}"))
                .ok()
                .and_then(|t| parse::fdinfo(&t))
                .map(|i| i.flags & libc::O_CLOEXEC != 0)
                .ok_or_else(|| SnapshotError::UnsupportedFd {
                    pid: host,
                    fd,
                    what: "unreadable fdinfo".into(),
                })?;
            if let Some(p) = parent {
                if pidfd::same_file_across(self.procs[p].0, fd, host, fd) == Some(true) {
                    out.inherited.push(InheritedFd { fd, cloexec });
                    continue;
                }
            }
            let held = self.procs.iter().find_map(|(h, ns, theirs)| {
                theirs
                    .iter()
                    .filter(|&&f| f > 2)
                    .find(|&&f| pidfd::same_file_across(*h, f, host, fd) == Some(true))
                    .map(|&f| (*ns, f))
            });
            if let Some((from_pid, from_fd)) = held {
                out.fetched.push(FetchedFd {
                    fd,
                    cloexec,
                    from_pid,
                    from_fd,
                });
                continue;
            }
            if let Some(inode) = pipe_inode(host, fd) {
                // Both ends in this one process are its own pipe, rebuilt
                // with it; only an earlier process can hold an end for it.
                if let Some(&owner) = self.pipes.get(&inode).filter(|&&o| o != index) {
                    let flags = status_flags(host, fd)?;
                    let write_end = flags & libc::O_ACCMODE == libc::O_WRONLY;
                    let from_fd = self.stash(owner, inode, write_end, flags, host, fd)?;
                    out.fetched.push(FetchedFd {
                        fd,
                        cloexec,
                        from_pid: self.procs[owner].1,
                        from_fd,
                    });
                    continue;
                }
                self.pipes.entry(inode).or_insert(index);
            }
            if let Some(inode) = link_inode(host, fd, "socket:[") {
                // A connection whose other end an earlier process holds is
                // rebuilt there, this end stashed beside it.
                if let Some(owner) = self.unix_owner(inode, index) {
                    let from_fd = self.stash_unix(owner, inode, host, fd)?;
                    out.fetched.push(FetchedFd {
                        fd,
                        cloexec,
                        from_pid: self.procs[owner].1,
                        from_fd,
                    });
                    continue;
                }
                self.sockets.entry(inode).or_insert((index, host, fd));
            }
        }
        self.procs.push((host, me.pid, fds));
        Ok(out)
    }

    /// The earlier process (not `index`) that holds the peer of the Unix
    /// socket `inode`, connected back to it, or the listener in whose
    /// backlog it waits. Without sock_diag nothing is stashed: the Unix
    /// sockets are then refused by `kinds::unix`, which needs it too.
    fn unix_owner(&mut self, inode: u64, index: usize) -> Option<usize> {
        if index == 0 {
            return None;
        }
        let diag = self.diag.get_or_insert_with(|| {
            sockdiag::unix_sockets()
                .unwrap_or_default()
                .into_iter()
                .map(|d| (d.ino, d))
                .collect()
        });
        let d = diag.get(&inode)?;
        let earlier = |ino: u64| self.sockets.get(&ino).map(|s| s.0).filter(|&o| o != index);
        if let Some(p) = d.peer.filter(|&p| p != 0) {
            if diag.get(&p).and_then(|q| q.peer) == Some(inode) {
                return earlier(p);
            }
        }
        diag.values()
            .filter(|l| l.icons.contains(&inode))
            .find_map(|l| earlier(l.ino))
    }

    fn stash_unix(
        &mut self,
        owner: usize,
        inode: u64,
        host: u32,
        fd: i32,
    ) -> Result<i32, SnapshotError> {
        let stashed = self.unix_stashes.entry(owner).or_default();
        if let Some(s) = stashed.iter().find(|s| s.inode == inode) {
            return Ok(s.fd);
        }
        let flags = status_flags(host, fd)?;
        let number = self.next_stash_number(owner);
        self.unix_stashes.entry(owner).or_default().push(UnixStash {
            fd: number,
            inode,
            flags,
            holder: host,
            holder_fd: fd,
        });
        Ok(number)
    }

    /// Above every fd the owner holds, and every stash made in it before.
    fn next_stash_number(&self, owner: usize) -> i32 {
        self.procs[owner]
            .2
            .iter()
            .copied()
            .chain(
                self.stash_fds
                    .get(&owner)
                    .into_iter()
                    .flatten()
                    .map(|f| f.fd),
            )
            .chain(
                self.unix_stashes
                    .get(&owner)
                    .into_iter()
                    .flatten()
                    .map(|s| s.fd),
            )
            .max()
            .unwrap_or(2)
            + 1
    }

    /// Every Unix socket of the instance met so far: inode → host PID and
    /// fd of its first holder.
    pub fn socket_holders(&self) -> HashMap<u64, (u32, i32)> {
        self.sockets
            .iter()
            .map(|(&ino, &(_, host, fd))| (ino, (host, fd)))
            .collect()
    }

    fn stash(
        &mut self,
        owner: usize,
        inode: u64,
        write_end: bool,
        flags: i32,
        host: u32,
        fd: i32,
    ) -> Result<i32, SnapshotError> {
        if let Some(&s) = self.stashes.get(&(owner, inode, write_end)) {
            return Ok(s);
        }
        let capacity = std::fs::OpenOptions::new()
            .read(true)
            .open(format!("/proc/{host}/fd/{fd}"))
            .ok()
            .and_then(|f| {
                nix::fcntl::fcntl(
                    std::os::fd::AsRawFd::as_raw_fd(&f),
                    nix::fcntl::FcntlArg::F_GETPIPE_SZ,
                )
                .ok()
            })
            .ok_or_else(|| SnapshotError::UnsupportedFd {
                pid: host,
                fd,
                what: "pipe capacity unreadable".into(),
            })? as u32;
        let number = self.next_stash_number(owner);
        self.stash_fds.entry(owner).or_default().push(FdImage {
            fd: number,
            cloexec: true,
            kind: FdKind::Pipe {
                inode,
                write_end,
                flags,
                capacity,
                data: Vec::new(),
            },
        });
        self.stashes.insert((owner, inode, write_end), number);
        Ok(number)
    }
}

/// Forks the process `child` (ns pid) from the rebuilt, frozen `parent`
/// with an injected clone3 (a plain fork with `set_tid`), and returns it
/// frozen as well: it is auto-attached (PTRACE_O_TRACEFORK) and stopped
/// before it runs an instruction. With `cgroup` (a cgroup2 directory fd
/// of the parent's) the child starts in that cgroup (CLONE_INTO_CGROUP).
pub fn fork(
    parent: &Frozen,
    inj: &Injector,
    mem: &Memory,
    data: u64,
    child: u32,
    cgroup: Option<u64>,
) -> Result<Frozen, SnapshotError> {
    let set_tid_at = data + 128;
    let args = CloneArgs {
        flags: cgroup.map_or(0, |_| CLONE_INTO_CGROUP),
        exit_signal: libc::SIGCHLD as u64,
        set_tid: set_tid_at,
        set_tid_size: 1,
        cgroup: cgroup.unwrap_or(0),
        ..CloneArgs::default()
    };
    mem.write_value(data, &args)?;
    mem.write_value(set_tid_at, &(child as i32))?;
    let size = std::mem::size_of::<CloneArgs>() as u64;
    let injected = inj.call(parent.pid, libc::SYS_clone3, &[data, size])?;
    if injected.ret < 0 {
        return Err(RestoreError::Clone {
            what: "process",
            id: child,
            error: std::io::Error::from_raw_os_error(-injected.ret as i32),
        }
        .into());
    }
    let host = injected.cloned.ok_or_else(|| RestoreError::Process {
        pid: child,
        what: "its fork was not reported".into(),
    })?;
    parent.adopt_process(host)
}

/// Not in the libc crate's x86_64 constants.
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// Makes the process a session leader if it was one; run before it forks
/// its children, which inherit the session.
pub fn set_session(inj: &Injector, host: u32, p: &ProcessImage) -> Result<(), SnapshotError> {
    if p.ns_sid == p.ns_pid {
        inj.ok(
            host,
            &format!("setsid in process {}", p.ns_pid),
            libc::SYS_setsid,
            &[],
        )?;
    }
    Ok(())
}

/// Puts the process into its saved process group. Run when every process
/// exists, group leaders first: a group can only be joined once its
/// leader has made it.
pub fn set_group(inj: &Injector, host: u32, p: &ProcessImage) -> Result<(), SnapshotError> {
    if p.ns_pgid == 0 || p.ns_sid == p.ns_pid {
        return Ok(());
    }
    let now = inj.ok(host, "getpgid", libc::SYS_getpgid, &[0])?;
    if now == p.ns_pgid as u64 {
        return Ok(());
    }
    inj.ok(
        host,
        &format!("setpgid of process {} to {}", p.ns_pid, p.ns_pgid),
        libc::SYS_setpgid,
        &[0, p.ns_pgid as u64],
    )?;
    Ok(())
}

/// Closes every fd the fork gave the child that it did not inherit (its
/// standard streams stay, as for a stub), and gives the inherited ones
/// their own close-on-exec flag.
pub fn keep_inherited(inj: &Injector, host: u32, p: &ProcessImage) -> Result<(), SnapshotError> {
    for fd in fd_numbers(host)? {
        if fd <= 2 {
            continue;
        }
        match p.inherited.iter().find(|i| i.fd == fd) {
            Some(i) => {
                let flag = if i.cloexec { libc::FD_CLOEXEC } else { 0 };
                inj.ok(
                    host,
                    &format!("F_SETFD on inherited fd {fd}"),
                    libc::SYS_fcntl,
                    &[fd as u64, libc::F_SETFD as u64, flag as u64],
                )?;
            }
            None => {
                inj.call(host, libc::SYS_close, &[fd as u64])?;
            }
        }
    }
    Ok(())
}

/// Takes each fetched fd from the process that holds its description
/// (inside the instance, whose PID namespace the ns pids are of), through
/// an injected pidfd_open + pidfd_getfd, and puts it at its number.
pub fn fetch_fds(inj: &Injector, host: u32, p: &ProcessImage) -> Result<(), SnapshotError> {
    // Temporaries live above every fd the process will hold, so placing one
    // fd never closes another.
    let high = p
        .fds
        .iter()
        .map(|f| f.fd)
        .chain(p.inherited.iter().map(|f| f.fd))
        .chain(p.fetched.iter().map(|f| f.fd))
        .max()
        .unwrap_or(2) as u64
        + 1;
    let to_high = |fd: u64| crate::restore::move_above(inj, host, fd, high);
    let mut pidfds: BTreeMap<u32, u64> = BTreeMap::new();
    for f in &p.fetched {
        let pidfd = match pidfds.get(&f.from_pid) {
            Some(&fd) => fd,
            None => {
                let fd = to_high(inj.ok(
                    host,
                    &format!("pidfd_open of process {}", f.from_pid),
                    libc::SYS_pidfd_open,
                    &[f.from_pid as u64, 0],
                )?)?;
                pidfds.insert(f.from_pid, fd);
                fd
            }
        };
        let temp = to_high(inj.ok(
            host,
            &format!(
                "pidfd_getfd of fd {} of process {} for fd {}",
                f.from_fd, f.from_pid, f.fd
            ),
            libc::SYS_pidfd_getfd,
            &[pidfd, f.from_fd as u64, 0],
        )?)?;
        let cloexec = if f.cloexec { libc::O_CLOEXEC as u64 } else { 0 };
        inj.ok(
            host,
            &format!("dup3 to fd {}", f.fd),
            libc::SYS_dup3,
            &[temp, f.fd as u64, cloexec],
        )?;
        inj.call(host, libc::SYS_close, &[temp])?;
    }
    for fd in pidfds.into_values() {
        inj.call(host, libc::SYS_close, &[fd])?;
    }
    Ok(())
}
