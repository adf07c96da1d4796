//! Threads of a process, saved and restored side by side: what ptrace
//! reads of each (registers, extended state, signal mask, pending signals,
//! rseq), what only the thread itself can tell (asked with injected
//! syscalls: clear-child-tid address, robust list, alternate signal stack),
//! and on restore the clone of each thread with its saved TID.

use std::collections::BTreeMap;

use appshot_sys::abi::{CloneArgs, TraceeStack};
use appshot_sys::ptrace as xptrace;
use nix::sys::ptrace;
use nix::unistd::Pid;
use tracing::warn;

use crate::error::{RestoreError, SnapshotError};
use crate::image::model::{Credentials, ProcessImage, ThreadImage};
use crate::proc::parse;
use crate::ptrace::{Frozen, Injector, Memory};
use crate::regs;

const THREAD_FLAGS: u64 = (libc::CLONE_VM
    | libc::CLONE_FS
    | libc::CLONE_FILES
    | libc::CLONE_SIGHAND
    | libc::CLONE_THREAD
    | libc::CLONE_SYSVSEM) as u64;

/// What only thread `tid` can tell, asked with injected syscalls.
pub struct Asked {
    pub creds: Credentials,
    pub tid_address: u64,
    pub robust_list: (u64, u64),
    pub altstack: (u64, u32, u64),
}

/// Asks thread `tid`, with `data` in its memory as scratch space.
pub fn ask(inj: &Injector, mem: &Memory, tid: u32, data: u64) -> Result<Asked, SnapshotError> {
    inj.ok(
        tid,
        "PR_GET_TID_ADDRESS",
        libc::SYS_prctl,
        &[libc::PR_GET_TID_ADDRESS as u64, data],
    )?;
    let tid_address = mem.read_u64(data)?;
    inj.ok(
        tid,
        "get_robust_list",
        libc::SYS_get_robust_list,
        &[0, data, data + 8],
    )?;
    let robust_list = (mem.read_u64(data)?, mem.read_u64(data + 8)?);
    inj.ok(tid, "sigaltstack", libc::SYS_sigaltstack, &[0, data])?;
    let stack: TraceeStack = mem.read_value(data)?;
    let altstack = (stack.ss_sp, stack.ss_flags as u32, stack.ss_size);
    Ok(Asked {
        creds: super::creds::save(tid, inj)?,
        tid_address,
        robust_list,
        altstack,
    })
}

