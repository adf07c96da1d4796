//! The seccomp listener loop: receive a notification, resolve the task that
//! made it, let the multiplexer emulate the syscall, answer.
//!
//! Every INET socket call is performed by the supervisor on a duplicate of
//! the task's socket (pidfd_getfd) with addresses copied out of the task's
//! memory once; the task's memory is never rewritten to then let the kernel
//! continue, which would race with the task's other threads.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::File;
use std::io::IoSlice;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use appshot_sys::{pidfd, seccomp};
use nix::sys::uio::{process_vm_writev, RemoteIoVec};
use nix::unistd::Pid;
use seccomp::Response;
use tracing::{debug, warn};

use crate::multiplex::Multiplexer;

const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;

/// What the supervisor holds on a supervised thread, kept from one of its
/// notifications to the next: opening them costs a ptrace access check
/// each time. A handle outlived by its thread fails (a pidfd names one
/// task, never its TID's next owner; /proc/TID/mem reads nothing once the
/// address space it was opened on is gone), and is then opened anew.
struct TaskHandles {
    pidfd: OwnedFd,
    mem: File,
}

impl TaskHandles {
    fn open(tid: u32) -> std::io::Result<TaskHandles> {
        Ok(TaskHandles {
            pidfd: pidfd::open_thread(tid)?,
            mem: File::open(format!("/proc/{tid}/mem"))?,
        })
    }
}

/// The handles of the threads that made notifications recently.
#[derive(Default)]
struct Tasks(HashMap<u32, Arc<TaskHandles>>);

/// Beyond this many threads the cache starts over rather than grow.
const TASKS_MAX: usize = 4096;

impl Tasks {
    fn get(&mut self, tid: u32) -> std::io::Result<Arc<TaskHandles>> {
        if let Some(h) = self.0.get(&tid) {
            return Ok(Arc::clone(h));
        }
        if self.0.len() >= TASKS_MAX {
            self.0.clear();
        }
        let h = Arc::new(TaskHandles::open(tid)?);
        self.0.insert(tid, Arc::clone(&h));
        Ok(h)
    }

    fn reopen(&mut self, tid: u32) -> std::io::Result<Arc<TaskHandles>> {
        self.0.remove(&tid);
        self.get(tid)
    }
}

/// One pending notified syscall and the means to act for its task.
pub struct Call {
    pub id: u64,
    pub tid: u32,
    pub nr: i64,
    pub args: [u64; 6],
    listener: Arc<OwnedFd>,
    handles: RefCell<Arc<TaskHandles>>,
    tasks: Arc<Mutex<Tasks>>,
}

impl Call {
    /// Argument `i` as the C `int` the syscall takes.
    pub fn int_arg(&self, i: usize) -> i32 {
        self.args[i] as u32 as i32
    }

    /// Runs `op` on the task's handles; if it fails, once more on handles
    /// opened anew, in case the cached ones outlived their thread. The
    /// notification is checked after the reopen, as on first use: only
    /// while it is pending does its TID name the notifying thread.
    fn with_handles<T>(
        &self,
        mut op: impl FnMut(&TaskHandles) -> Result<T, i32>,
    ) -> Result<T, i32> {
        let first = op(&self.handles.borrow());
        if first.is_ok() {
            return first;
        }
        let fresh = self.tasks.lock().expect("task handles").reopen(self.tid);
        match fresh {
            Ok(h) if self.still_pending() => {
                *self.handles.borrow_mut() = h;
                op(&self.handles.borrow())
            }
            _ => first,
        }
    }

    /// The task's file descriptor `fd`, duplicated into the supervisor.
    pub fn task_fd(&self, fd: RawFd) -> Result<OwnedFd, i32> {
        self.with_handles(|h| {
            pidfd::get_fd(&h.pidfd, fd).map_err(|e| e.raw_os_error().unwrap_or(libc::EBADF))
        })
    }

    /// Copies `len` bytes from the task's address `addr`.
    pub fn read(&self, addr: u64, len: usize) -> Result<Vec<u8>, i32> {
        let mut buf = vec![0u8; len];
        if len == 0 {
            return Ok(buf);
        }
        self.with_handles(|h| {
            h.mem
                .read_exact_at(&mut buf, addr)
                .map_err(|_| libc::EFAULT)
        })?;
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

/// Receives and handles notifications until the listener is gone.
pub fn serve(listener: Arc<OwnedFd>, mux: Arc<Multiplexer>) {
    let tasks = Arc::new(Mutex::new(Tasks::default()));
    loop {
        let n = match seccomp::recv(&listener) {
            Ok(n) => n,
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
        // Resolve the TID to its handles first, then check the
        // notification is still pending: only then do handles opened here
        // belong to the caller (cached ones are checked on use).
        let handles = match tasks.lock().expect("task handles").get(n.pid) {
            Ok(h) => h,
            Err(_) => continue,
        };
        if !seccomp::id_valid(&listener, n.id) {
            continue;
        }
        let call = Call {
            id: n.id,
            tid: n.pid,
            nr: i64::from(n.nr),
            args: n.args,
            listener: Arc::clone(&listener),
            handles: RefCell::new(handles),
            tasks: Arc::clone(&tasks),
        };
        mux.handle(call);
    }
}
