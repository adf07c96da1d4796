//! Rebuilding a process from an image inside a stub process.
//!
//! The stub is a fresh child of the instance's namespace init, created with
//! the saved PID. Restore freezes it, maps a scratch page, and through
//! injected syscalls replaces everything it has with the saved state:
//! address space (vDSO moved to its saved place), mm fields, files,
//! sockets, signal state, the seccomp filter and the threads with their
//! saved TIDs. Last, each thread gets its saved registers and runs on from
//! the instruction it was stopped at.

use std::collections::HashMap;
use std::os::fd::OwnedFd;

use appshot_sys::abi::{self, TraceeSockFprog};
use appshot_sys::pidfd;
use appshot_sys::ptrace as xptrace;
use appshot_sys::seccomp::SockFilter;
use nix::sched::{sched_getaffinity, sched_getcpu, sched_setaffinity, CpuSet};
use nix::sys::ptrace::{self, Options};
use nix::unistd::Pid;
use tracing::warn;

use crate::error::{ListenError, RestoreError, SnapshotError};
use crate::image::model::*;
use crate::image::{Image, PAGE};
use crate::kinds;
use crate::kinds::memory::{map_memory, map_vdso, set_mm};
use crate::lazy::{LazySettings, LazyStatus, PageServer};
use crate::proc::parse;
use crate::ptrace::{map_scratch, unmap_scratch, Frozen, Injector, Memory, BATCH_AT, BATCH_LEN};
use crate::regs;

pub(crate) const SCRATCH: u64 = 256 * PAGE;
// Batched calls run from inside the scratch memory.
const _: () = assert!(BATCH_AT + BATCH_LEN <= SCRATCH);
pub(crate) const DATA: u64 = PAGE;
const DATA_LEN: u64 = SCRATCH - DATA;
const RSEQ_FLAG_UNREGISTER: u64 = 1;
const SECCOMP_SET_MODE_FILTER: u64 = 1;
const SECCOMP_FILTER_FLAG_NEW_LISTENER: u64 = 8;
/// The status flags F_SETFL can change.
const SETTABLE_FLAGS: i32 =
    libc::O_NONBLOCK | libc::O_APPEND | libc::O_ASYNC | libc::O_DIRECT | libc::O_NOATIME;
pub use crate::kinds::files::check_files;
pub use crate::kinds::tcp::{Connections, ListenSpec};

pub struct RestoreHooks<'a> {
    /// The seccomp program the restored process runs under.
    pub filter: &'a [SockFilter],
    pub listen: &'a dyn Fn(&ListenSpec, OwnedFd) -> Result<(), ListenError>,
    /// Binds a new UDP socket of the process (given as a duplicate) for the
    /// address its application bound: a real port of the caller's choosing
    /// for a multiplexed one.
    pub bind_udp: &'a dyn Fn(std::net::SocketAddr, OwnedFd) -> Result<(), ListenError>,
    /// Whether the image's TCP connections are rebuilt or reset.
    pub connections: Connections,
    /// Restore lazily: the process is released before its memory is in
    /// (see [`crate::lazy`]).
    pub lazy: Option<LazySettings>,
    /// Check the image's pages sections against their CRCs while the
    /// processes are rebuilt (for an image opened with
    /// [`Image::open_pages_unchecked`]): a mismatch kills them before any
    /// is released, so none runs on pages that are not the saved ones.
    pub check_pages: bool,
}

pub struct Restored {
    /// The seccomp listener of each process's filter (one filter per
    /// process), in image order.
    pub listeners: Vec<OwnedFd>,
    /// Our PID of each process, in image order.
    pub hosts: Vec<u32>,
    /// The page server's progress, of a lazy restore.
    pub lazy: Option<LazyStatus>,
}

/// One process being rebuilt, frozen.
pub(crate) struct Built {
    pub(crate) frozen: Frozen,
    pub(crate) mem: Memory,
    /// Any valid register set of it, for the rebuilding injector.
    pub(crate) template: libc::user_regs_struct,
}

