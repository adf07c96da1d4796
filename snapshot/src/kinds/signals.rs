//! Signal state of a process: its handlers (asked with rt_sigaction from
//! inside the process, set again the same way) and the signals pending for
//! the whole process (peeked with PTRACE_PEEKSIGINFO, queued again with
//! their siginfo). Signals pending for one thread go with the thread.

use appshot_sys::abi::{self, KernelSigaction};
use appshot_sys::ptrace as xptrace;

use crate::error::{RestoreError, SnapshotError};
use crate::image::model::SigAction;
use crate::ptrace::{Injector, Memory};

/// The handler of every signal that can have one, asked in thread `main`
/// with `data` in its memory as scratch space.
pub fn save_actions(
    inj: &Injector,
    mem: &Memory,
    main: u32,
    data: u64,
) -> Result<Vec<SigAction>, SnapshotError> {
    let mut sigactions = Vec::new();
    for signo in 1..=64u32 {
        if signo == libc::SIGKILL as u32 || signo == libc::SIGSTOP as u32 {
            continue;
        }
        if inj
            .call(main, libc::SYS_rt_sigaction, &[signo as u64, 0, data, 8])?
            .ret
            < 0
        {
            continue;
        }
        let act: KernelSigaction = mem.read_value(data)?;
        sigactions.push(SigAction {
            signo,
            handler: act.handler,
            flags: act.flags,
            restorer: act.restorer,
            mask: act.mask,
        });
    }
    Ok(sigactions)
}

/// Sets the saved handlers in process `pid`.
pub fn restore_actions(
    inj: &Injector,
    mem: &Memory,
    pid: u32,
    data: u64,
    sigactions: &[SigAction],
) -> Result<(), SnapshotError> {
    for a in sigactions {
        let act = KernelSigaction {
            handler: a.handler,
            flags: a.flags,
            restorer: a.restorer,
            mask: a.mask,
        };
        mem.write_value(data, &act)?;
        inj.ok(
            pid,
            &format!("rt_sigaction {}", a.signo),
            libc::SYS_rt_sigaction,
            &[a.signo as u64, data, 0, 8],
        )?;
    }
    Ok(())
}

/// The siginfo of each signal pending for the whole process `pid`.
pub fn save_shared_pending(pid: u32) -> Result<Vec<Vec<u8>>, SnapshotError> {
    Ok(xptrace::pending_signals(pid, true)
        .map_err(|e| SnapshotError::process(pid, "PTRACE_PEEKSIGINFO", e))?
        .iter()
        .map(|s| s.to_vec())
        .collect())
}

/// Queues the signals pending for the whole process again in process
/// `pid` (`ns_pid` in its namespace).
pub fn restore_shared_pending(
    inj: &Injector,
    mem: &Memory,
    pid: u32,
    ns_pid: u32,
    data: u64,
    pending: &[Vec<u8>],
) -> Result<(), SnapshotError> {
    for info in pending {
        let signo = abi::from_bytes::<libc::siginfo_t>(info)
            .ok_or_else(|| RestoreError::Process {
                pid,
                what: format!("a pending signal's siginfo of {} bytes", info.len()),
            })?
            .si_signo;
        mem.write(data, info)?;
        inj.ok(
            pid,
            "rt_sigqueueinfo",
            libc::SYS_rt_sigqueueinfo,
            &[ns_pid as u64, signo as u64, data],
        )?;
    }
    Ok(())
}
