//! The seccomp listener loop: receive a notification, resolve the task that
//! made it, let the multiplexer emulate the syscall, answer.
//!
//! Every INET socket call is performed by the supervisor on a duplicate of
//! the task's socket (pidfd_getfd) with addresses copied out of the task's
//! memory once; the task's memory is never rewritten to then let the kernel
//! continue, which would race with the task's other threads.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use appshot_sys::{pidfd, seccomp};
use nix::sys::uio::{process_vm_readv, process_vm_writev, RemoteIoVec};
use nix::unistd::Pid;
use seccomp::Response;
use tracing::{debug, warn};

use crate::multiplex::Multiplexer;

const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;

/// One pending notified syscall and the means to act for its task.
pub struct Call {
    pub id: u64,
    pub tid: u32,
    pub nr: i64,
    pub args: [u64; 6],
    listener: Arc<OwnedFd>,
    pidfd: OwnedFd,
}

impl Call {
    /// Argument `i` as the C `int` the syscall takes.
    pub fn int_arg(&self, i: usize) -> i32 {
        self.args[i] as u32 as i32
    }

    /// The task's file descriptor `fd`, duplicated into the supervisor.
    pub fn task_fd(&self, fd: RawFd) -> Result<OwnedFd, i32> {
        pidfd::get_fd(&self.pidfd, fd).map_err(|e| e.raw_os_error().unwrap_or(libc::EBADF))
    }

    /// Copies `len` bytes from the task's address `addr`.
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

/// Receives and handles notifications until the listener is gone.
pub fn serve(listener: Arc<OwnedFd>, mux: Arc<Multiplexer>) {
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
        // Resolve the TID to a pidfd first, then check the notification is
        // still pending: only then is the pidfd known to be the caller.
        let pidfd = match pidfd::open_thread(n.pid) {
            Ok(fd) => fd,
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
            pidfd,
        };
        mux.handle(call);
    }
}
