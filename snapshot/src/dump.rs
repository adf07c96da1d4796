//! Dumping a frozen process into an image.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use appshot_sys::{abi, pidfd};
use nix::sys::socket::{
    getsockname, getsockopt, sockopt, AddressFamily, SockType, SockaddrLike, SockaddrStorage,
};

use crate::error::SnapshotError;
use crate::image::model::*;
use crate::image::{ImageWriter, PAGE};
use crate::kinds::files::file_ref;
use crate::kinds::memory::{classify, dump_memory, MemoryContext, VmFlags};
use crate::kinds::{self, tree};
use crate::precopy::Tracking;
use crate::proc::parse;
use crate::ptrace::{map_scratch, unmap_scratch, Frozen, Injector, Memory, BATCH_AT, BATCH_LEN};
use tracing::debug;

/// Scratch memory mapped into the process for the duration of the
/// injected calls: code at its start, data after the first page.
const SCRATCH: u64 = 64 * PAGE;
// Batched calls run from inside the scratch memory.
const _: () = assert!(BATCH_AT + BATCH_LEN <= SCRATCH);
const DATA: u64 = PAGE;
const RLIMIT_COUNT: u32 = 16;
pub struct DumpRequest<'a> {
    pub instance: InstanceInfo,
    /// What writes the image (the manifest's `writer`), e.g. `appshot
    /// 0.1.0 (commit 1a2b3c4d5e6f)`.
    pub writer: &'a str,
    /// Maps a listening socket's real address to the one its application
    /// believes it bound.
    pub virtualize: &'a dyn Fn(SocketAddr) -> SocketAddr,
    /// The same for a UDP socket's address.
    pub virtualize_udp: &'a dyn Fn(SocketAddr) -> SocketAddr,
    /// Where connected TCP sockets put in repair mode are recorded: the
    /// caller resumes them if the instance runs on, or drops them after
    /// killing it.
    pub repairs: &'a kinds::tcp::Repairs,
    /// Called with (bytes done, bytes total) while pages are saved.
    pub progress: &'a dyn Fn(u64, u64),
    /// Asked between steps that leave the processes whole (no injected
    /// code in them): `true` abandons the dump, the caller then releases
    /// the processes as they were.
    pub cancelled: &'a dyn Fn() -> bool,
    /// Unix sockets connected to a peer outside the instance are saved as
    /// closed (`--external-unix close`) instead of refusing the dump.
    pub external_unix_close: bool,
    /// The parent of an incremental snapshot: the tracking given to
    /// [`dump`] refers to its pages ([`Tracking::base_on`]).
    pub parent: Option<ParentRef>,
}

/// What is learnt of a process before any of the tree is touched.
struct Checked {
    ids: tree::Ids,
    parent: Option<usize>,
    fds: Vec<FdImage>,
    sharing: tree::Sharing,
    stashed: Vec<i32>,
    mem: Memory,
    text: u64,
    exe_path: std::path::PathBuf,
    umask: u32,
    /// Host TID to the TID its PID namespace gives it.
    ns_tids: HashMap<u32, u32>,
    posix_timers: Vec<PosixTimer>,
    /// Its mappings' VmFlags, which the injected calls do not change.
    vm_flags: VmFlags,
}