/// Thread `tid` (host TID) as its own PID namespace numbers it.
pub fn ns_tid(tid: u32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{tid}/status")).unwrap_or_default();
    parse::status_field(&status, "NSpid")
        .and_then(|v| v.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or(tid)
}

/// Thread `tid` of process `pid`, as ptrace and /proc show it, with what
/// it told (`t`); `ns_tid` is its TID in its PID namespace.
pub fn save(pid: u32, tid: u32, ns_tid: u32, t: &Asked) -> Result<ThreadImage, SnapshotError> {
    let r = nix::sys::ptrace::getregs(nix::unistd::Pid::from_raw(tid as i32))
        .map_err(|e| SnapshotError::process(tid, "PTRACE_GETREGS", e))?;
    let rseq = xptrace::rseq_config(tid)
        .ok()
        .filter(|c| c.pointer != 0)
        .map(|c| (c.pointer, c.len, c.signature));
    Ok(ThreadImage {
        ns_tid,
        comm: std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm"))
            .unwrap_or_default()
            .trim_end()
            .to_string(),
        regs: regs::to_vec(&r),
        xstate: xptrace::get_xstate(tid)
            .map_err(|e| SnapshotError::process(tid, "reading XSTATE", e))?,
        sigmask: xptrace::get_sigmask(tid)
            .map_err(|e| SnapshotError::process(tid, "PTRACE_GETSIGMASK", e))?,
        pending: xptrace::pending_signals(tid, false)
            .map_err(|e| SnapshotError::process(tid, "PTRACE_PEEKSIGINFO", e))?
            .iter()
            .map(|s| s.to_vec())
            .collect(),
        tid_address: t.tid_address,
        robust_list: t.robust_list,
        altstack: t.altstack,
        rseq,
        creds: t.creds.clone(),
    })
}

/// XSTATE areas are as large as the CPU's XSAVE features need; one of
/// another size cannot be set here.
pub fn check_xstate(stub_pid: u32, threads: &[ThreadImage]) -> Result<(), SnapshotError> {
    let ours = xptrace::get_xstate(stub_pid)
        .map_err(|e| SnapshotError::process(stub_pid, "reading XSTATE", e))?
        .len();
    for t in threads {
        if t.xstate.len() != ours {
            return Err(RestoreError::Thread {
                tid: t.ns_tid,
                what: format!(
                    "has an XSTATE (FPU/AVX) area of {} bytes, this CPU's is {ours} bytes: \
                     the image was taken on a CPU with other features and cannot be restored here",
                    t.xstate.len()
                ),
            }
            .into());
        }
    }
    Ok(())
}

/// Clones every thread of `p` but the main one in process `pid` (the
/// injected clone3 sets each saved TID) and adopts it; returns the host
/// TID of each saved TID, the main thread's included.
pub fn clone_threads(
    frozen: &mut Frozen,
    mem: &Memory,
    pid: u32,
    scratch: u64,
    data: u64,
    p: &ProcessImage,
) -> Result<BTreeMap<u32, u32>, SnapshotError> {
    let mut host_tids: BTreeMap<u32, u32> = BTreeMap::new();
    host_tids.insert(p.ns_pid, pid);
    for t in p.threads.iter().filter(|t| t.ns_tid != p.ns_pid) {
        let args = clone_args(data + 128);
        mem.write_value(data, &args)?;
        mem.write_value(data + 128, &(t.ns_tid as i32))?;
        let injected = frozen.injector(scratch).call(
            pid,
            libc::SYS_clone3,
            &[data, std::mem::size_of_val(&args) as u64],
        )?;
        if injected.ret < 0 {
            return Err(RestoreError::Clone {
                what: "thread",
                id: t.ns_tid,
                error: std::io::Error::from_raw_os_error(-injected.ret as i32),
            }
            .into());
        }
        let host = injected.cloned.ok_or_else(|| RestoreError::Thread {
            tid: t.ns_tid,
            what: "its clone was not reported".into(),
        })?;
        frozen.adopt(host)?;
        host_tids.insert(t.ns_tid, host);
    }
    Ok(host_tids)
}

/// Sets the extended state and signal mask of every thread of `p`.
pub fn restore_xstate(
    p: &ProcessImage,
    host_tids: &BTreeMap<u32, u32>,
) -> Result<(), SnapshotError> {
    for t in &p.threads {
        let tid = host_tids[&t.ns_tid];
        xptrace::set_xstate(tid, &t.xstate)
            .map_err(|e| SnapshotError::process(tid, "restoring XSTATE", e))?;
        xptrace::set_sigmask(tid, t.sigmask)
            .map_err(|e| SnapshotError::process(tid, "PTRACE_SETSIGMASK", e))?;
    }
    Ok(())
}

/// Sets the saved registers of every thread of `p`, a syscall it was
/// interrupted in set to restart.
pub fn restore_registers(
    p: &ProcessImage,
    saved_regs: &[libc::user_regs_struct],
    host_tids: &BTreeMap<u32, u32>,
) -> Result<(), SnapshotError> {
    for (t, r) in p.threads.iter().zip(saved_regs) {
        let tid = host_tids[&t.ns_tid];
        let mut r = *r;
        regs::restart_interrupted_syscall(&mut r);
        ptrace::setregs(Pid::from_raw(tid as i32), r)
            .map_err(|e| SnapshotError::process(tid, "PTRACE_SETREGS", e))?;
    }
    Ok(())
}

fn clone_args(set_tid_at: u64) -> CloneArgs {
    // A zero stack keeps the parent's stack pointer; the thread only ever
    // stops at the int3 that follows the syscall before getting its own
    // registers.
    CloneArgs {
        flags: THREAD_FLAGS,
        set_tid: set_tid_at,
        set_tid_size: 1,
        ..CloneArgs::default()
    }
}

/// A `stack_t` for sigaltstack(2) from the saved (ss_sp, ss_flags,
/// ss_size): a disabled stack is set as SS_DISABLE with no area.
fn altstack((sp, flags, size): (u64, u32, u64)) -> TraceeStack {
    let flags = flags as i32;
    let (sp, flags, size) = if flags & libc::SS_DISABLE != 0 {
        (0, libc::SS_DISABLE, 0)
    } else {
        // SS_ONSTACK only reports that the thread was running on it.
        (sp, flags & !libc::SS_ONSTACK, size)
    };
    TraceeStack {
        ss_sp: sp,
        ss_flags: flags,
        ss_size: size,
        ..TraceeStack::default()
    }
}

/// Gives thread `tid` (`t.ns_tid` of process `ns_pid` in its namespace)
/// what it told of itself, its rseq area and its pending signals.
pub fn restore(
    inj: &Injector,
    mem: &Memory,
    tid: u32,
    data: u64,
    t: &ThreadImage,
    ns_pid: u32,
) -> Result<(), SnapshotError> {
    inj.call(tid, libc::SYS_set_tid_address, &[t.tid_address])?;
    // Only the thread itself may rename itself (another process's write to
    // /proc/PID/task/TID/comm fails with EINVAL).
    if !t.comm.is_empty() {
        let mut name = t.comm.as_bytes().to_vec();
        name.truncate(15);
        name.push(0);
        mem.write(data, &name)?;
        inj.ok(
            tid,
            "PR_SET_NAME",
            libc::SYS_prctl,
            &[libc::PR_SET_NAME as u64, data],
        )?;
    }
    if t.robust_list.0 != 0 {
        inj.ok(
            tid,
            "set_robust_list",
            libc::SYS_set_robust_list,
            &[t.robust_list.0, t.robust_list.1],
        )?;
    }
    // Set even when disabled: the stub inherited its parent's alternate
    // stack, which lies in memory that is gone now.
    mem.write_value(data, &altstack(t.altstack))?;
    inj.ok(tid, "sigaltstack", libc::SYS_sigaltstack, &[data, 0])?;
    if let Some((ptr, len, sig)) = t.rseq {
        if let Err(e) = inj.ok(
            tid,
            "rseq",
            libc::SYS_rseq,
            &[ptr, len as u64, 0, sig as u64],
        ) {
            warn!("rseq not re-registered: {e}");
        }
    }
    for info in &t.pending {
        mem.write(data, info)?;
        let signo = i32::from_ne_bytes(info[..4].try_into().expect("4 bytes"));
        inj.ok(
            tid,
            "rt_tgsigqueueinfo",
            libc::SYS_rt_tgsigqueueinfo,
            &[ns_pid as u64, t.ns_tid as u64, signo as u64, data],
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stack_t(s: TraceeStack) -> (u64, i32, u64) {
        (s.ss_sp, s.ss_flags, s.ss_size)
    }

    #[test]
    fn a_disabled_alternate_stack_is_set_disabled() {
        // What sigaltstack(NULL, &old) reports for a thread without one.
        let saved = (0, libc::SS_DISABLE as u32, 0);
        assert_eq!(stack_t(altstack(saved)), (0, libc::SS_DISABLE, 0));
        let odd = (0x7000, libc::SS_DISABLE as u32, 0x2000);
        assert_eq!(stack_t(altstack(odd)), (0, libc::SS_DISABLE, 0));
    }

    #[test]
    fn an_alternate_stack_keeps_its_area_and_autodisarm() {
        let saved = (0x7f00_0000, 0, 0x8000);
        assert_eq!(stack_t(altstack(saved)), (0x7f00_0000, 0, 0x8000));
        let running_on_it = (0x7f00_0000, libc::SS_ONSTACK as u32, 0x8000);
        assert_eq!(stack_t(altstack(running_on_it)), (0x7f00_0000, 0, 0x8000));
        const SS_AUTODISARM: i32 = 1 << 31;
        let autodisarm = (0x1000, SS_AUTODISARM as u32, 0x4000);
        assert_eq!(
            stack_t(altstack(autodisarm)),
            (0x1000, SS_AUTODISARM, 0x4000)
        );
    }
}
