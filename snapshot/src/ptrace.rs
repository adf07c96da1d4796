//! Freezing a process with ptrace, and running syscalls inside it.
//!
//! Every thread is seized and interrupted (PTRACE_SEIZE + PTRACE_INTERRUPT),
//! so nothing runs while its state is read. An [`Injector`] makes a stopped
//! thread execute one syscall at a time from a `syscall; int3` sequence and
//! puts its registers back afterwards; this is how a dump asks a process
//! what only it can answer (signal handlers, tid address) and how a restore
//! rebuilds a process from the inside.

use std::collections::BTreeSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Mutex;

use nix::errno::Errno;
use nix::sys::ptrace::{self, Event, Options};
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::error::SnapshotError;

/// `syscall; int3`, padded.
pub const SYSCALL_INT3: [u8; 8] = [0x0f, 0x05, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc];

fn pid(tid: u32) -> Pid {
    Pid::from_raw(tid as i32)
}

/// A process whose threads are all stopped under our ptrace. Dropping it
/// detaches every thread, so any error path leaves the process running as
/// it was.
pub struct Frozen {
    pub pid: u32,
    pub tids: Vec<u32>,
    /// Signals that arrived while frozen; delivered again on release.
    deferred: Mutex<Vec<(u32, Signal)>>,
    released: bool,
}

impl Frozen {
    /// Seizes and stops every thread of `pid`, re-reading the thread list
    /// until no new thread appears (a thread may be cloning meanwhile).
    pub fn seize(pid_: u32, options: Options) -> Result<Frozen, SnapshotError> {
        let mut frozen = Frozen {
            pid: pid_,
            tids: Vec::new(),
            deferred: Mutex::new(Vec::new()),
            released: false,
        };
        let mut seen = BTreeSet::new();
        loop {
            let tasks = std::fs::read_dir(format!("/proc/{pid_}/task"))
                .map_err(|e| SnapshotError::process(pid_, "listing threads", e))?;
            let mut new = Vec::new();
            for t in tasks.flatten() {
                if let Some(tid) = t.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) {
                    if seen.insert(tid) {
                        new.push(tid);
                    }
                }
            }
            if new.is_empty() {
                return Ok(frozen);
            }
            for tid in new {
                ptrace::seize(pid(tid), options)
                    .map_err(|e| SnapshotError::process(tid, "PTRACE_SEIZE", e))?;
                frozen.tids.push(tid);
                ptrace::interrupt(pid(tid))
                    .map_err(|e| SnapshotError::process(tid, "PTRACE_INTERRUPT", e))?;
                frozen.wait_stopped(tid)?;
            }
        }
    }

    /// Adopts a thread that was auto-attached (PTRACE_O_TRACECLONE).
    pub fn adopt(&mut self, tid: u32) -> Result<(), SnapshotError> {
        self.tids.push(tid);
        self.wait_stopped(tid)
    }

    fn wait_stopped(&self, tid: u32) -> Result<(), SnapshotError> {
        loop {
            match waitpid(pid(tid), Some(WaitPidFlag::__WALL)) {
                Ok(WaitStatus::PtraceEvent(..)) => return Ok(()),
                Ok(WaitStatus::Stopped(_, Signal::SIGSTOP)) => return Ok(()),
                Ok(WaitStatus::Stopped(_, sig)) => {
                    // A signal arrived first; the thread is stopped now, and
                    // the signal is owed to it.
                    self.defer(tid, sig);
                    return Ok(());
                }
                Ok(WaitStatus::Exited(..)) | Ok(WaitStatus::Signaled(..)) => {
                    return Err(SnapshotError::process(
                        tid,
                        "thread exited while freezing",
                        Errno::ESRCH,
                    ))
                }
                Ok(_) | Err(Errno::EINTR) => continue,
                Err(e) => {
                    return Err(SnapshotError::process(
                        tid,
                        "waiting for the thread to stop",
                        e,
                    ))
                }
            }
        }
    }

    fn defer(&self, tid: u32, sig: Signal) {
        self.deferred
            .lock()
            .expect("deferred signals")
            .push((tid, sig));
    }

    /// Resumes every thread, delivering signals that arrived meanwhile.
    pub fn release(mut self) {
        self.detach_all();
    }

    /// Kills the process while it is still frozen (a snapshot that stops
    /// the instance must not let it run one more instruction) by running
    /// `kill`, then waits, as tracer, until every thread is gone: a traced
    /// thread cannot be reaped, nor its PID namespace torn down, until its
    /// tracer has seen it die.
    pub fn kill(mut self, kill: impl FnOnce()) {
        self.released = true;
        kill();
        // A thread-group leader is reported only after its other threads,
        // so it is waited for last.
        let leader = self.pid;
        let order = self
            .tids
            .iter()
            .filter(|&&t| t != leader)
            .chain(std::iter::once(&leader));
        for &tid in order {
            loop {
                match waitpid(pid(tid), Some(WaitPidFlag::__WALL)) {
                    Ok(WaitStatus::Exited(..))
                    | Ok(WaitStatus::Signaled(..))
                    | Err(Errno::ECHILD) => break,
                    Ok(_) | Err(Errno::EINTR) => continue,
                    Err(_) => break,
                }
            }
        }
    }

    fn detach_all(&mut self) {
        if self.released {
            return;
        }
        self.released = true;
        let deferred = std::mem::take(&mut *self.deferred.lock().expect("deferred signals"));
        for &tid in &self.tids {
            let sig = deferred.iter().find(|(t, _)| *t == tid).map(|(_, s)| *s);
            let _ = ptrace::detach(pid(tid), sig);
        }
    }

    /// An injector for this process's threads, with its code at `code`.
    /// Each thread's registers are put back after every call.
    pub fn injector(&self, code: u64) -> Injector<'_> {
        Injector {
            frozen: self,
            code,
            template: None,
        }
    }

    /// An injector for a process being rebuilt, whose registers are all
    /// set at the end anyway: every call starts from `template` (any valid
    /// user-mode register set of the process) and nothing is put back,
    /// which saves two of the six ptrace requests of a call.
    pub fn rebuilding_injector(&self, code: u64, template: libc::user_regs_struct) -> Injector<'_> {
        Injector {
            frozen: self,
            code,
            template: Some(template),
        }
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        self.detach_all();
    }
}

