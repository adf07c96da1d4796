//! Template holders, and clones forked from them.
//!
//! A holder is a process outside every instance that holds a template's
//! process memory, restored once (copied, anonymous, as any restore makes
//! it), and runs nothing: it waits in a `pause` loop written into its
//! scratch mapping, every signal blocked. A clone is a fork of it, so its
//! memory is anonymous and shared copy-on-write with the holder and every
//! other clone: MADV_DONTNEED gives zeros, MADV_FREE works, and a clone's
//! own memory grows only with the pages it writes.
//!
//! The fork needs two steps, because an orphan goes to the reaper of its
//! dying parent's PID namespace: the holder joins the clone's PID
//! namespace for its children and forks a helper there that shares its
//! memory (CLONE_VM: no page tables copied); the helper joins the
//! instance's other namespaces, takes the namespace init's standard
//! streams, forks the clone with its saved PID and exits, and the clone is
//! the namespace init's child, as a restored process is. The rest of the
//! clone's state is restored as for any restore
//! ([`crate::restore::restore_forked`]).

use std::collections::HashMap;
use std::path::Path;

use appshot_sys::abi::CloneArgs;
use appshot_sys::ptrace as xptrace;
use nix::sched::{sched_getaffinity, sched_getcpu, sched_setaffinity, CpuSet};
use nix::sys::ptrace::Options;
use nix::unistd::Pid;
use tracing::warn;

use crate::error::{RestoreError, SnapshotError};
use crate::image::model::{ProcessImage, VmaKind};
use crate::image::{Image, PAGE};
use crate::kinds;
use crate::kinds::memory::{map_memory, set_mm};
use crate::ptrace::{Frozen, Memory, BATCH_AT};
use crate::restore::{
    choose_scratch, maps_of, open_in, prepare_stub, set_rlimits, write_str, Built, DATA,
};

/// Where the pause loop lies in the scratch mapping, after the
/// `syscall; int3` that injected calls use.
const PARK: u64 = 16;

/// `1: mov $SYS_pause, %eax; syscall; jmp 1b`.
const PAUSE_LOOP: [u8; 9] = [0xb8, 0x22, 0x00, 0x00, 0x00, 0x0f, 0x05, 0xeb, 0xf7];

/// Where the holder's command line lies in the scratch mapping's first
/// page, after the code.
const ARGS: u64 = 256;

const SIG_IGN: u64 = 1;

const MADV_COLLAPSE: u64 = 25;

/// A PMD-mapped huge page.
const HUGE: u64 = 2 << 20;

/// A running template holder: its PID and its scratch mapping, which every
/// clone inherits and unmaps.
#[derive(Clone, Copy, Debug)]
pub struct Holder {
    pub pid: u32,
    pub scratch: u64,
    /// It carries the image's signal actions and resource limits (all but
    /// those [`sets_limit`] and [`sets_action`] leave to each clone), so
    /// that a clone has them from its fork. False for a holder built before
    /// holders did: its clones set them all.
    pub carries_state: bool,
}

/// Whether a holder carries the image's limit `resource` for its clones.
/// Not RLIMIT_CPU: every fork is CPU time of the holder's, which would
/// reach a template's limit over enough clones. RLIMIT_NOFILE is carried
/// with its soft limit raised to the hard one, as a clone needs it while
/// its fds are placed; it sets the saved soft limit after.
pub(crate) fn sets_limit(resource: u32) -> bool {
    resource != libc::RLIMIT_CPU
}

/// Whether a holder carries the image's action for `signo`: all but
/// SIGCHLD's, which the holder ignores for its own children.
pub(crate) fn sets_action(signo: u32) -> bool {
    signo != libc::SIGCHLD as u32
}

