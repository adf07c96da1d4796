//! The seccomp listener loop: receive a notification, resolve the task that
//! made it, let the multiplexer emulate the syscall, answer.
//!
//! Every INET socket call is performed by the supervisor on a duplicate of
//! the task's socket (pidfd_getfd) with addresses copied out of the task's
//! memory once; the task's memory is never rewritten to then let the kernel
//! continue, which would race with the task's other threads.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};

use appshot_sys::{pidfd, seccomp};
use nix::sys::uio::{process_vm_readv, process_vm_writev, RemoteIoVec};
use nix::unistd::Pid;
use seccomp::Response;
use tracing::{debug, warn};

use crate::error::RuntimeError;

const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
/// The error a notified call fails with when the supervisor cannot act for
/// its task (out of file descriptors or memory itself).
const RESOURCES: i32 = libc::ENOMEM;

/// The pidfds of the threads that made notifications recently, kept from
/// one notification of a thread to the next: opening one costs a lookup
/// and an fd each time. A pidfd names one task, never its TID's next owner,
/// and `pidfd_getfd` on it reaches the task's current file table; one
/// outlived by its thread fails and is then opened anew.
///
/// Only pidfds are kept: the task's memory is read with
/// `process_vm_readv`, which finds the task's address space at each call.
/// A cached `/proc/TID/mem` would stay tied to the address space it was
/// opened on, which can outlive an exec of the task (a vfork parent keeps
/// it alive) and then yield another process's memory.
struct Tasks {
    pidfds: HashMap<u32, Arc<OwnedFd>>,
    /// Beyond this many threads the cache starts over rather than grow.
    max: usize,
}

/// The most pidfds kept; fewer under a low limit of open files, so that
/// the cache never takes more than a quarter of the supervisor's.
const TASKS_MAX: usize = 256;

impl Tasks {
    fn new() -> Tasks {
        let limit = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .map_or(1024, |(soft, _)| soft);
        let max = usize::try_from(limit / 4).map_or(TASKS_MAX, |m| m.clamp(1, TASKS_MAX));
        Tasks {
            pidfds: HashMap::new(),
            max,
        }
    }

    /// The pidfd of `tid`, and whether it was opened just now (a cached
    /// one is checked on use instead, see [`Call::task_fd`]).
    fn get(&mut self, tid: u32) -> std::io::Result<(Arc<OwnedFd>, bool)> {
        if let Some(h) = self.pidfds.get(&tid) {
            return Ok((Arc::clone(h), false));
        }
        if self.pidfds.len() >= self.max {
            self.pidfds.clear();
        }
        let h = Arc::new(pidfd::open_thread(tid)?);
        self.pidfds.insert(tid, Arc::clone(&h));
        Ok((h, true))
    }

    fn reopen(&mut self, tid: u32) -> std::io::Result<Arc<OwnedFd>> {
        self.pidfds.remove(&tid);
        self.get(tid).map(|(h, _)| h)
    }
}

/// One pending notified syscall and the means to act for its task.
pub struct Call {
    pub id: u64,
    pub tid: u32,
    pub nr: i64,
    pub args: [u64; 6],
    listener: Arc<OwnedFd>,
    pidfd: RefCell<Arc<OwnedFd>>,
    tasks: Arc<Mutex<Tasks>>,
}

impl Call {
    /// Argument `i` as the C `int` the syscall takes.
    pub fn int_arg(&self, i: usize) -> i32 {
        self.args[i] as u32 as i32
    }

    /// The task's file descriptor `fd`, duplicated into the supervisor.
    /// If the cached pidfd fails, once more on a pidfd opened anew, in case
    /// the cached one outlived its thread. The notification is checked after
    /// the reopen, as on first use: only while it is pending does its TID
    /// name the notifying thread.
    pub fn task_fd(&self, fd: RawFd) -> Result<OwnedFd, i32> {
        let get =
            |p: &OwnedFd| pidfd::get_fd(p, fd).map_err(|e| e.raw_os_error().unwrap_or(libc::EBADF));
        let first = get(&self.pidfd.borrow());
        if first.is_ok() {
            return first;
        }
        let fresh = self.tasks.lock().expect("task pidfds").reopen(self.tid);
        match fresh {
            Ok(p) if self.still_pending() => {
                *self.pidfd.borrow_mut() = p;
                get(&self.pidfd.borrow())
            }
            _ => first,
        }
    }

