//! seccomp user notification: loading a filter with a listener, and the
//! listener ioctls (RECV, SEND, ID_VALID, SET_FLAGS).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

/// `SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP` (Linux 6.6): the kernel wakes the
/// notifying task on the supervisor's CPU instead of across CPUs. With it a
/// supervisor that only answers CONTINUE costs a notified call 5.3–8 µs on
/// the machines measured (the floor row of `bench/RESULTS.md`, beside
/// appshot's own figure), against 55–62 µs without.
const SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP: u64 = 1;

/// One classic-BPF instruction, as `libseccomp` exports it.
pub type SockFilter = libc::sock_filter;

/// Decodes the bytes `seccomp_export_bpf` writes into instructions.
pub fn decode_program(bytes: &[u8]) -> io::Result<Vec<SockFilter>> {
    const INSN: usize = std::mem::size_of::<SockFilter>();
    if bytes.is_empty() || !bytes.len().is_multiple_of(INSN) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "BPF program of {} bytes is not a whole number of instructions",
                bytes.len()
            ),
        ));
    }
    Ok(bytes
        .chunks_exact(INSN)
        .map(|c| SockFilter {
            code: u16::from_ne_bytes([c[0], c[1]]),
            jt: c[2],
            jf: c[3],
            k: u32::from_ne_bytes([c[4], c[5], c[6], c[7]]),
        })
        .collect())
}

/// Loads `program` into the calling thread with `SECCOMP_FILTER_FLAG_NEW_LISTENER`
/// and returns the listener fd.
///
/// Async-signal-safe (no allocation, raw syscalls only): it runs between fork
/// and exec. Without `CAP_SYS_ADMIN` the kernel demands no_new_privs, so it is
/// set and the load retried.
pub fn load_with_listener(program: &[SockFilter]) -> io::Result<RawFd> {
    let prog = libc::sock_fprog {
        len: program.len() as libc::c_ushort,
        filter: program.as_ptr() as *mut SockFilter,
    };
    let load = || {
        // SAFETY: `prog` points at `program`, which outlives the call; the
        // kernel copies the instructions before returning.
        unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                libc::SECCOMP_FILTER_FLAG_NEW_LISTENER,
                &prog as *const libc::sock_fprog,
            )
        }
    };
    let mut ret = load();
    if ret < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EACCES) {
        // SAFETY: PR_SET_NO_NEW_PRIVS takes integer arguments only.
        if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } < 0 {
            return Err(io::Error::last_os_error());
        }
        ret = load();
    }
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ret as RawFd)
}

/// A received notification: which task made which syscall with which
/// arguments. The arguments are raw; pointers refer to the task's memory.
#[derive(Clone, Copy, Debug)]
pub struct Notification {
    pub id: u64,
    /// TID of the notifying task, in the listener owner's PID namespace.
    pub pid: u32,
    pub nr: i32,
    pub arch: u32,
    pub args: [u64; 6],
}

/// Blocks until a notification arrives on `listener`. `ENOENT`: the
/// notifying task went away before it was received, or (Linux ≥ 6.6, as
/// measured on 6.18) no task uses the filter any more, which older kernels
/// report to poll only.
pub fn recv(listener: &OwnedFd) -> io::Result<Notification> {
    // SAFETY: an all-zero seccomp_notif is a valid value (plain integers), and
    // the kernel requires the buffer to be zeroed before NOTIF_RECV.
    let mut n: libc::seccomp_notif = unsafe { std::mem::zeroed() };
    // SAFETY: NOTIF_RECV writes one `seccomp_notif` into `n`, which is large
    // enough: it is the struct the ioctl number encodes.
    let ret = unsafe {
        libc::ioctl(
            listener.as_raw_fd(),
            libc::SECCOMP_IOCTL_NOTIF_RECV,
            &mut n as *mut libc::seccomp_notif,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Notification {
        id: n.id,
        pid: n.pid,
        nr: n.data.nr,
        arch: n.data.arch,
        args: n.data.args,
    })
}

/// How a notified syscall is answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Response {
    /// The syscall "returned" this value (the supervisor performed it).
    Value(i64),
    /// The syscall failed with this errno.
    Errno(i32),
    /// Let the kernel run the syscall itself. Only for calls whose outcome
    /// the supervisor does not decide on (no TOCTOU exposure).
    Continue,
}

impl Response {
    /// The answer for a call the supervisor performed: 0, or its errno.
    pub fn of(result: Result<(), i32>) -> Response {
        match result {
            Ok(()) => Response::Value(0),
            Err(e) => Response::Errno(e),
        }
    }
}

/// Answers notification `id`. `ENOENT` means the task is gone or was
/// interrupted by a signal; callers treat it as nothing to do.
pub fn respond(listener: &OwnedFd, id: u64, response: Response) -> io::Result<()> {
    let (val, error, flags) = match response {
        Response::Value(v) => (v, 0, 0),
        Response::Errno(e) => (0, -e, 0),
        Response::Continue => (0, 0, libc::SECCOMP_USER_NOTIF_FLAG_CONTINUE as u32),
    };
    let mut resp = libc::seccomp_notif_resp {
        id,
        val,
        error,
        flags,
    };
    // SAFETY: NOTIF_SEND reads one `seccomp_notif_resp` from `resp`.
    let ret = unsafe {
        libc::ioctl(
            listener.as_raw_fd(),
            libc::SECCOMP_IOCTL_NOTIF_SEND,
            &mut resp as *mut libc::seccomp_notif_resp,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether notification `id` is still pending: the task is alive and still
/// blocked in that syscall. Checked after resolving the TID to a pidfd and
/// before writing results into its memory, so a recycled TID is never
/// mistaken for the notifying task.
pub fn id_valid(listener: &OwnedFd, id: u64) -> bool {
    let mut id = id;
    // SAFETY: NOTIF_ID_VALID reads one u64 from the pointer.
    let ret = unsafe {
        libc::ioctl(
            listener.as_raw_fd(),
            libc::SECCOMP_IOCTL_NOTIF_ID_VALID,
            &mut id as *mut u64,
        )
    };
    ret == 0
}

/// Sets `SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP` on the listener.
pub fn set_sync_wakeup(listener: &OwnedFd) -> io::Result<()> {
    // SAFETY: NOTIF_SET_FLAGS takes the flags by value in the argument.
    let ret = unsafe {
        libc::ioctl(
            listener.as_raw_fd(),
            libc::SECCOMP_IOCTL_NOTIF_SET_FLAGS,
            SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_rejects_partial_instruction() {
        assert!(decode_program(&[0u8; 12]).is_err());
        assert!(decode_program(&[]).is_err());
        let p = decode_program(&[6, 0, 1, 2, 0, 0, 0xff, 0x7f]).unwrap();
        assert_eq!(p.len(), 1);
        assert_eq!(
            (p[0].code, p[0].jt, p[0].jf, p[0].k),
            (6, 1, 2, 0x7fff_0000)
        );
    }
}