/// Runs syscalls in a stopped thread of a [`Frozen`] process. `code` is
/// the address of a `syscall; int3` sequence in the process.
pub struct Injector<'a> {
    frozen: &'a Frozen,
    pub code: u64,
    template: Option<libc::user_regs_struct>,
}

/// What an injected syscall returned, and the new thread if it cloned one.
pub struct Injected {
    pub ret: i64,
    pub cloned: Option<u32>,
}

impl Injector<'_> {
    /// Executes syscall `nr` in thread `tid` and returns its raw result
    /// (negative errno on failure). The thread's registers are put back,
    /// unless this injector is rebuilding the process.
    pub fn call(&self, tid: u32, nr: i64, args: &[u64]) -> Result<Injected, SnapshotError> {
        let saved = match self.template {
            Some(t) => t,
            None => ptrace::getregs(pid(tid))
                .map_err(|e| SnapshotError::process(tid, "PTRACE_GETREGS", e))?,
        };
        let mut regs = saved;
        let a = |i: usize| args.get(i).copied().unwrap_or(0);
        regs.rax = nr as u64;
        regs.rdi = a(0);
        regs.rsi = a(1);
        regs.rdx = a(2);
        regs.r10 = a(3);
        regs.r8 = a(4);
        regs.r9 = a(5);
        regs.rip = self.code;
        // Not in a syscall: the kernel must not apply restart logic.
        regs.orig_rax = u64::MAX;
        ptrace::setregs(pid(tid), regs)
            .map_err(|e| SnapshotError::process(tid, "PTRACE_SETREGS", e))?;
        ptrace::cont(pid(tid), None).map_err(|e| SnapshotError::process(tid, "PTRACE_CONT", e))?;
        let mut cloned = None;
        loop {
            match waitpid(pid(tid), Some(WaitPidFlag::__WALL)) {
                Ok(WaitStatus::Stopped(_, Signal::SIGTRAP)) => break,
                Ok(WaitStatus::PtraceEvent(_, _, ev)) => {
                    if ev == Event::PTRACE_EVENT_CLONE as i32 {
                        let child = ptrace::getevent(pid(tid))
                            .map_err(|e| SnapshotError::process(tid, "PTRACE_GETEVENTMSG", e))?;
                        cloned = Some(child as u32);
                    }
                    ptrace::cont(pid(tid), None)
                        .map_err(|e| SnapshotError::process(tid, "PTRACE_CONT", e))?;
                }
                Ok(WaitStatus::Stopped(_, sig)) => {
                    if matches!(sig, Signal::SIGSEGV | Signal::SIGBUS | Signal::SIGILL) {
                        let _ = ptrace::setregs(pid(tid), saved);
                        return Err(SnapshotError::process(
                            tid,
                            format!("injected syscall {nr} faulted ({sig})"),
                            Errno::EFAULT,
                        ));
                    }
                    self.frozen.defer(tid, sig);
                    ptrace::cont(pid(tid), None)
                        .map_err(|e| SnapshotError::process(tid, "PTRACE_CONT", e))?;
                }
                Ok(WaitStatus::Exited(..)) | Ok(WaitStatus::Signaled(..)) => {
                    return Err(SnapshotError::process(
                        tid,
                        format!("died during injected syscall {nr}"),
                        Errno::ESRCH,
                    ))
                }
                Ok(_) | Err(Errno::EINTR) => continue,
                Err(e) => return Err(SnapshotError::process(tid, "waitpid", e)),
            }
        }
        // rax alone, rather than the whole register set.
        const RAX: usize = 10 * 8;
        let ret = ptrace::read_user(pid(tid), RAX as ptrace::AddressType)
            .map_err(|e| SnapshotError::process(tid, "PTRACE_PEEKUSER rax", e))?
            as i64;
        if self.template.is_none() {
            ptrace::setregs(pid(tid), saved)
                .map_err(|e| SnapshotError::process(tid, "PTRACE_SETREGS", e))?;
        }
        Ok(Injected { ret, cloned })
    }

    /// Like [`Injector::call`], turning a negative result into an error
    /// that names the syscall.
    pub fn ok(&self, tid: u32, what: &str, nr: i64, args: &[u64]) -> Result<u64, SnapshotError> {
        let r = self.call(tid, nr, args)?.ret;
        if (-4095..0).contains(&r) {
            return Err(SnapshotError::process(
                tid,
                what.to_string(),
                Errno::from_raw(-r as i32),
            ));
        }
        Ok(r as u64)
    }
}