/// Why clones of the image cannot be forked from a holder, if they cannot:
/// a holder holds one process, and memory shared between processes would
/// stay shared with the holder and every clone after the fork.
pub fn unforkable(image: &Image) -> Option<String> {
    let tops = image.manifest.top_level().count();
    if tops != 1 {
        return Some(format!(
            "it has {tops} top-level processes, a holder holds one"
        ));
    }
    let p = top(image)?;
    p.vmas
        .iter()
        .find(|v| {
            matches!(
                v.kind,
                VmaKind::SharedAnon { .. } | VmaKind::SysvShm { .. } | VmaKind::Memfd { .. }
            )
        })
        .map(|v| {
            format!(
                "its mapping {:#x}-{:#x} is shared memory or a memfd, which a fork would share with every clone",
                v.start, v.end
            )
        })
}

fn top(image: &Image) -> Option<&ProcessImage> {
    image.manifest.top_level().next()
}

/// Makes `stub` (a single-threaded process of ours that waits in `pause`,
/// in the host's namespaces) the holder of the image's process: its memory
/// copied in, its mm fields, signal actions and resource limits set (see
/// [`Holder::carries_state`]), and then parked and let go. Its file
/// descriptors, filter, threads and credentials stay as they are (each
/// clone gets the image's after its fork). On error the stub is killed.
pub fn build_holder(stub: u32, image: &Image) -> Result<Holder, SnapshotError> {
    let p = top(image).ok_or(SnapshotError::NoProcess)?;
    let b = Built::of(Frozen::seize(stub, Options::empty())?)?;
    match park(&b, p, image) {
        Ok(scratch) => {
            b.frozen.release();
            Ok(Holder {
                pid: stub,
                scratch,
                carries_state: true,
            })
        }
        Err(e) => {
            b.frozen.kill(|| {
                let _ = nix::sys::signal::kill(
                    Pid::from_raw(stub as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            });
            Err(e)
        }
    }
}

fn park(b: &Built, p: &ProcessImage, image: &Image) -> Result<u64, SnapshotError> {
    let pid = b.frozen.pid;
    let scratch = choose_scratch(&maps_of(pid)?, &p.vmas)?;
    let data = scratch + DATA;
    prepare_stub(b, p, scratch)?;
    let inj = b.frozen.rebuilding_injector(scratch, b.template);
    map_memory(
        &inj,
        &b.mem,
        pid,
        data,
        image,
        p,
        &mut HashMap::new(),
        &mut kinds::memfd::Made::default(),
        None,
    )?;
    // Its command line and executable say what it is, not the
    // application's (each clone gets those back): `appshot-template IMAGE`
    // run by appshot. An executable it named would be busy (ETXTBSY) for
    // writers as long as the holder lives.
    let mut args = b"appshot-template\0".to_vec();
    args.extend_from_slice(image.path.as_os_str().as_encoded_bytes());
    args.truncate((PAGE - ARGS - 1) as usize);
    args.push(0);
    b.mem.write(scratch + ARGS, &args)?;
    let shown = (scratch + ARGS, scratch + ARGS + args.len() as u64);
    set_mm(&inj, &b.mem, pid, data, p, true, Some(shown))?;
    // Huge pages where the memory allows, without changing any mapping's
    // flags (MADV_COLLAPSE, Linux 6.1+): a fork copies one entry per 2 MiB
    // instead of 512, and a clone's first write to one still copies a
    // single page. Best effort: memory that cannot be collapsed is forked
    // as it is.
    for v in p
        .vmas
        .iter()
        .filter(|v| matches!(v.kind, VmaKind::Anon) && !v.shared && v.end - v.start >= HUGE)
    {
        inj.call(
            pid,
            libc::SYS_madvise,
            &[v.start, v.end - v.start, MADV_COLLAPSE],
        )?;
    }
    // Nothing but SIGKILL ends its pause: a stray signal's default action
    // would end it, and an application's handler (set below) is not its
    // own. Blocked before the handlers exist, so that none can run here.
    xptrace::set_sigmask(pid, u64::MAX)
        .map_err(|e| SnapshotError::process(pid, "PTRACE_SETSIGMASK", e))?;
    // What each clone would set anew after its fork, set once here and
    // inherited.
    let actions: Vec<_> = p
        .sigactions
        .iter()
        .filter(|a| sets_action(a.signo))
        .copied()
        .collect();
    kinds::signals::restore_actions(&inj, &b.mem, pid, data, scratch + BATCH_AT, &actions)?;
    let limits: Vec<(u32, u64, u64)> = p
        .rlimits
        .iter()
        .filter(|l| sets_limit(l.0))
        .map(|&(res, cur, max)| {
            if res == libc::RLIMIT_NOFILE {
                (res, max, max)
            } else {
                (res, cur, max)
            }
        })
        .collect();
    let set = set_rlimits(&inj, &b.mem, pid, data, scratch + BATCH_AT, &limits)?;
    for (&(res, _, _), set) in limits.iter().zip(set) {
        if !set {
            warn!(
                resource = res,
                "rlimit could not be set in the template holder"
            );
        }
    }
    // The helper each clone is forked through is its child: reaped by
    // the kernel when it exits.
    let ignore = [SIG_IGN, 0, 0, 0].map(u64::to_ne_bytes).concat();
    b.mem.write(data, &ignore)?;
    inj.ok(
        pid,
        "rt_sigaction SIGCHLD",
        libc::SYS_rt_sigaction,
        &[libc::SIGCHLD as u64, data, 0, 8],
    )?;
    // Told apart from its clones in `ps`, which show the application's
    // name.
    b.mem.write(data, b"appshot-tmpl\0")?;
    inj.ok(
        pid,
        "PR_SET_NAME",
        libc::SYS_prctl,
        &[libc::PR_SET_NAME as u64, data],
    )?;
    b.mem.write(scratch + PARK, &PAUSE_LOOP)?;
    let mut regs = b.template;
    regs.rip = scratch + PARK;
    regs.orig_rax = u64::MAX;
    nix::sys::ptrace::setregs(Pid::from_raw(pid as i32), regs)
        .map_err(|e| SnapshotError::process(pid, "PTRACE_SETREGS", e))?;
    Ok(scratch)
}

/// Forks the image's process from `holder` into the instance whose
/// namespace init is `init` (our PID): the clone has the image's PID in
/// init's PID namespace, is in init's namespaces given by `namespaces`
/// (CLONE_NEW* flags: those that differ from the holder's), has init's
/// standard streams and init as its parent, is in the cgroup2 directory
/// `cgroup` if given, and is returned frozen, before
/// it ran an instruction. The caller holds the holder's lock: its scratch
/// page is shared by every helper until that helper exits, and a holder has
/// one tracer at a time.
pub fn fork_clone(
    holder: Holder,
    init: u32,
    namespaces: u64,
    cgroup: Option<&Path>,
    image: &Image,
) -> Result<Frozen, SnapshotError> {
    let p = top(image).ok_or(SnapshotError::NoProcess)?;
    let data = holder.scratch + DATA;
    // Every step below is an injected syscall, a ptrace round trip: on one
    // CPU with us it costs a few microseconds instead of a cross-CPU
    // wake-up each.
    let pinned = Pinned::pin(holder.pid);
    let mem = Memory::open(holder.pid)?;
    let t = Frozen::seize(
        holder.pid,
        Options::PTRACE_O_TRACECLONE | Options::PTRACE_O_TRACEFORK,
    )?;
    if t.tids.len() != 1 {
        return Err(RestoreError::Stub {
            pid: holder.pid,
            what: format!("the template holder has {} threads", t.tids.len()),
        }
        .into());
    }
    // Any PID the image does not use: the clone's own and its threads' and
    // children's are taken after the helper is gone or are not its.
    let helper_pid = image
        .manifest
        .processes
        .iter()
        .flat_map(|q| q.threads.iter().map(|t| t.ns_tid).chain([q.ns_pid]))
        .max()
        .unwrap_or(1)
        + 1;
    let helper = {
        // Registers put back after each call: the holder goes back to its
        // pause loop.
        let inj = t.injector(holder.scratch);
        let ns = open_in(
            &inj,
            &mem,
            holder.pid,
            data,
            &format!("/proc/{init}/ns/pid"),
            libc::O_RDONLY | libc::O_CLOEXEC,
        )?;
        let joined = inj.call(
            holder.pid,
            libc::SYS_setns,
            &[ns, libc::CLONE_NEWPID as u64],
        )?;
        inj.call(holder.pid, libc::SYS_close, &[ns])?;
        if joined.ret < 0 {
            return Err(SnapshotError::process(
                holder.pid,
                format!("setns into the PID namespace of {init}"),
                std::io::Error::from_raw_os_error(-joined.ret as i32),
            ));
        }
        let set_tid_at = data + 128;
        let args = CloneArgs {
            flags: libc::CLONE_VM as u64,
            exit_signal: libc::SIGCHLD as u64,
            set_tid: set_tid_at,
            set_tid_size: 1,
            ..CloneArgs::default()
        };
        mem.write_value(data, &args)?;
        mem.write_value(set_tid_at, &(helper_pid as i32))?;
        let injected = inj.call(
            holder.pid,
            libc::SYS_clone3,
            &[data, std::mem::size_of::<CloneArgs>() as u64],
        )?;
        if injected.ret < 0 {
            return Err(RestoreError::Clone {
                what: "helper process",
                id: helper_pid,
                error: std::io::Error::from_raw_os_error(-injected.ret as i32),
            }
            .into());
        }
        let host = injected.cloned.ok_or_else(|| RestoreError::Process {
            pid: helper_pid,
            what: "its clone was not reported".into(),
        })?;
        t.adopt_process(host)?
    };
    t.release();
    let helper = Built::of(helper)?;
    match fork_in_helper(&helper, holder.scratch, &mem, namespaces, cgroup, p.ns_pid) {
        Ok(clone) => {
            let code = holder.scratch;
            let template = helper.template;
            if let Err(e) = helper.frozen.exit(code, template) {
                let pid = clone.pid;
                clone.kill(|| {
                    let _ = nix::sys::signal::kill(
                        Pid::from_raw(pid as i32),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                });
                return Err(e);
            }
            // It inherited the pinned CPU set from the helper.
            pinned.release(clone.pid);
            Ok(clone)
        }
        Err(e) => {
            let pid = helper.frozen.pid;
            helper.frozen.kill(|| {
                let _ = nix::sys::signal::kill(
                    Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            });
            Err(e)
        }
    }
}

/// An injected call's raw result `ret` in process `pid` as an error
/// saying `what` failed, if it did.
fn failed(pid: u32, ret: i64, what: impl FnOnce() -> String) -> Result<(), SnapshotError> {
    if (-4095..0).contains(&ret) {
        return Err(SnapshotError::process(
            pid,
            what(),
            nix::errno::Errno::from_raw(-ret as i32),
        ));
    }
    Ok(())
}

/// The caller's thread and a holder on the caller's CPU, until dropped.
struct Pinned {
    holder: Pid,
    /// The CPU sets before, ours and the holder's.
    ours: Option<CpuSet>,
    holders: Option<CpuSet>,
}

impl Pinned {
    fn pin(holder: u32) -> Pinned {
        let holder = Pid::from_raw(holder as i32);
        let me = Pid::from_raw(0);
        let pinned = Pinned {
            holder,
            ours: sched_getaffinity(me).ok(),
            holders: sched_getaffinity(holder).ok(),
        };
        let mut one = CpuSet::new();
        if let Ok(cpu) = sched_getcpu() {
            if one.set(cpu).is_ok() {
                let _ = sched_setaffinity(me, &one);
                let _ = sched_setaffinity(holder, &one);
            }
        }
        pinned
    }

    /// Unpins, and gives `forked` (forked while pinned) the holder's CPU
    /// set.
    fn release(self, forked: u32) {
        if let Some(set) = &self.holders {
            let _ = sched_setaffinity(Pid::from_raw(forked as i32), set);
        }
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        if let Some(set) = &self.ours {
            let _ = sched_setaffinity(Pid::from_raw(0), set);
        }
        if let Some(set) = &self.holders {
            let _ = sched_setaffinity(self.holder, set);
        }
    }
}

/// In the helper (in the clone's PID namespace, sharing the holder's
/// memory): the namespace init's standard streams and namespaces, and the
/// fork of the clone with its saved PID. The clone stays in the holder's
/// session and process group, outside its PID namespace as a restored
/// process's (its supervisor's) are.
fn fork_in_helper(
    helper: &Built,
    scratch: u64,
    mem: &Memory,
    namespaces: u64,
    cgroup: Option<&Path>,
    ns_pid: u32,
) -> Result<Frozen, SnapshotError> {
    let pid = helper.frozen.pid;
    let data = scratch + DATA;
    let inj = helper.frozen.rebuilding_injector(scratch, helper.template);
    let init = inj.ok(
        pid,
        "pidfd_open of the namespace init",
        libc::SYS_pidfd_open,
        &[1, 0],
    )?;
    // Init's standard streams taken in one batch of injected calls; then,
    // in one more, placed, the clone's cgroup opened, init's namespaces
    // joined and its pidfd closed (fourteen calls, each a ptrace round
    // trip, before). The cgroup is opened before the namespaces are
    // joined: in the holder's mount namespace, where the supervisor found
    // it. Forked straight into it, the clone is never migrated: a write to
    // cgroup.procs waits for an RCU grace period when the cgroup lock was
    // idle (13 ms measured here), a fork into a cgroup does not.
    let code = scratch + BATCH_AT;
    let take: Vec<(i64, [u64; 6])> = (0..=2u64)
        .map(|fd| (libc::SYS_pidfd_getfd, [init, fd, 0, 0, 0, 0]))
        .collect();
    let mut theirs = Vec::with_capacity(take.len());
    for (fd, ret) in inj.call_all(mem, pid, code, &take)?.into_iter().enumerate() {
        failed(pid, ret, || {
            format!("pidfd_getfd of the namespace init's fd {fd}")
        })?;
        theirs.push(ret as u64);
    }
    let mut calls: Vec<(i64, [u64; 6])> = (0..)
        .zip(&theirs)
        .map(|(fd, &t)| (libc::SYS_dup3, [t, fd, 0, 0, 0, 0]))
        .chain(
            theirs
                .iter()
                .map(|&t| (libc::SYS_close, [t, 0, 0, 0, 0, 0])),
        )
        .collect();
    let cgroup_at = match cgroup {
        Some(dir) => {
            let path = write_str(mem, data, &dir.to_string_lossy())?;
            let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC;
            calls.push((
                libc::SYS_openat,
                [libc::AT_FDCWD as u64, path, flags as u64, 0, 0, 0],
            ));
            Some((dir, calls.len() - 1))
        }
        None => None,
    };
    let setns_at = (namespaces != 0).then(|| {
        calls.push((libc::SYS_setns, [init, namespaces, 0, 0, 0, 0]));
        calls.len() - 1
    });
    calls.push((libc::SYS_close, [init, 0, 0, 0, 0, 0]));
    let done = inj.call_all(mem, pid, code, &calls)?;
    for &ret in &done[..theirs.len()] {
        failed(pid, ret, || "dup3 of a standard stream".to_string())?;
    }
    let cgroup_fd = match cgroup_at {
        Some((dir, i)) => {
            failed(pid, done[i], || format!("open {}", dir.display()))?;
            Some(done[i] as u64)
        }
        None => None,
    };
    if let Some(i) = setns_at {
        failed(pid, done[i], || {
            "setns into the namespace init's namespaces".to_string()
        })?;
    }
    let clone = kinds::tree::fork(&helper.frozen, &inj, mem, data, ns_pid, cgroup_fd)?;
    let Some(fd) = cgroup_fd else {
        return Ok(clone);
    };
    // The clone inherited the cgroup's fd; nothing of the helper's may
    // stay with it.
    let b = Built::of(clone)?;
    let closed = b.frozen.rebuilding_injector(scratch, b.template).call(
        b.frozen.pid,
        libc::SYS_close,
        &[fd],
    );
    match closed {
        Ok(_) => Ok(b.frozen),
        Err(e) => {
            let pid = b.frozen.pid;
            b.frozen.kill(|| {
                let _ = nix::sys::signal::kill(
                    Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            });
            Err(e)
        }
    }
}