impl Built {
    /// The frozen process, ready to be rebuilt; killed (never let go half
    /// built) if its memory or registers cannot be had.
    pub(crate) fn of(frozen: Frozen) -> Result<Built, SnapshotError> {
        let pid = frozen.pid;
        match Memory::open(pid).and_then(|mem| Ok((mem, registers_of(pid)?))) {
            Ok((mem, template)) => Ok(Built {
                frozen,
                mem,
                template,
            }),
            Err(e) => {
                frozen.kill(|| {
                    let _ = nix::sys::signal::kill(
                        Pid::from_raw(pid as i32),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                });
                Err(e)
            }
        }
    }
}

/// Where the image's top-level processes come from.
enum Tops {
    /// Stubs the namespace init forked: ns pid → our pid.
    Stubs(HashMap<u32, u32>),
    /// The one top-level process, forked from a template holder with its
    /// memory, mm fields and scratch mapping (`built[0]` from the start),
    /// and its signal actions and limits if the holder carries them.
    Forked { scratch: u64, carried: bool },
}

/// Restores the image's process tree. `stubs` are the processes the
/// namespace init forked for the image's top-level processes (our PIDs);
/// every other process is forked from its rebuilt parent. On error, every
/// process seized or forked so far is killed while still traced and seen
/// dead by us, its tracer: a half-built process never runs one instruction
/// of the application's code.
pub fn restore(
    stubs: &[u32],
    image: &Image,
    hooks: &RestoreHooks,
) -> Result<Restored, SnapshotError> {
    let mut by_ns = HashMap::new();
    for &host in stubs {
        let status = std::fs::read_to_string(format!("/proc/{host}/status"))
            .map_err(|e| SnapshotError::process(host, "reading status", e))?;
        let ns = parse::status_field(&status, "NSpid")
            .and_then(|v| v.split_whitespace().last())
            .and_then(|v| v.parse::<u32>().ok())
            .ok_or_else(|| RestoreError::Stub {
                pid: host,
                what: "has no NSpid".into(),
            })?;
        by_ns.insert(ns, host);
    }
    let ipc_pid = stubs.first().copied();
    rebuild(Tops::Stubs(by_ns), Vec::new(), ipc_pid, image, hooks)
}

/// Finishes a clone forked from a template holder
/// ([`crate::holder::fork_clone`]): the forked process has the template's
/// memory already, and gets the rest of its state here as a restored one
/// does; its children are forked from it and rebuilt as in [`restore`].
/// On error it is killed, as every process of a failed restore is.
pub fn restore_forked(
    forked: Frozen,
    holder: crate::holder::Holder,
    image: &Image,
    hooks: &RestoreHooks,
) -> Result<Restored, SnapshotError> {
    let pid = forked.pid;
    let first = Built::of(forked)?;
    rebuild(
        Tops::Forked {
            scratch: holder.scratch,
            carried: holder.carries_state,
        },
        vec![first],
        Some(pid),
        image,
        hooks,
    )
}

fn rebuild(
    tops: Tops,
    mut built: Vec<Built>,
    ipc_pid: Option<u32>,
    image: &Image,
    hooks: &RestoreHooks,
) -> Result<Restored, SnapshotError> {
    let saved_regs = match saved_registers(image) {
        Ok(regs) => regs,
        Err(e) => {
            kill_all(built);
            return Err(e);
        }
    };
    // Before any process attaches a segment, and while no one else could
    // take the saved ids in the instance's fresh IPC namespace.
    let server = ipc_pid
        .map_or(Ok(()), |pid| crate::kinds::sysv::restore(pid, image))
        .and_then(|()| match (hooks.lazy, &tops) {
            (Some(_), Tops::Forked { .. }) => Err(RestoreError::Lazy(
                "a clone is forked from its template's holder; it has no pages to serve lazily"
                    .into(),
            )
            .into()),
            (Some(settings), Tops::Stubs(_)) => {
                crate::lazy::check(image)?;
                Ok(Some(PageServer::start(image, settings)?))
            }
            (None, _) => Ok(None),
        });
    let server = match server {
        Ok(server) => server,
        Err(e) => {
            kill_all(built);
            return Err(e);
        }
    };
    let result = std::thread::scope(|scope| {
        // Started before the pinning below, so that it reads on another
        // CPU than the one the rebuild is pinned to.
        let checking = hooks
            .check_pages
            .then(|| scope.spawn(|| image.verify_pages()));
        // Every injected syscall is a ptrace round trip; with tracer and
        // processes on one CPU it costs a few microseconds instead of a
        // cross-CPU wake-up.
        let mut pinned = SameCpu::pin();
        for b in &built {
            pinned.add(b.frozen.pid);
        }
        let result = build_tree(
            &tops,
            image,
            hooks,
            &saved_regs,
            &mut built,
            &mut pinned,
            server.as_ref(),
        );
        // Affinity first, while every thread is still stopped: restored
        // threads inherit their process's full CPU set, never the pinned
        // one.
        drop(pinned);
        let checked = match checking {
            Some(check) => check.join().unwrap_or_else(|_| {
                Err(SnapshotError::corrupt(
                    &image.path,
                    "the check of its pages failed",
                ))
            }),
            None => Ok(()),
        };
        result.and_then(|listeners| checked.map(|()| listeners))
    });
    // No process comes after these: the server finishes once all is in.
    let lazy = server.map(|s| s.status());
    match result {
        Ok(listeners) => {
            let hosts = built.iter().map(|b| b.frozen.pid).collect();
            for b in built {
                b.frozen.release();
            }
            Ok(Restored {
                listeners,
                hosts,
                lazy,
            })
        }
        Err(e) => {
            kill_all(built);
            Err(e)
        }
    }
}

/// The saved registers of every thread, per process in image order.
fn saved_registers(image: &Image) -> Result<Vec<Vec<libc::user_regs_struct>>, SnapshotError> {
    let procs = &image.manifest.processes;
    let mut saved_regs = Vec::with_capacity(procs.len());
    for p in procs {
        if !p.threads.iter().any(|t| t.ns_tid == p.ns_pid) {
            return Err(RestoreError::Process {
                pid: p.ns_pid,
                what: "has no main thread in the image".into(),
            }
            .into());
        }
        let mut regs_of = Vec::with_capacity(p.threads.len());
        for t in &p.threads {
            regs_of.push(
                regs::from_slice(&t.regs).ok_or_else(|| RestoreError::Thread {
                    tid: t.ns_tid,
                    what: "bad register set".into(),
                })?,
            );
        }
        saved_regs.push(regs_of);
    }
    Ok(saved_regs)
}

/// Kills every process built so far, last first, each seen dead by us,
/// its tracer.
fn kill_all(built: Vec<Built>) {
    for b in built.into_iter().rev() {
        let pid = b.frozen.pid;
        b.frozen.kill(|| {
            let _ = nix::sys::signal::kill(
                Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        });
    }
}

#[allow(clippy::too_many_arguments)]
fn build_tree(
    tops: &Tops,
    image: &Image,
    hooks: &RestoreHooks,
    saved_regs: &[Vec<libc::user_regs_struct>],
    built: &mut Vec<Built>,
    pinned: &mut SameCpu,
    lazy: Option<&PageServer>,
) -> Result<Vec<OwnedFd>, SnapshotError> {
    let procs = &image.manifest.processes;
    let scratch = match tops {
        Tops::Stubs(stubs) => {
            let mut stub_maps = Vec::new();
            for p in image.manifest.top_level() {
                let host = *stubs.get(&p.ns_pid).ok_or_else(|| RestoreError::Process {
                    pid: p.ns_pid,
                    what: "no stub was forked for it".into(),
                })?;
                stub_maps.extend(maps_of(host)?);
            }
            // One place for all: children inherit it from their parent's
            // fork.
            let all_vmas: Vec<Vma> = procs.iter().flat_map(|p| p.vmas.iter().cloned()).collect();
            choose_scratch(&stub_maps, &all_vmas)?
        }
        Tops::Forked { scratch, .. } => *scratch,
    };
    let data = scratch + DATA;
    let carried = matches!(tops, Tops::Forked { carried: true, .. });
    let mut shmem = HashMap::new();
    let mut memfds = kinds::memfd::Made::default();
    for (i, p) in procs.iter().enumerate() {
        let parent = procs.iter().position(|q| q.ns_pid == p.ns_ppid);
        let b = match (parent, tops) {
            (None, Tops::Forked { .. }) => built.get(i).ok_or_else(|| RestoreError::Process {
                pid: p.ns_pid,
                what: "a second top-level process cannot be forked from one template".into(),
            })?,
            (None, Tops::Stubs(stubs)) => {
                let host = stubs[&p.ns_pid];
                pinned.add(host);
                let frozen = Frozen::seize(
                    host,
                    Options::PTRACE_O_TRACECLONE | Options::PTRACE_O_TRACEFORK,
                )?;
                let mem = Memory::open(host)?;
                built.push(Built {
                    frozen,
                    mem,
                    template: registers_of(host)?,
                });
                let b = built.last().expect("just pushed");
                prepare_stub(b, p, scratch)?;
                b
            }
            (Some(j), _) => {
                let pb = &built[j];
                let inj = pb.frozen.rebuilding_injector(scratch, pb.template);
                let frozen =
                    crate::kinds::tree::fork(&pb.frozen, &inj, &pb.mem, data, p.ns_pid, None)?;
                let host = frozen.pid;
                let mem = Memory::open(host)?;
                built.push(Built {
                    frozen,
                    mem,
                    template: registers_of(host)?,
                });
                &built[i]
            }
        };
        kinds::threads::check_xstate(b.frozen.pid, &p.threads)?;
        // A forked process has its memory and mm fields from its holder.
        let memory = parent.is_some() || matches!(tops, Tops::Stubs(_));
        first_pass(
            b,
            p,
            parent.map(|j| &procs[j]),
            image,
            hooks,
            scratch,
            memory,
            carried && parent.is_none(),
            &mut shmem,
            &mut memfds,
            lazy,
        )?;
    }
    // Groups once every process exists, leaders first.
    for leaders in [true, false] {
        for (b, p) in built.iter().zip(procs) {
            if (p.ns_pgid == p.ns_pid) == leaders {
                let inj = b.frozen.rebuilding_injector(scratch, b.template);
                crate::kinds::tree::set_group(&inj, b.frozen.pid, p)?;
            }
        }
    }
    memfds.finish(image, |host| {
        built
            .iter()
            .find(|b| b.frozen.pid == host)
            .map(|b| b.frozen.rebuilding_injector(scratch, b.template))
    })?;
    let mut listeners = Vec::with_capacity(procs.len());
    for ((b, p), regs_of) in built.iter_mut().zip(procs).zip(saved_regs) {
        let top = !procs.iter().any(|q| q.ns_pid == p.ns_ppid);
        listeners.push(second_pass(b, p, regs_of, hooks, scratch, carried && top)?);
    }
    Ok(listeners)
}

pub(crate) fn maps_of(pid: u32) -> Result<Vec<parse::MapsLine>, SnapshotError> {
    parse::maps(&std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default())
        .ok_or_else(|| {
            RestoreError::Stub {
                pid,
                what: "unreadable maps".into(),
            }
            .into()
        })
}

pub(crate) fn registers_of(pid: u32) -> Result<libc::user_regs_struct, SnapshotError> {
    ptrace::getregs(Pid::from_raw(pid as i32))
        .map_err(|e| SnapshotError::process(pid, "PTRACE_GETREGS", e))
}

/// Empties a stub forked by the namespace init: the scratch mapping in,
/// everything it had (fds above stdio, memory, rseq) out.
pub(crate) fn prepare_stub(b: &Built, p: &ProcessImage, scratch: u64) -> Result<(), SnapshotError> {
    let pid = b.frozen.pid;
    if b.frozen.tids.len() != 1 {
        return Err(RestoreError::Stub {
            pid,
            what: format!("has {} threads", b.frozen.tids.len()),
        }
        .into());
    }
    let stub_maps = maps_of(pid)?;
    let text = stub_maps
        .iter()
        .find(|m| m.exec && m.name.starts_with('/'))
        .ok_or_else(|| RestoreError::Stub {
            pid,
            what: "has no executable mapping".into(),
        })?
        .start;
    map_scratch(&b.frozen, &b.mem, text, Some(scratch), SCRATCH)?;
    let inj = b.frozen.rebuilding_injector(scratch, b.template);
    // The stub inherited its parent's rseq registration; the kernel
    // would write into memory about to disappear.
    if let Ok(c) = xptrace::rseq_config(pid) {
        if c.pointer != 0 {
            inj.ok(
                pid,
                "rseq unregister",
                libc::SYS_rseq,
                &[
                    c.pointer,
                    c.len as u64,
                    RSEQ_FLAG_UNREGISTER,
                    c.signature as u64,
                ],
            )?;
        }
    }
    let code = scratch + BATCH_AT;
    close_stub_fds(&inj, &b.mem, pid, code)?;
    let unmaps: Vec<(i64, [u64; 6])> = stub_maps
        .iter()
        .filter(|m| m.start != scratch && m.name != "[vsyscall]")
        .map(|m| (libc::SYS_munmap, [m.start, m.end - m.start, 0, 0, 0, 0]))
        .collect();
    inj.ok_all(&b.mem, pid, code, "munmap of stub memory", &unmaps)?;
    map_vdso(&inj, pid, &p.vmas)?;
    Ok(())
}

fn same_place(a: &Vma, b: &Vma) -> bool {
    a.start == b.start
        && a.end == b.end
        && a.prot == b.prot
        && a.shared == b.shared
        && a.kind == b.kind
}

/// What a process needs before it forks its children: memory and mm
/// fields (unless `memory` is false: a clone forked from its template
/// holder has them, all but its arguments and executable), limits (those
/// its holder carries only if `carried` is false), session, fds. A forked
/// child starts as a copy of its rebuilt parent and drops what it did not
/// have.
#[allow(clippy::too_many_arguments)]
fn first_pass(
    b: &Built,
    p: &ProcessImage,
    parent: Option<&ProcessImage>,
    image: &Image,
    hooks: &RestoreHooks,
    scratch: u64,
    memory: bool,
    carried: bool,
    shmem: &mut HashMap<u64, (u32, u64, u64)>,
    memfds: &mut kinds::memfd::Made,
    lazy: Option<&PageServer>,
) -> Result<(), SnapshotError> {
    let pid = b.frozen.pid;
    let mem = &b.mem;
    let data = scratch + DATA;
    let inj = b.frozen.rebuilding_injector(scratch, b.template);
    if let Some(pp) = parent {
        crate::kinds::tree::keep_inherited(&inj, pid, p)?;
        let unmaps: Vec<(i64, [u64; 6])> = pp
            .vmas
            .iter()
            .filter(|v| !p.vmas.iter().any(|c| c.inherited && same_place(c, v)))
            .map(|v| (libc::SYS_munmap, [v.start, v.end - v.start, 0, 0, 0, 0]))
            .collect();
        inj.ok_all(
            mem,
            pid,
            scratch + BATCH_AT,
            "munmap of a mapping of the parent",
            &unmaps,
        )?;
        let vdso_moved = p
            .vmas
            .iter()
            .any(|v| matches!(v.kind, VmaKind::Vdso(_)) && !v.inherited);
        if vdso_moved {
            map_vdso(&inj, pid, &p.vmas)?;
        }
    }
    if memory {
        map_memory(&inj, mem, pid, data, image, p, shmem, memfds, lazy)?;
        let keep_exe = parent.is_some_and(|pp| pp.exe == p.exe);
        set_mm(&inj, mem, pid, data, p, keep_exe, None)?;
    } else {
        // The holder's arguments and executable were its own.
        set_mm(&inj, mem, pid, data, p, false, None)?;
    }
    // Limits before fds: a process that raised RLIMIT_NOFILE may hold
    // fds above the stub's limit. Its temporaries sit above its highest
    // fd, so the soft limit is the hard one until the fds are placed.
    let nofile = libc::RLIMIT_NOFILE;
    // A holder that carries a limit carries RLIMIT_NOFILE raised already.
    let own: Vec<(u32, u64, u64)> = p
        .rlimits
        .iter()
        .copied()
        .filter(|l| !carried || !crate::holder::sets_limit(l.0))
        .collect();
    let first: Vec<(u32, u64, u64)> = own
        .iter()
        .map(|&(res, cur, max)| {
            if res == nofile {
                (res, max, max)
            } else {
                (res, cur, max)
            }
        })
        .collect();
    let code = scratch + BATCH_AT;
    let set_one =
        |limit| Ok::<_, SnapshotError>(set_rlimits(&inj, mem, pid, data, code, &[limit])?[0]);
    let set = set_rlimits(&inj, mem, pid, data, code, &first)?;
    for (&(res, cur, max), set) in own.iter().zip(set) {
        // RLIMIT_NOFILE raised to its hard limit, or else as it was.
        let set = set || (res == nofile && set_one((res, cur, max))?);
        if !set {
            warn!(resource = res, "rlimit could not be restored");
        }
    }
    crate::kinds::tree::set_session(&inj, pid, p)?;
    crate::kinds::tree::fetch_fds(&inj, pid, p)?;
    restore_fds(&inj, mem, pid, data, p, hooks, image, memfds)?;
    for &limit in p.rlimits.iter().filter(|l| l.0 == nofile) {
        if !set_one(limit)? {
            warn!(resource = limit.0, "rlimit could not be restored");
        }
    }
    Ok(())
}

/// Everything else, once every process exists: stashes closed, cwd,
/// umask, signal handlers (but those its holder carries, if `carried`),
/// the seccomp filter, threads, pending signals, credentials, and last the
/// registers.
fn second_pass(
    b: &mut Built,
    p: &ProcessImage,
    saved_regs: &[libc::user_regs_struct],
    hooks: &RestoreHooks,
    scratch: u64,
    carried: bool,
) -> Result<OwnedFd, SnapshotError> {
    let pid = b.frozen.pid;
    let data = scratch + DATA;
    let template = b.template;
    {
        let inj = b.frozen.rebuilding_injector(scratch, template);
        let mem = &b.mem;
        for &fd in &p.stashed {
            inj.call(pid, libc::SYS_close, &[fd as u64])?;
        }
        let cwd = write_str(mem, data, &p.cwd)?;
        inj.ok(pid, &format!("chdir {}", p.cwd), libc::SYS_chdir, &[cwd])?;
        inj.ok(pid, "umask", libc::SYS_umask, &[p.umask as u64])?;
        let actions: Vec<_> = p
            .sigactions
            .iter()
            .filter(|a| !carried || !crate::holder::sets_action(a.signo))
            .copied()
            .collect();
        kinds::signals::restore_actions(&inj, mem, pid, data, scratch + BATCH_AT, &actions)?;
    }
    // Each process gets a filter (and listener) of its own, installed after
    // its children were forked (they get their own) and after every
    // injected call that the filter would send to a supervisor not serving
    // yet.
    let listener = install_filter(
        &b.frozen.rebuilding_injector(scratch, template),
        pid,
        &b.mem,
        data,
        hooks.filter,
    )?;
    let mem = &b.mem;
    let frozen = &mut b.frozen;

    let host_tids = kinds::threads::clone_threads(frozen, mem, pid, scratch, data, p)?;

    for t in &p.threads {
        let tid = host_tids[&t.ns_tid];
        kinds::threads::restore(
            &frozen.rebuilding_injector(scratch, template),
            mem,
            tid,
            data,
            t,
            p.ns_pid,
        )?;
    }
    kinds::signals::restore_shared_pending(
        &frozen.rebuilding_injector(scratch, template),
        mem,
        pid,
        p.ns_pid,
        data,
        &p.shared_pending,
    )?;

    // Timers as late as possible, so that the time they had left runs
    // from about when the process runs again; before the credentials, as a
    // timer on an alarm clock needs CAP_WAKE_ALARM, which the process may
    // have given up since it made it. A signal of one that fires meanwhile
    // is held and delivered on release.
    {
        let inj = frozen.rebuilding_injector(scratch, template);
        kinds::posix_timer::restore(&inj, mem, pid, data, &p.posix_timers)?;
        kinds::itimer::restore(&inj, mem, pid, data, &p.itimers)?;
    }

    // Credentials last among the injected work: everything above may need
    // root, and a thread that is no longer root may not regain it.
    for t in &p.threads {
        let tid = host_tids[&t.ns_tid];
        crate::kinds::creds::restore(
            &frozen.rebuilding_injector(scratch, template),
            mem,
            tid,
            data,
            &t.creds,
        )?;
    }
    // What the process set with madvise and mlock: now, when every process
    // of the tree is forked (a fork would leave out a DONTFORK mapping and
    // wipe a WIPEONFORK one), and under the application's own credentials
    // and rlimits, so that the kernel judges a lock as it judged the
    // application's (RLIMIT_MEMLOCK, CAP_IPC_LOCK).
    kinds::memory::advise(&frozen.rebuilding_injector(scratch, template), pid, &p.vmas)?;

    // The scratch mapping goes last, unmapped by code briefly written over
    // the restored program's own text.
    let text = p
        .vmas
        .iter()
        .find(|v| v.prot & libc::PROT_EXEC as u32 != 0 && matches!(v.kind, VmaKind::File { .. }))
        .ok_or_else(|| RestoreError::Image {
            what: "has no executable file mapping".into(),
        })?
        .start;
    unmap_scratch(frozen, mem, text, scratch, SCRATCH)?;

    // Extended state and signal masks of every thread first, registers
    // last: a failure in between leaves no thread with its saved registers
    // (and the process is killed anyway).
    kinds::threads::restore_xstate(p, &host_tids)?;
    kinds::threads::restore_registers(p, saved_regs, &host_tids)?;
    Ok(listener)
}

/// Sets each of `limits` in process `pid` in one batch of injected calls
/// (code at `code`, the limits written at `data`); whether each was set.
pub(crate) fn set_rlimits(
    inj: &Injector,
    mem: &Memory,
    pid: u32,
    data: u64,
    code: u64,
    limits: &[(u32, u64, u64)],
) -> Result<Vec<bool>, SnapshotError> {
    let values: Vec<libc::rlimit> = limits
        .iter()
        .map(|&(_, cur, max)| libc::rlimit {
            rlim_cur: cur,
            rlim_max: max,
        })
        .collect();
    mem.write(data, abi::bytes_of_slice(&values))?;
    let size = std::mem::size_of::<libc::rlimit>() as u64;
    let calls: Vec<(i64, [u64; 6])> = limits
        .iter()
        .enumerate()
        .map(|(i, &(res, _, _))| {
            let limit = data + i as u64 * size;
            (libc::SYS_prlimit64, [0, u64::from(res), limit, 0, 0, 0])
        })
        .collect();
    Ok(inj
        .call_all(mem, pid, code, &calls)?
        .into_iter()
        .map(|ret| ret >= 0)
        .collect())
}

/// Keeps the calling thread and the processes being rebuilt on the CPU the
/// caller runs on, and gives all back their CPU sets when dropped (restored
/// threads inherit their process's, so they get the full set back too).
struct SameCpu {
    cpu: Option<CpuSet>,
    ours: Option<CpuSet>,
    /// Each process pinned, with its CPU set before.
    procs: Vec<(Pid, Option<CpuSet>)>,
}

impl SameCpu {
    fn pin() -> SameCpu {
        let me = Pid::from_raw(0);
        let ours = sched_getaffinity(me).ok();
        let mut cpu = None;
        if let Ok(c) = sched_getcpu() {
            let mut one = CpuSet::new();
            if one.set(c).is_ok() {
                let _ = sched_setaffinity(me, &one);
                cpu = Some(one);
            }
        }
        SameCpu {
            cpu,
            ours,
            procs: Vec::new(),
        }
    }

    /// Pins a stub; forked children are pinned already (inherited), and
    /// get the stub's CPU set back with it.
    fn add(&mut self, pid: u32) {
        let pid = Pid::from_raw(pid as i32);
        let theirs = sched_getaffinity(pid).ok();
        if let Some(one) = &self.cpu {
            let _ = sched_setaffinity(pid, one);
        }
        self.procs.push((pid, theirs));
    }
}

impl Drop for SameCpu {
    fn drop(&mut self) {
        if let Some(set) = &self.ours {
            let _ = sched_setaffinity(Pid::from_raw(0), set);
        }
        // Every process descends from a pinned stub: each gets the CPU set
        // of the first stub back.
        let Some(set) = self.procs.iter().find_map(|(_, s)| *s) else {
            return;
        };
        let mut seen = Vec::new();
        let mut todo: Vec<u32> = self.procs.iter().map(|(p, _)| p.as_raw() as u32).collect();
        while let Some(pid) = todo.pop() {
            if seen.contains(&pid) {
                continue;
            }
            seen.push(pid);
            let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
                .into_iter()
                .flatten();
            for t in tasks.flatten() {
                if let Some(tid) = t.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) {
                    let _ = sched_setaffinity(Pid::from_raw(tid as i32), &set);
                    let children =
                        std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/children"))
                            .unwrap_or_default();
                    todo.extend(
                        children
                            .split_whitespace()
                            .filter_map(|c| c.parse::<u32>().ok()),
                    );
                }
            }
        }
    }
}

/// An address for the scratch mapping that collides with neither the
/// stub's mappings nor the saved ones.
pub(crate) fn choose_scratch(
    stub: &[parse::MapsLine],
    saved: &[Vma],
) -> Result<u64, SnapshotError> {
    let busy = |a: u64| {
        let end = a + SCRATCH;
        stub.iter().any(|m| m.start < end && a < m.end)
            || saved.iter().any(|v| v.start < end && a < v.end)
    };
    (1u64..4096)
        .map(|i| i << 32)
        .find(|&a| !busy(a))
        .ok_or(RestoreError::NoScratchAddress.into())
}

fn close_stub_fds(inj: &Injector, mem: &Memory, pid: u32, code: u64) -> Result<(), SnapshotError> {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map_err(|e| SnapshotError::process(pid, "listing fds", e))?;
    let closes: Vec<(i64, [u64; 6])> = fds
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<u64>().ok()))
        .filter(|&fd| fd > 2)
        .map(|fd| (libc::SYS_close, [fd, 0, 0, 0, 0, 0]))
        .collect();
    // Whatever close says, the fd is gone.
    inj.call_all(mem, pid, code, &closes)?;
    Ok(())
}