/// Maps `len` bytes of scratch memory (read, write, execute) in the frozen
/// process, at `at` or wherever the kernel likes, starting with
/// `syscall; int3` so it can carry every later injected call. The first
/// call needs code the process already has: `text`, an executable page of
/// its own, lends its first bytes for the one mmap.
pub fn map_scratch(
    frozen: &Frozen,
    mem: &Memory,
    text: u64,
    at: Option<u64>,
    len: u64,
) -> Result<u64, SnapshotError> {
    let prot = (libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC) as u64;
    let mut flags = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64;
    if at.is_some() {
        flags |= libc::MAP_FIXED_NOREPLACE as u64;
    }
    let args = [at.unwrap_or(0), len, prot, flags, u64::MAX, 0];
    let scratch = mem.with_code_at(text, |code| {
        frozen
            .injector(code)
            .ok(frozen.pid, "mmap of scratch memory", libc::SYS_mmap, &args)
    })?;
    mem.write(scratch, &SYSCALL_INT3)?;
    Ok(scratch)
}

/// Removes the scratch mapping again, with the call made from `text`: code
/// cannot unmap the page it runs from and then trap in it.
pub fn unmap_scratch(
    frozen: &Frozen,
    mem: &Memory,
    text: u64,
    scratch: u64,
    len: u64,
) -> Result<(), SnapshotError> {
    mem.with_code_at(text, |code| {
        frozen.injector(code).ok(
            frozen.pid,
            "munmap of scratch memory",
            libc::SYS_munmap,
            &[scratch, len],
        )
    })?;
    Ok(())
}

/// The process's memory through /proc/PID/mem, which reads and writes
/// regardless of page protection.
pub struct Memory {
    pid: u32,
    file: File,
}

impl Memory {
    pub fn open(pid_: u32) -> Result<Memory, SnapshotError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(format!("/proc/{pid_}/mem"))
            .map_err(|e| SnapshotError::process(pid_, "opening /proc/PID/mem", e))?;
        Ok(Memory { pid: pid_, file })
    }

    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), SnapshotError> {
        self.file.read_exact_at(buf, addr).map_err(|e| {
            SnapshotError::process(self.pid, format!("reading memory at {addr:#x}"), e)
        })
    }

    pub fn write(&self, addr: u64, data: &[u8]) -> Result<(), SnapshotError> {
        self.file.write_all_at(data, addr).map_err(|e| {
            SnapshotError::process(self.pid, format!("writing memory at {addr:#x}"), e)
        })
    }

    pub fn read_u64(&self, addr: u64) -> Result<u64, SnapshotError> {
        let mut b = [0u8; 8];
        self.read(addr, &mut b)?;
        Ok(u64::from_ne_bytes(b))
    }

    /// Runs `f` with `syscall; int3` written at `addr` (an executable page
    /// of the process), then puts the original bytes back. Used to get the
    /// first syscall into a process before any page of our own exists in it.
    pub fn with_code_at<T>(
        &self,
        addr: u64,
        f: impl FnOnce(u64) -> Result<T, SnapshotError>,
    ) -> Result<T, SnapshotError> {
        let mut original = [0u8; 8];
        self.read(addr, &mut original)?;
        self.write(addr, &SYSCALL_INT3)?;
        let result = f(addr);
        let restored = self.write(addr, &original);
        let value = result?;
        restored?;
        Ok(value)
    }
}