    /// Copies `len` bytes from the task's address `addr`, in the address
    /// space the task has now.
    pub fn read(&self, addr: u64, len: usize) -> Result<Vec<u8>, i32> {
        let mut buf = vec![0u8; len];
        if len == 0 {
            return Ok(buf);
        }
        let remote = [RemoteIoVec {
            base: addr as usize,
            len,
        }];
        let n = process_vm_readv(
            Pid::from_raw(self.tid as i32),
            &mut [IoSliceMut::new(&mut buf)],
            &remote,
        )
        .map_err(|_| libc::EFAULT)?;
        if n != len {
            return Err(libc::EFAULT);
        }
        Ok(buf)
    }

    /// Writes a syscall's outputs (address, bytes) into the task in one
    /// call. Refuses unless the notification is still pending, so a TID
    /// recycled since the call was made never receives them.
    pub fn write(&self, outputs: &[(u64, &[u8])]) -> Result<(), i32> {
        if !self.still_pending() {
            return Err(libc::ESRCH);
        }
        let local: Vec<IoSlice> = outputs.iter().map(|(_, d)| IoSlice::new(d)).collect();
        let remote: Vec<RemoteIoVec> = outputs
            .iter()
            .map(|(addr, d)| RemoteIoVec {
                base: *addr as usize,
                len: d.len(),
            })
            .collect();
        let total: usize = outputs.iter().map(|(_, d)| d.len()).sum();
        let n = process_vm_writev(Pid::from_raw(self.tid as i32), &local, &remote)
            .map_err(|_| libc::EFAULT)?;
        if n != total {
            return Err(libc::EFAULT);
        }
        Ok(())
    }

    pub fn still_pending(&self) -> bool {
        seccomp::id_valid(&self.listener, self.id)
    }

    /// Sends the answer. A task that died or was interrupted by a signal
    /// meanwhile makes the kernel answer ENOENT: nothing is waiting then.
    pub fn answer(self, response: Response) {
        if let Err(e) = seccomp::respond(&self.listener, self.id, response) {
            if e.raw_os_error() != Some(libc::ENOENT) {
                warn!(tid = self.tid, nr = self.nr, "answering notification: {e}");
            }
        }
    }
}

/// What decides and answers each notification the loop receives (the
/// multiplexer); the loop knows nothing more of it.
pub trait Handler: Send + Sync + 'static {
    fn handle(self: &Arc<Self>, call: Call);
}

/// Serves `listener` with `mux` on a thread of its own (named `name`), as
/// the supervisor does for each listener of its instance and the OCI agent
/// for each container's.
pub fn spawn<H: Handler>(
    listener: OwnedFd,
    mux: Arc<H>,
    name: &str,
) -> Result<std::thread::JoinHandle<()>, RuntimeError> {
    let listener = Arc::new(listener);
    let wait = match seccomp::set_sync_wakeup(&listener) {
        Ok(()) => Wait::InReceive,
        Err(e) => {
            warn!(
                "SYNC_WAKE_UP unavailable (kernel < 6.6?), notified syscalls will be slower: {e}"
            );
            Wait::Poll
        }
    };
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || serve(listener, mux, wait))
        .map_err(|e| RuntimeError::sys("spawning the notification thread", e))
}

/// How the loop waits for the next notification.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// In the receive ioctl itself. Since Linux 6.6 (the kernels with
    /// `SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP`) it returns `ENOENT` once no
    /// task uses the filter, so no poll is needed before each call.
    InReceive,
    /// poll, then receive: older kernels never wake a receive blocked on a
    /// filter nobody uses any more.
    Poll,
}

