//! Signal state of a process: its handlers (asked with rt_sigaction from
//! inside the process, set again the same way) and the signals pending for
//! the whole process (peeked with PTRACE_PEEKSIGINFO, queued again with
//! their siginfo). Signals pending for one thread go with the thread.

use appshot_sys::abi::{self, KernelSigaction};
use appshot_sys::ptrace as xptrace;

use crate::error::{RestoreError, SnapshotError};
use crate::image::model::SigAction;
use crate::ptrace::{Injector, Memory};

/// Every signal that can have a handler.
fn catchable() -> impl Iterator<Item = u32> {
    (1..=64u32).filter(|&s| s != libc::SIGKILL as u32 && s != libc::SIGSTOP as u32)
}

/// The handler of every signal that can have one, asked in thread `main`
/// in one batch of injected calls (code at `code`), answered in its
/// memory at `data`.
pub fn save_actions(
    inj: &Injector,
    mem: &Memory,
    main: u32,
    data: u64,
    code: u64,
) -> Result<Vec<SigAction>, SnapshotError> {
    let signals: Vec<u32> = catchable().collect();
    let mut acts = vec![KernelSigaction::default(); signals.len()];
    let size = std::mem::size_of::<KernelSigaction>() as u64;
    let calls: Vec<(i64, [u64; 6])> = (0..signals.len())
        .map(|i| {
            let out = data + i as u64 * size;
            (libc::SYS_rt_sigaction, [signals[i] as u64, 0, out, 8, 0, 0])
        })
        .collect();
    let answers = inj.call_all(mem, main, code, &calls)?;
    mem.read(data, abi::bytes_of_slice_mut(&mut acts))?;
    Ok(signals
        .into_iter()
        .zip(acts)
        .zip(answers)
        .filter(|(_, ret)| *ret >= 0)
        .map(|((signo, act), _)| SigAction {
            signo,
            handler: act.handler,
            flags: act.flags,
            restorer: act.restorer,
            mask: act.mask,
        })
        .collect())
}

/// Sets the saved handlers in process `pid`, in one batch of injected
/// calls (code at `code`, the actions written at `data`).
pub fn restore_actions(
    inj: &Injector,
    mem: &Memory,
    pid: u32,
    data: u64,
    code: u64,
    sigactions: &[SigAction],
) -> Result<(), SnapshotError> {
    let acts: Vec<KernelSigaction> = sigactions
        .iter()
        .map(|a| KernelSigaction {
            handler: a.handler,
            flags: a.flags,
            restorer: a.restorer,
            mask: a.mask,
        })
        .collect();
    mem.write(data, abi::bytes_of_slice(&acts))?;
    let size = std::mem::size_of::<KernelSigaction>() as u64;
    let calls: Vec<(i64, [u64; 6])> = sigactions
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let act = data + i as u64 * size;
            (libc::SYS_rt_sigaction, [a.signo as u64, act, 0, 8, 0, 0])
        })
        .collect();
    let answers = inj.call_all(mem, pid, code, &calls)?;
    match sigactions.iter().zip(answers).find(|(_, ret)| *ret < 0) {
        Some((a, ret)) => Err(SnapshotError::process(
            pid,
            format!("rt_sigaction {}", a.signo),
            nix::errno::Errno::from_raw(-ret as i32),
        )),
        None => Ok(()),
    }
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