/// Dumps the frozen processes of an instance (`tree`: every process, each
/// with all its threads frozen, parents before children): their pages go
/// into `writer`, the rest of their state into the manifest returned, which
/// the caller writes with [`ImageWriter::finish`] once it has released the
/// processes or not. They stay frozen; the caller releases or kills them,
/// and abandons the writer on error (cancellation included). With
/// `tracking`, the pages pre-copied into `writer` while the processes ran
/// and not written since are referenced rather than read again.
pub fn dump(
    tree: &[Frozen],
    req: &DumpRequest,
    writer: &mut ImageWriter,
    tracking: Option<&mut Tracking>,
) -> Result<Manifest, SnapshotError> {
    let first = tree.first().ok_or(SnapshotError::NoProcess)?.pid;
    let check = || {
        if (req.cancelled)() {
            Err(SnapshotError::Cancelled { pid: first })
        } else {
            Ok(())
        }
    };
    let started = std::time::Instant::now();
    let hosts: Vec<u32> = tree.iter().map(|f| f.pid).collect();
    // Everything that could make the dump impossible is checked, for every
    // process, before any is touched.
    let ids = tree::identify(&hosts)?;
    let mut table = tree::FdTable::default();
    let mut checked = Vec::with_capacity(tree.len());
    for (frozen, &me) in tree.iter().zip(&ids) {
        let parent = ids.iter().position(|o| o.pid == me.ppid);
        let sharing = table.share(frozen.pid, me, parent)?;
        checked.push(check_process(frozen, me, parent, sharing)?);
    }
    let mut pipes_seen = HashSet::new();
    let mut memfds = kinds::memfd::Sources::default();
    let holders = table.socket_holders();
    for (i, c) in checked.iter_mut().enumerate() {
        let stashes = table.unix_stashes.remove(&i).unwrap_or_default();
        c.stashed = stashes.iter().map(|s| s.fd).collect();
        let unix = UnixContext {
            stashes,
            holders: &holders,
        };
        let shared: HashSet<i32> = c
            .sharing
            .inherited
            .iter()
            .map(|f| f.fd)
            .chain(c.sharing.fetched.iter().map(|f| f.fd))
            .collect();
        c.fds = dump_fds(
            c.mem.pid(),
            req,
            &shared,
            &mut pipes_seen,
            &mut memfds,
            unix,
        )?;
    }
    for (i, stashes) in std::mem::take(&mut table.stash_fds) {
        checked[i].stashed.extend(stashes.iter().map(|f| f.fd));
        checked[i].fds.extend(stashes);
    }

    // The IPC namespace is the instance's, whichever process it is read
    // from; memfds are the instance's too, whichever process holds them.
    check()?;
    let ipc = crate::kinds::sysv::save(first)?;
    for (frozen, c) in tree.iter().zip(&checked) {
        let pid = frozen.pid;
        let text = std::fs::read_to_string(format!("/proc/{pid}/maps"))
            .map_err(|e| SnapshotError::process(pid, "reading maps", e))?;
        let maps = parse::maps(&text).ok_or_else(|| {
            SnapshotError::process(pid, "parsing maps", std::io::ErrorKind::InvalidData)
        })?;
        for m in &maps {
            match classify(m, pid, &c.vm_flags)? {
                Some(VmaKind::SysvShm { id }) => ipc.check_attached(pid, id, m.end - m.start)?,
                Some(VmaKind::Memfd { inode, .. }) => {
                    let name = kinds::memfd::name_of(&m.name).unwrap_or_default();
                    memfds.note_mapping(pid, m.start, m.end, inode, name);
                }
                _ => {}
            }
        }
    }

    // Last before injecting: it reads timerfds (putting their counts back),
    // so every refusal above comes first.
    for c in &mut checked {
        kinds::timerfd::catch_up(c.mem.pid(), &mut c.fds)?;
    }
    debug!(ms = started.elapsed().as_secs_f64() * 1e3, "dump: checked");
    let mut asked = Vec::with_capacity(tree.len());
    for (frozen, c) in tree.iter().zip(&mut checked) {
        check()?;
        let a = ask_process(frozen, &c.mem, c.text, &mut c.posix_timers)?;
        check()?;
        asked.push(a);
    }

    // Frozen now: what was written since the last pass is known.
    debug!(ms = started.elapsed().as_secs_f64() * 1e3, "dump: asked");
    let precopied = tracking.map(|t| t.settle()).unwrap_or_default();
    debug!(ms = started.elapsed().as_secs_f64() * 1e3, "dump: settled");
    let mut processes: Vec<ProcessImage> = Vec::with_capacity(tree.len());
    let mut shmem_saved = HashSet::new();
    for ((frozen, c), a) in tree.iter().zip(checked).zip(asked) {
        let parent = c.parent.map(|i| (hosts[i], processes[i].vmas.as_slice()));
        let ctx = MemoryContext {
            parent,
            shmem_saved: &mut shmem_saved,
            precopied: precopied.get(&frozen.pid),
        };
        processes.push(save_process(frozen, c, a, ctx, req, writer, &check)?);
    }
    debug!(
        ms = started.elapsed().as_secs_f64() * 1e3,
        "dump: memory saved"
    );
    let ipc = ipc.write(writer)?;
    let memfds = memfds.save(writer)?;
    check()?;
    Ok(Manifest {
        created_unix: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        writer: req.writer.to_string(),
        instance: req.instance.clone(),
        processes,
        ipc,
        memfds,
        id: new_id()?,
        parent: req.parent.clone(),
    })
}