/// Waits until the listener has a notification (`true`) or no task uses
/// its filter any more (`false`): the kernel wakes pollers with POLLHUP
/// then, but before Linux 6.6 never a thread blocked in the receive ioctl,
/// so a service that outlives its tasks (the OCI agent) would keep the
/// thread forever. With `timeout` zero it only looks.
fn wait_readable(listener: &OwnedFd, timeout: nix::poll::PollTimeout) -> bool {
    use nix::poll::{poll, PollFd, PollFlags};
    loop {
        let mut fds = [PollFd::new(
            std::os::fd::AsFd::as_fd(listener),
            PollFlags::POLLIN,
        )];
        match poll(&mut fds, timeout) {
            Ok(0) => return true,
            Ok(_) => {
                let got = fds[0].revents().unwrap_or(PollFlags::empty());
                if got.contains(PollFlags::POLLIN) {
                    return true;
                }
                if got.intersects(PollFlags::POLLHUP | PollFlags::POLLERR | PollFlags::POLLNVAL) {
                    return false;
                }
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return false,
        }
    }
}

/// Receives and handles notifications until the listener is gone or no
/// task is left under its filter.
pub fn serve<H: Handler>(listener: Arc<OwnedFd>, mux: Arc<H>, wait: Wait) {
    use nix::poll::PollTimeout;
    let tasks = Arc::new(Mutex::new(Tasks::new()));
    let gone = || debug!(fd = listener.as_raw_fd(), "no task left under the filter");
    loop {
        if wait == Wait::Poll && !wait_readable(&listener, PollTimeout::NONE) {
            return gone();
        }
        let n = match seccomp::recv(&listener) {
            Ok(n) => n,
            // ENOENT: the caller went away before it was received, or
            // (waiting in the receive) no task is left: poll tells which.
            Err(e)
                if e.raw_os_error() == Some(libc::ENOENT)
                    && wait == Wait::InReceive
                    && !wait_readable(&listener, PollTimeout::ZERO) =>
            {
                return gone();
            }
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::ENOENT)) => {
                continue
            }
            Err(e) => {
                debug!(fd = listener.as_raw_fd(), "seccomp listener closed: {e}");
                return;
            }
        };
        if n.arch != AUDIT_ARCH_X86_64 {
            // The filter kills other ABIs before they notify; reaching here
            // would mean the filter is wrong, so refuse loudly.
            warn!(
                tid = n.pid,
                arch = n.arch,
                "notification from a foreign ABI refused"
            );
            let _ = seccomp::respond(&listener, n.id, Response::Errno(libc::ENOSYS));
            continue;
        }
        // Resolve the TID to its pidfd first, then check the notification
        // is still pending: only then does a pidfd opened here belong to the
        // caller. A cached one is checked on use: it names the task that
        // held the TID when it was opened, and while that task lives no
        // other can hold the TID, so `pidfd_getfd` on it either reaches the
        // caller or fails (and is retried on a pidfd opened anew).
        let (pidfd, opened) = match tasks.lock().expect("task pidfds").get(n.pid) {
            Ok(p) => p,
            Err(e) => {
                // Answered, never dropped: an unanswered notification
                // leaves its task blocked for good.
                if seccomp::id_valid(&listener, n.id) {
                    warn!(
                        tid = n.pid,
                        nr = n.nr,
                        "no pidfd for a notifying thread: {e}"
                    );
                    if let Err(e) = seccomp::respond(&listener, n.id, Response::Errno(RESOURCES)) {
                        if e.raw_os_error() != Some(libc::ENOENT) {
                            warn!(tid = n.pid, nr = n.nr, "answering notification: {e}");
                        }
                    }
                }
                continue;
            }
        };
        if opened && !seccomp::id_valid(&listener, n.id) {
            continue;
        }
        let call = Call {
            id: n.id,
            tid: n.pid,
            nr: i64::from(n.nr),
            args: n.args,
            listener: Arc::clone(&listener),
            pidfd: RefCell::new(pidfd),
            tasks: Arc::clone(&tasks),
        };
        mux.handle(call);
    }
}