pub(crate) fn write_str(mem: &Memory, at: u64, s: &str) -> Result<u64, SnapshotError> {
    let mut b = s.as_bytes().to_vec();
    b.push(0);
    if b.len() as u64 > DATA_LEN {
        return Err(RestoreError::Path {
            path: s.to_string(),
            what: "too long".into(),
        }
        .into());
    }
    mem.write(at, &b)?;
    Ok(at)
}

pub(crate) fn open_in(
    inj: &Injector,
    mem: &Memory,
    pid: u32,
    data: u64,
    path: &str,
    flags: i32,
) -> Result<u64, SnapshotError> {
    let p = write_str(mem, data, path)?;
    inj.ok(
        pid,
        &format!("open {path}"),
        libc::SYS_openat,
        &[libc::AT_FDCWD as u64, p, flags as u64, 0],
    )
}

/// Moves the process's `fd` to the lowest free number at or above `high`
/// (close-on-exec): temporaries kept there are never overwritten by
/// placing a saved fd.
pub(crate) fn move_above(
    inj: &Injector,
    pid: u32,
    fd: u64,
    high: u64,
) -> Result<u64, SnapshotError> {
    let moved = inj.ok(
        pid,
        "F_DUPFD_CLOEXEC",
        libc::SYS_fcntl,
        &[fd, libc::F_DUPFD_CLOEXEC as u64, high],
    )?;
    inj.call(pid, libc::SYS_close, &[fd])?;
    Ok(moved)
}