/// A fresh image id: 128 random bits.
fn new_id() -> Result<u128, SnapshotError> {
    use std::io::Read;
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(|e| SnapshotError::io(Path::new("/dev/urandom"), e))?;
    Ok(u128::from_ne_bytes(b))
}

/// The address of executable code of the process's own to inject the
/// first call from: its executable's (`exe`), else any private file
/// mapping's (a shared one would be written through to its file).
pub(crate) fn code_page(
    pid: u32,
    maps: &[parse::MapsLine],
    exe: Option<&Path>,
) -> Result<u64, SnapshotError> {
    maps.iter()
        .find(|m| m.exec && !m.shared && exe.is_some_and(|e| Path::new(&m.name) == e))
        .or_else(|| {
            maps.iter()
                .find(|m| m.exec && !m.shared && m.name.starts_with('/'))
        })
        .map(|m| m.start)
        .ok_or_else(|| SnapshotError::Unsupported {
            pid,
            what: "no executable file mapping to inject from".into(),
        })
}

fn check_process(
    frozen: &Frozen,
    ids: tree::Ids,
    parent: Option<usize>,
    sharing: tree::Sharing,
) -> Result<Checked, SnapshotError> {
    let pid = frozen.pid;
    let proc_dir = format!("/proc/{pid}");
    let read = |name: &str| {
        std::fs::read_to_string(format!("{proc_dir}/{name}"))
            .map_err(|e| SnapshotError::process(pid, format!("reading {proc_dir}/{name}"), e))
    };
    let status = read("status")?;
    let mem = Memory::open(pid)?;
    let maps_before = parse::maps(&read("maps")?).ok_or_else(|| {
        SnapshotError::process(pid, "parsing maps", std::io::ErrorKind::InvalidData)
    })?;
    let ns_tids: HashMap<u32, u32> = frozen
        .tids
        .iter()
        .map(|&t| (t, kinds::threads::ns_tid(t)))
        .collect();
    let posix_timers = kinds::posix_timer::list(pid, &read("timers")?, &ns_tids)?;
    // Every mapping must be one a restore can rebuild; refused before any
    // syscall is injected.
    // Read once: smaps walks every page table of the process, which takes
    // milliseconds per GiB, all of them frozen.
    let vm_flags = VmFlags::read(pid)?;
    for m in &maps_before {
        classify(m, pid, &vm_flags)?;
    }
    let exe_path = std::fs::read_link(format!("{proc_dir}/exe"))
        .map_err(|e| SnapshotError::process(pid, "reading exe link", e))?;
    let text = code_page(pid, &maps_before, Some(&exe_path))?;
    let umask = parse::status_field(&status, "Umask")
        .and_then(|u| u32::from_str_radix(u, 8).ok())
        .unwrap_or(0o022);
    Ok(Checked {
        ids,
        parent,
        fds: Vec::new(),
        sharing,
        stashed: Vec::new(),
        mem,
        text,
        exe_path,
        umask,
        ns_tids,
        posix_timers,
        vm_flags,
    })
}

