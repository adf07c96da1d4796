//! ptrace requests `nix` does not wrap: extended FPU/AVX state, signal masks,
//! pending signals and rseq configuration of a stopped thread.

use std::io;

use libc::pid_t;

const NT_X86_XSTATE: libc::c_int = 0x202;
/// Larger than any XSAVE area x86_64 defines today (AMX makes it ~11 KiB).
const XSTATE_MAX: usize = 16384;
const PTRACE_SETSIGMASK: libc::c_uint = 0x420b;
const PTRACE_GET_RSEQ_CONFIGURATION: libc::c_uint = 0x420f;
const PTRACE_PEEKSIGINFO_SHARED: u32 = 1;

fn check(ret: libc::c_long) -> io::Result<libc::c_long> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// The thread's XSAVE area (FPU, SSE, AVX, AVX-512 state).
pub fn get_xstate(tid: u32) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; XSTATE_MAX];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: the kernel writes at most iov_len bytes into `buf` and updates
    // iov_len to the size written.
    check(unsafe {
        libc::ptrace(
            libc::PTRACE_GETREGSET,
            tid as pid_t,
            NT_X86_XSTATE,
            &mut iov,
        )
    })?;
    buf.truncate(iov.iov_len);
    Ok(buf)
}

pub fn set_xstate(tid: u32, xstate: &[u8]) -> io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: xstate.as_ptr() as *mut libc::c_void,
        iov_len: xstate.len(),
    };
    // SAFETY: the kernel only reads iov_len bytes from the buffer.
    check(unsafe {
        libc::ptrace(
            libc::PTRACE_SETREGSET,
            tid as pid_t,
            NT_X86_XSTATE,
            &mut iov,
        )
    })?;
    Ok(())
}

pub fn get_sigmask(tid: u32) -> io::Result<u64> {
    let mut mask = 0u64;
    // SAFETY: the kernel writes 8 bytes (the size passed) into `mask`.
    check(unsafe { libc::ptrace(libc::PTRACE_GETSIGMASK, tid as pid_t, 8usize, &mut mask) })?;
    Ok(mask)
}

pub fn set_sigmask(tid: u32, mask: u64) -> io::Result<()> {
    // SAFETY: the kernel reads 8 bytes from `mask`.
    check(unsafe { libc::ptrace(PTRACE_SETSIGMASK, tid as pid_t, 8usize, &mask) })?;
    Ok(())
}

/// Pending signals (as raw 128-byte siginfo), thread-private or shared by
/// the whole process.
pub fn pending_signals(tid: u32, shared: bool) -> io::Result<Vec<[u8; 128]>> {
    #[repr(C)]
    struct PeekArgs {
        off: u64,
        flags: u32,
        nr: i32,
    }
    let mut out = Vec::new();
    loop {
        let mut buf = [[0u8; 128]; 32];
        let args = PeekArgs {
            off: out.len() as u64,
            flags: if shared { PTRACE_PEEKSIGINFO_SHARED } else { 0 },
            nr: buf.len() as i32,
        };
        // SAFETY: the kernel writes at most `nr` siginfo structures (128
        // bytes each) into `buf`, which holds exactly that many.
        let n = check(unsafe {
            libc::ptrace(
                libc::PTRACE_PEEKSIGINFO,
                tid as pid_t,
                &args,
                buf.as_mut_ptr(),
            )
        })? as usize;
        out.extend_from_slice(&buf[..n]);
        if n < buf.len() {
            return Ok(out);
        }
    }
}

/// A thread's registered rseq area (glibc registers one per thread).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RseqConfig {
    pub pointer: u64,
    pub len: u32,
    pub flags: u32,
    pub signature: u32,
}

pub fn rseq_config(tid: u32) -> io::Result<RseqConfig> {
    #[repr(C)]
    struct Raw {
        pointer: u64,
        len: u32,
        signature: u32,
        flags: u32,
        pad: u32,
    }
    let mut raw = Raw {
        pointer: 0,
        len: 0,
        signature: 0,
        flags: 0,
        pad: 0,
    };
    // SAFETY: the kernel writes at most `size_of::<Raw>()` bytes into `raw`.
    check(unsafe {
        libc::ptrace(
            PTRACE_GET_RSEQ_CONFIGURATION,
            tid as pid_t,
            std::mem::size_of::<Raw>(),
            &mut raw,
        )
    })?;
    Ok(RseqConfig {
        pointer: raw.pointer,
        len: raw.len,
        flags: raw.flags,
        signature: raw.signature,
    })
}

/// Waits for a state change of thread `tid` (traced or a child, of any
/// kind: `__WALL`) and returns the raw wait status for the caller to
/// decode. Unlike nix's `waitpid`, which fails with EINVAL on a stop by a
/// real-time signal, every status is returned.
pub fn wait_raw(tid: u32) -> io::Result<libc::c_int> {
    let mut status: libc::c_int = 0;
    // SAFETY: waitpid writes one int into `status`, a valid local.
    let r = unsafe { libc::waitpid(tid as pid_t, &mut status, libc::__WALL) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(status)
}

/// The siginfo (raw, 128 bytes) of the signal a thread in a
/// signal-delivery-stop is stopped for.
pub fn get_siginfo(tid: u32) -> io::Result<[u8; 128]> {
    let mut info = [0u8; 128];
    // SAFETY: the kernel writes one siginfo_t (128 bytes on Linux) into
    // `info`, which holds exactly that many.
    check(unsafe {
        libc::ptrace(
            libc::PTRACE_GETSIGINFO,
            tid as pid_t,
            std::ptr::null_mut::<libc::c_void>(),
            info.as_mut_ptr(),
        )
    })?;
    Ok(info)
}

/// Sends signal `sig` to thread `tid` of thread group `tgid`.
pub fn tgkill(tgid: u32, tid: u32, sig: i32) -> io::Result<()> {
    // SAFETY: tgkill takes three integers and touches no memory of ours.
    check(unsafe {
        libc::syscall(
            libc::SYS_tgkill,
            tgid as pid_t,
            tid as pid_t,
            sig as libc::c_int,
        )
    })?;
    Ok(())
}

/// Queues signal `sig` with the raw siginfo `info` to thread `tid` of
/// thread group `tgid` (the kernel refuses kernel-generated codes and
/// SI_TKILL from another process with EPERM).
pub fn tgsigqueueinfo(tgid: u32, tid: u32, sig: i32, info: &[u8; 128]) -> io::Result<()> {
    // SAFETY: the kernel reads one siginfo_t (128 bytes) from `info`.
    check(unsafe {
        libc::syscall(
            libc::SYS_rt_tgsigqueueinfo,
            tgid as pid_t,
            tid as pid_t,
            sig as libc::c_int,
            info.as_ptr(),
        )
    })?;
    Ok(())
}