/// The highest fd number a process is rebuilt with (its own, inherited,
/// fetched and stashed fds).
pub(crate) fn highest_fd(p: &ProcessImage) -> u64 {
    p.fds
        .iter()
        .map(|f| f.fd)
        .chain(p.inherited.iter().map(|f| f.fd))
        .chain(p.fetched.iter().map(|f| f.fd))
        .max()
        .unwrap_or(2) as u64
}

#[allow(clippy::too_many_arguments)]
fn restore_fds(
    inj: &Injector,
    mem: &Memory,
    pid: u32,
    data: u64,
    p: &ProcessImage,
    hooks: &RestoreHooks,
    image: &Image,
    memfds: &mut kinds::memfd::Made,
) -> Result<(), SnapshotError> {
    // Temporaries live above every saved fd so placing one never
    // overwrites another.
    let high = p.fds.iter().map(|f| f.fd).max().unwrap_or(2) as u64 + 1;
    let to_high = |fd: u64| move_above(inj, pid, fd, high);
    let place = |temp: u64, f: &FdImage, status_flags: i32| -> Result<(), SnapshotError> {
        let cloexec = if f.cloexec { libc::O_CLOEXEC as u64 } else { 0 };
        inj.ok(
            pid,
            &format!("dup3 to fd {}", f.fd),
            libc::SYS_dup3,
            &[temp, f.fd as u64, cloexec],
        )?;
        // An O_PATH fd refuses F_SETFL (EBADF), and has no such flags.
        if status_flags & libc::O_PATH != 0 {
            return Ok(());
        }
        let settable = status_flags & SETTABLE_FLAGS;
        let current = inj.ok(
            pid,
            "F_GETFL",
            libc::SYS_fcntl,
            &[f.fd as u64, libc::F_GETFL as u64],
        )? as i32;
        if current & SETTABLE_FLAGS == settable {
            return Ok(());
        }
        inj.ok(
            pid,
            &format!("F_SETFL on fd {}", f.fd),
            libc::SYS_fcntl,
            &[f.fd as u64, libc::F_SETFL as u64, settable as u64],
        )?;
        Ok(())
    };

    // Real ports the rebuilt connections use: their listeners take them
    // back; any other listener gets whichever port is free.
    let owned_ports = match hooks.connections {
        Connections::Own => kinds::tcp::connection_ports(&image.manifest),
        Connections::Close => Default::default(),
    };
    let stub = kinds::Stub {
        inj,
        mem,
        pid,
        data,
        data_len: DATA_LEN,
        to_high: &to_high,
        place: &place,
    };

    let mut fifos: HashMap<u64, u64> = HashMap::new();
    for f in &p.fds {
        match &f.kind {
            // Pipes, Unix sockets and epoll instances are built below, each
            // kind at once; duplicates once every description exists.
            FdKind::Stdio
            | FdKind::Epoll { .. }
            | FdKind::Dup { .. }
            | FdKind::Unix(_)
            | FdKind::TcpConn(_)
            | FdKind::Pipe { .. } => {}
            FdKind::Path { file, flags, pos } => {
                kinds::files::restore(&stub, f, file, *flags, *pos)?;
            }
            FdKind::Fifo { .. } => kinds::pipes::restore_fifo(&stub, f, &mut fifos)?,
            FdKind::Memfd { .. } => memfds.restore_fd(&stub, f, image, p.ns_pid, highest_fd(p))?,
            FdKind::TcpSocket { .. } => kinds::tcp::restore(&stub, f, hooks.listen, &owned_ports)?,
            FdKind::Udp(u) => kinds::udp::restore(&stub, f, u, hooks.bind_udp)?,
            FdKind::EventFd {
                count,
                flags,
                semaphore,
            } => kinds::events::restore_eventfd(&stub, f, *count, *flags, *semaphore)?,
            FdKind::TimerFd(t) => {
                let temp = to_high(kinds::timerfd::restore(inj, mem, pid, data, f.fd, t)?)?;
                place(temp, f, t.flags)?;
                inj.call(pid, libc::SYS_close, &[temp])?;
            }
            FdKind::SignalFd { mask, flags } => {
                let temp = to_high(kinds::signalfd::restore(inj, mem, pid, data, f.fd, *mask)?)?;
                place(temp, f, *flags)?;
                inj.call(pid, libc::SYS_close, &[temp])?;
            }
            FdKind::Inotify { flags, watches } => {
                let temp = to_high(kinds::inotify::restore(inj, mem, pid, data, f.fd, watches)?)?;
                place(temp, f, *flags)?;
                inj.call(pid, libc::SYS_close, &[temp])?;
            }
        }
    }
    // Connections after the listeners, whose real ports they share.
    for f in &p.fds {
        if let FdKind::TcpConn(c) = &f.kind {
            kinds::tcp::restore_connection(&stub, f, c, hooks.connections)?;
        }
    }
    kinds::pipes::restore(&stub, &p.fds)?;
    kinds::pipes::close_fifo_helpers(&stub, fifos)?;
    let unix: Vec<&FdImage> = p
        .fds
        .iter()
        .filter(|f| matches!(f.kind, FdKind::Unix(_)))
        .collect();
    crate::kinds::unix::restore(&stub, &unix)?;
    kinds::events::restore_epolls(&stub, &p.fds)?;
    // Every description exists now; an fd that shared one gets it, and
    // keeps its own close-on-exec flag.
    for f in &p.fds {
        let FdKind::Dup { of } = f.kind else {
            continue;
        };
        let cloexec = if f.cloexec { libc::O_CLOEXEC as u64 } else { 0 };
        inj.ok(
            pid,
            &format!("dup3 of fd {of} to fd {}", f.fd),
            libc::SYS_dup3,
            &[of as u64, f.fd as u64, cloexec],
        )?;
    }
    // Interest lists last: they may name fds that are duplicates.
    kinds::events::restore_interest(&stub, &p.fds)?;
    Ok(())
}

fn install_filter(
    inj: &Injector,
    pid: u32,
    mem: &Memory,
    data: u64,
    filter: &[SockFilter],
) -> Result<OwnedFd, SnapshotError> {
    let prog_at = data + 64;
    mem.write(prog_at, abi::bytes_of_slice(filter))?;
    let fprog = TraceeSockFprog {
        len: filter.len() as u16,
        filter: prog_at,
        ..TraceeSockFprog::default()
    };
    mem.write_value(data, &fprog)?;
    let theirs = inj.ok(
        pid,
        "seccomp filter",
        libc::SYS_seccomp,
        &[
            SECCOMP_SET_MODE_FILTER,
            SECCOMP_FILTER_FLAG_NEW_LISTENER,
            data,
        ],
    )?;
    let pfd = pidfd::open_thread(pid).map_err(|e| SnapshotError::process(pid, "pidfd_open", e))?;
    let listener = pidfd::get_fd(&pfd, theirs as i32)
        .map_err(|e| SnapshotError::process(pid, "taking the seccomp listener", e))?;
    inj.call(pid, libc::SYS_close, &[theirs])?;
    Ok(listener)
}