fn save_process(
    frozen: &Frozen,
    c: Checked,
    asked: Answers,
    ctx: MemoryContext,
    req: &DumpRequest,
    writer: &mut ImageWriter,
    check: &dyn Fn() -> Result<(), SnapshotError>,
) -> Result<ProcessImage, SnapshotError> {
    let pid = frozen.pid;
    let proc_dir = format!("/proc/{pid}");
    let read = |name: &str| {
        std::fs::read_to_string(format!("{proc_dir}/{name}"))
            .map_err(|e| SnapshotError::process(pid, format!("reading {proc_dir}/{name}"), e))
    };
    let maps = parse::maps(&read("maps")?).ok_or_else(|| {
        SnapshotError::process(pid, "parsing maps", std::io::ErrorKind::InvalidData)
    })?;
    let mut mm = parse::stat_mm(&read("stat")?).ok_or_else(|| {
        SnapshotError::process(pid, "parsing stat", std::io::ErrorKind::InvalidData)
    })?;
    mm.brk = asked.brk;
    let auxv = std::fs::read(format!("{proc_dir}/auxv"))
        .map_err(|e| SnapshotError::process(pid, "reading auxv", e))?
        .chunks_exact(8)
        .map(|c| u64::from_ne_bytes(c.try_into().expect("8 bytes")))
        .collect();
    let cwd = std::fs::read_link(format!("{proc_dir}/cwd"))
        .map_err(|e| SnapshotError::process(pid, "reading cwd", e))?;

    let mut threads = Vec::new();
    for (i, &tid) in frozen.tids.iter().enumerate() {
        threads.push(kinds::threads::save(
            pid,
            tid,
            c.ns_tids[&tid],
            &asked.threads[i],
        )?);
    }
    let shared_pending = kinds::signals::save_shared_pending(pid)?;

    let vmas = dump_memory(pid, &c.mem, &maps, &c.vm_flags, ctx, writer, req, check)?;
    let pages_bytes = vmas
        .iter()
        .flat_map(|v| &v.pages)
        .map(|r| r.pages * PAGE)
        .sum();
    Ok(ProcessImage {
        ns_pid: c.ids.pid,
        ns_ppid: c.ids.ppid,
        ns_pgid: c.ids.pgid,
        ns_sid: c.ids.sid,
        exe: file_ref(&c.exe_path.to_string_lossy(), pid)?,
        cwd: cwd.to_string_lossy().into_owned(),
        umask: c.umask,
        rlimits: asked.rlimits,
        mm,
        auxv,
        vmas,
        sigactions: asked.sigactions,
        shared_pending,
        threads,
        fds: c.fds,
        inherited: c.sharing.inherited,
        fetched: c.sharing.fetched,
        stashed: c.stashed,
        itimers: asked.itimers,
        posix_timers: c.posix_timers,
        pages_bytes,
    })
}

struct Answers {
    brk: u64,
    itimers: Vec<ITimer>,
    sigactions: Vec<SigAction>,
    rlimits: Vec<(u32, u64, u64)>,
    threads: Vec<kinds::threads::Asked>,
}

/// What only the process itself can tell: asked with injected syscalls
/// from a scratch mapping that is removed again before memory is read.
/// Fills in the time left of `posix_timers`.
fn ask_process(
    frozen: &Frozen,
    mem: &Memory,
    text: u64,
    posix_timers: &mut [PosixTimer],
) -> Result<Answers, SnapshotError> {
    let main = frozen.pid;
    let scratch = map_scratch(frozen, mem, text, None, SCRATCH)?;
    let result = (|| {
        let inj = frozen.injector(scratch);
        let data = scratch + DATA;
        let code = scratch + BATCH_AT;
        let sigactions = kinds::signals::save_actions(&inj, mem, main, data, code)?;
        let rlimits = ask_rlimits(&inj, mem, main, data, code)?;
        let brk = inj.ok(main, "brk(0)", libc::SYS_brk, &[0])?;
        let itimers = kinds::itimer::save(&inj, mem, main, data)?;
        kinds::posix_timer::save_times(&inj, mem, main, data, posix_timers)?;
        let mut threads = Vec::new();
        for &tid in &frozen.tids {
            threads.push(kinds::threads::ask(&inj, mem, tid, data)?);
        }
        Ok(Answers {
            brk,
            itimers,
            sigactions,
            rlimits,
            threads,
        })
    })();
    unmap_scratch(frozen, mem, text, scratch, SCRATCH)?;
    result
}

