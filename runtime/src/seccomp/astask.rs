//! Calls the supervisor performs for a task, performed *as* that task.
//!
//! The supervisor runs as root; a bind or connect it made with its own
//! credentials would let an unprivileged application reach root-only Unix
//! sockets, create socket files where it may not, or show up as root to a
//! server that checks SO_PEERCRED. So every call whose outcome the kernel
//! decides by the caller's identity runs in a fresh thread that first
//! becomes the task: its mount namespace, root and working directory (so
//! paths resolve as they would for it), its umask (so socket files get its
//! mode), and its effective and filesystem ids, groups and effective
//! capabilities (so permission checks, file ownership and peer credentials
//! are its own). The thread ends with the call: nothing is switched back,
//! so no supervisor thread can be left holding a task's identity.
//!
//! What stays the supervisor's: the real and saved uid (root, so no
//! unprivileged process can signal the thread meanwhile), the pid a server
//! reads from SO_PEERCRED (the supervisor's), and the LSM context (no LSM
//! is loaded on the machines appshot supports; see the README's threat
//! model). The network namespace needs no switch: the task's socket
//! carries its own.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, Mutex};

use appshot_sys::creds::{self, Persona};
use appshot_sys::seccomp::Response;
use nix::sched::{setns, unshare, CloneFlags};
use nix::sys::stat::{umask, Mode};
use tracing::warn;

use crate::seccomp::notify::Call;

/// Everything a thread takes on to act as task `tid`.
struct TaskContext {
    persona: Persona,
    umask: u32,
    root: File,
    cwd: File,
    /// The task's mount namespace, if it is not the supervisor's.
    mount_ns: Option<File>,
}

/// Reads task `tid`'s identity. Its own calls cannot change it meanwhile:
/// the task is blocked in the notified call (a credential change another
/// thread broadcasts interrupts that call, which the caller then sees as
/// no longer pending).
fn context_of(tid: u32) -> Result<TaskContext, i32> {
    let errno = |e: std::io::Error| e.raw_os_error().unwrap_or(libc::ESRCH);
    let open = |what: &str| File::open(format!("/proc/{tid}/{what}")).map_err(errno);
    let (root, cwd) = (open("root")?, open("cwd")?);
    let ns_inode = |path: &str| std::fs::metadata(path).map(|m| m.ino()).map_err(errno);
    let mount_ns = if ns_inode(&format!("/proc/{tid}/ns/mnt"))? == ns_inode("/proc/self/ns/mnt")? {
        None
    } else {
        Some(open("ns/mnt")?)
    };
    let same_user_ns =
        ns_inode(&format!("/proc/{tid}/ns/user"))? == ns_inode("/proc/self/ns/user")?;
    let status = procfs::process::Process::new(tid as i32)
        .and_then(|p| p.status())
        .map_err(|e| {
            warn!(tid, "reading the task's status: {e}");
            libc::ESRCH
        })?;
    Ok(TaskContext {
        persona: Persona {
            euid: status.euid,
            egid: status.egid,
            fsuid: status.fuid,
            fsgid: status.fgid,
            groups: status.groups.iter().map(|&g| g as u32).collect(),
            // Capabilities held in a user namespace of the task's own
            // count for nothing in the supervisor's: judged as none.
            effective_caps: if same_user_ns { status.capeff } else { 0 },
        },
        umask: status.umask.unwrap_or(0o022),
        root,
        cwd,
        mount_ns,
    })
}

/// Makes the calling thread the task described by `ctx`. Irreversible:
/// only for a thread that ends after the call.
fn enter(ctx: &TaskContext) -> Result<(), i32> {
    let errno = |e: nix::errno::Errno| e as i32;
    // Root, cwd and umask are shared by all threads unless unshared.
    unshare(CloneFlags::CLONE_FS).map_err(errno)?;
    if let Some(ns) = &ctx.mount_ns {
        setns(ns, CloneFlags::CLONE_NEWNS).map_err(errno)?;
    }
    nix::unistd::fchdir(ctx.root.as_raw_fd()).map_err(errno)?;
    nix::unistd::chroot(".").map_err(errno)?;
    nix::unistd::fchdir(ctx.cwd.as_raw_fd()).map_err(errno)?;
    umask(Mode::from_bits_truncate(ctx.umask));
    creds::assume(&ctx.persona).map_err(|e| e.raw_os_error().unwrap_or(libc::EPERM))
}

/// Performs `op` for the task that made `call`, as that task, in a thread
/// of its own (off the receive loop: a connect may block), and answers the
/// call with its outcome.
pub fn perform(call: Call, op: impl FnOnce() -> Result<(), i32> + Send + 'static) {
    // Shared so that the call can still be answered if no thread starts.
    let slot = Arc::new(Mutex::new(Some(call)));
    let theirs = Arc::clone(&slot);
    let spawned = std::thread::Builder::new()
        .name("as-task".into())
        .spawn(move || {
            let Some(call) = theirs.lock().expect("call slot").take() else {
                return;
            };
            let result = context_of(call.tid).and_then(|ctx| {
                // Only while the call is pending is `tid` still the task
                // that made it, so only then is its identity the caller's.
                if !call.still_pending() {
                    return Err(libc::ESRCH);
                }
                enter(&ctx).inspect_err(|&e| {
                    warn!(
                        tid = call.tid,
                        errno = e,
                        "cannot act as the task; call refused"
                    );
                })?;
                op()
            });
            call.answer(Response::of(result));
        });
    if let Err(e) = spawned {
        warn!("no thread to act as a task, call refused: {e}");
        if let Some(call) = slot.lock().expect("call slot").take() {
            call.answer(Response::Errno(libc::EAGAIN));
        }
    }
}

/// The effective capabilities task `tid` holds, as the kernel would count
/// them for a socket in the supervisor's network namespace.
pub fn effective_caps(tid: u32) -> u64 {
    context_of(tid).map_or(0, |ctx| ctx.persona.effective_caps)
}