/// Each resource limit of process `main` that it has, in one batch of
/// injected `prlimit64` calls (code at `code`, answers at `data`).
fn ask_rlimits(
    inj: &Injector,
    mem: &Memory,
    main: u32,
    data: u64,
    code: u64,
) -> Result<Vec<(u32, u64, u64)>, SnapshotError> {
    let size = std::mem::size_of::<libc::rlimit>() as u64;
    let calls: Vec<(i64, [u64; 6])> = (0..RLIMIT_COUNT)
        .map(|res| {
            let out = data + u64::from(res) * size;
            (libc::SYS_prlimit64, [0, u64::from(res), 0, out, 0, 0])
        })
        .collect();
    let answers = inj.call_all(mem, main, code, &calls)?;
    let mut limits = vec![
        libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0
        };
        calls.len()
    ];
    mem.read(data, abi::bytes_of_slice_mut(&mut limits))?;
    Ok((0..RLIMIT_COUNT)
        .zip(limits)
        .zip(answers)
        .filter(|(_, ret)| *ret == 0)
        .map(|((res, l), _)| (res, l.rlim_cur, l.rlim_max))
        .collect())
}

/// The Unix sockets of later processes a process rebuilds with its own,
/// and where every socket of the instance is held.
struct UnixContext<'a> {
    stashes: Vec<tree::UnixStash>,
    holders: &'a HashMap<u64, (u32, i32)>,
}

/// Saves the fds the process holds itself (not `shared` with a process
/// before it), and the Unix sockets stashed in it; a pipe's unread bytes
/// go with the first fd of it in the tree (`pipes_seen`).
fn dump_fds(
    pid: u32,
    req: &DumpRequest,
    shared: &HashSet<i32>,
    pipes_seen: &mut HashSet<u64>,
    memfds: &mut kinds::memfd::Sources,
    unix_context: UnixContext,
) -> Result<Vec<FdImage>, SnapshotError> {
    let dir = format!("/proc/{pid}/fd");
    let entries = std::fs::read_dir(&dir)
        .map_err(|e| SnapshotError::process(pid, format!("listing {dir}"), e))?;
    let mut fds: Vec<i32> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok()))
        .collect();
    fds.sort_unstable();
    let pidfd =
        pidfd::open_thread(pid).map_err(|e| SnapshotError::process(pid, "pidfd_open", e))?;
    let mut out = Vec::new();
    let mut unix = Vec::new();
    // Lowest fd of each open file description seen so far, by link: fds
    // sharing a description share its link, and kcmp tells them apart
    // from separate opens of one object.
    let mut descriptions: HashMap<String, Vec<i32>> = HashMap::new();
    for fd in fds.into_iter().filter(|fd| !shared.contains(fd)) {
        let unsupported = |what: String| SnapshotError::UnsupportedFd { pid, fd, what };
        let link = std::fs::read_link(format!("{dir}/{fd}"))
            .map_err(|e| SnapshotError::fd_call(pid, fd, "readlink", e))?
            .to_string_lossy()
            .into_owned();
        let seen = descriptions.entry(link.clone()).or_default();
        let mut shared = None;
        for &other in seen.iter() {
            if pidfd::same_file(pid, other, fd).map_err(|e| {
                SnapshotError::process(pid, format!("kcmp of fds {other} and {fd}"), e)
            })? {
                shared = Some(other);
                break;
            }
        }
        let info_text = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}"))
            .map_err(|e| SnapshotError::process(pid, format!("reading fdinfo {fd}"), e))?;
        let info =
            parse::fdinfo(&info_text).ok_or_else(|| unsupported("unreadable fdinfo".into()))?;
        // O_CLOEXEC in fdinfo is the fd's own flag, not the description's.
        let cloexec = info.flags & libc::O_CLOEXEC != 0;
        if let Some(of) = shared {
            out.push(FdImage {
                fd,
                cloexec,
                kind: FdKind::Dup { of },
            });
            continue;
        }
        seen.push(fd);
        let flags = info.flags & !libc::O_CLOEXEC;
        let kind = if fd <= 2 {
            FdKind::Stdio
        } else if let Some(name) = kinds::memfd::name_of(&link) {
            FdKind::Memfd {
                inode: memfds.note_fd(pid, fd, name)?,
                flags,
                pos: info.pos,
            }
        } else if link.ends_with(" (deleted)") {
            return Err(unsupported(format!("deleted file {link}")));
        } else if link.starts_with('/') && kinds::pipes::is_fifo(&link) {
            kinds::pipes::save_fifo(pid, &pidfd, fd, &link, flags, pipes_seen)?
        } else if link.starts_with('/') {
            kinds::files::save(pid, &link, flags, info.pos)?
        } else if let Some(ino) = link
            .strip_prefix("pipe:[")
            .and_then(|s| s.strip_suffix(']'))
        {
            kinds::pipes::save(pid, &pidfd, fd, &link, ino, flags, pipes_seen)?
        } else if link.starts_with("socket:[") {
            let sock = pidfd::get_fd(&pidfd, fd)
                .map_err(|e| SnapshotError::fd_call(pid, fd, "pidfd_getfd", e))?;
            let local: SockaddrStorage = getsockname(sock.as_raw_fd())
                .map_err(|e| SnapshotError::fd_call(pid, fd, "getsockname", e))?;
            if local.family() == Some(AddressFamily::Unix) {
                let inode = link
                    .strip_prefix("socket:[")
                    .and_then(|s| s.strip_suffix(']'))
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| unsupported(format!("odd socket link {link}")))?;
                unix.push(crate::kinds::unix::Found {
                    fd,
                    inode,
                    flags,
                    sock,
                    holder: None,
                });
                out.push(FdImage {
                    fd,
                    cloexec,
                    kind: FdKind::Stdio,
                });
                continue;
            }
            if getsockopt(&sock, sockopt::SockType) == Ok(SockType::Datagram) {
                kinds::udp::save(pid, fd, &sock, flags, req.virtualize_udp)?
            } else {
                kinds::tcp::save(pid, fd, &sock, flags, req.virtualize, req.repairs)?
            }
        } else if link == "anon_inode:[eventpoll]" {
            kinds::events::save_epoll(info, flags)
        } else if link == "anon_inode:[eventfd]" {
            kinds::events::save_eventfd(pid, fd, &info, flags)?
        } else if link == "anon_inode:[timerfd]" {
            kinds::timerfd::save(pid, fd, &info_text, flags)?
        } else if link == "anon_inode:[signalfd]" {
            kinds::signalfd::save(pid, fd, &info_text, flags)?
        } else if link == "anon_inode:inotify" {
            kinds::inotify::save(pid, fd, &info_text, flags)?
        } else {
            return Err(unsupported(format!("{link} cannot be saved yet")));
        };
        out.push(FdImage { fd, cloexec, kind });
    }
    // A stashed socket is read from the process that really holds it: its
    // description, options and the queue that process reads.
    for s in unix_context.stashes {
        let holder = pidfd::open_thread(s.holder)
            .map_err(|e| SnapshotError::process(s.holder, "pidfd_open", e))?;
        let sock = pidfd::get_fd(&holder, s.holder_fd).map_err(|e| {
            SnapshotError::process(s.holder, format!("pidfd_getfd {}", s.holder_fd), e)
        })?;
        unix.push(crate::kinds::unix::Found {
            fd: s.fd,
            inode: s.inode,
            flags: s.flags,
            sock,
            holder: Some((s.holder, s.holder_fd)),
        });
        out.push(FdImage {
            fd: s.fd,
            cloexec: true,
            kind: FdKind::Stdio,
        });
    }
    // Unix sockets are judged together: a peer is only known to be in the
    // process once every fd is listed. Their places were held above.
    for (fd, kind) in
        crate::kinds::unix::save(pid, unix, unix_context.holders, req.external_unix_close)?
    {
        if let Some(f) = out.iter_mut().find(|f| f.fd == fd) {
            f.kind = kind;
        }
    }
    Ok(out)
}
