//! Freezing a process with ptrace, and running syscalls inside it.
//!
//! Every thread is seized and interrupted (PTRACE_SEIZE + PTRACE_INTERRUPT),
//! so nothing runs while its state is read. An [`Injector`] makes a stopped
//! thread execute one syscall at a time from a `syscall; int3` sequence and
//! puts its registers back afterwards; this is how a dump asks a process
//! what only it can answer (signal handlers, tid address) and how a restore
//! rebuilds a process from the inside.
//!
//! Wait statuses are decoded here rather than by nix, whose `waitpid`
//! fails with EINVAL on a stop by a real-time signal: such a stop is a
//! signal like any other, owed to the thread and delivered on release.

use std::collections::BTreeSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Mutex;

use appshot_sys::abi::{self, Plain};
use appshot_sys::ptrace as xptrace;
use nix::errno::Errno;
use nix::sys::ptrace::{self, Event, Options};
use nix::unistd::Pid;

use crate::error::SnapshotError;

/// `syscall; int3`, padded.
pub const SYSCALL_INT3: [u8; 8] = [0x0f, 0x05, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc];

/// Bytes of code per call of [`Injector::call_all`]: seven `movabs` of the
/// syscall number and arguments, `syscall`, and a `movabs` storing `rax`.
const CALL_CODE_LEN: usize = 7 * 10 + 2 + 10;

/// Where a dump or restore puts the code of [`Injector::call_all`] in its
/// scratch memory: past the first page (`syscall; int3`) and the data its
/// calls pass (signal actions and limits take 2.3 KiB).
pub const BATCH_AT: u64 = 16 * 4096;

/// Calls run in one stop by [`Injector::call_all`]; more are run in turns.
const BATCH_CALLS: usize = 512;

/// Scratch bytes from [`BATCH_AT`] that [`Injector::call_all`] uses at
/// most: the code of [`BATCH_CALLS`] calls, the closing `int3` and their
/// results (46 KiB; a dump's scratch memory is 256 KiB).
pub const BATCH_LEN: u64 = (BATCH_CALLS * (CALL_CODE_LEN + 8) + 1) as u64;

/// x86-64 code making each call in turn and storing its `rax` at
/// `results` + 8 × its index, then trapping.
fn batch_code(calls: &[(i64, [u64; 6])], results: u64) -> Vec<u8> {
    // REX prefix and opcode of `movabs reg, imm64` for rax, rdi, rsi, rdx,
    // r10, r8, r9: the syscall number and arguments.
    const MOVABS: [[u8; 2]; 7] = [
        [0x48, 0xb8],
        [0x48, 0xbf],
        [0x48, 0xbe],
        [0x48, 0xba],
        [0x49, 0xba],
        [0x49, 0xb8],
        [0x49, 0xb9],
    ];
    let mut code = Vec::with_capacity(calls.len() * CALL_CODE_LEN + 1);
    for (i, (nr, args)) in calls.iter().enumerate() {
        let values = std::iter::once(*nr as u64).chain(args.iter().copied());
        for (op, value) in MOVABS.iter().zip(values) {
            code.extend_from_slice(op);
            code.extend_from_slice(&value.to_le_bytes());
        }
        code.extend_from_slice(&[0x0f, 0x05]);
        // movabs [results + 8 i], rax
        code.extend_from_slice(&[0x48, 0xa3]);
        code.extend_from_slice(&(results + 8 * i as u64).to_le_bytes());
    }
    code.push(0xcc);
    code
}

fn pid(tid: u32) -> Pid {
    Pid::from_raw(tid as i32)
}

/// A decoded wait status of a traced thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Status {
    /// Signal-delivery-stop (including the SIGTRAP of an `int3`).
    Signal(i32),
    /// A ptrace event stop (`PTRACE_EVENT_*`: clone, interrupt/group stop),
    /// with the stop signal.
    Event { event: i32, sig: i32 },
    /// Exited or killed.
    Gone,
    /// Anything else (continued).
    Other,
}

pub(crate) fn decode(status: i32) -> Status {
    if libc::WIFEXITED(status) || libc::WIFSIGNALED(status) {
        Status::Gone
    } else if libc::WIFSTOPPED(status) {
        let sig = libc::WSTOPSIG(status);
        match (status >> 16) & 0xff {
            0 => Status::Signal(sig),
            event => Status::Event { event, sig },
        }
    } else {
        Status::Other
    }
}

/// Waits for the next state change of `tid`, retrying on EINTR.
fn wait(tid: u32) -> std::io::Result<Status> {
    loop {
        match xptrace::wait_raw(tid) {
            Ok(s) => return Ok(decode(s)),
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// A signal that stopped a thread while it was frozen: suppressed then,
/// delivered again on release.
#[derive(Clone, Copy, Debug)]
struct Deferred {
    tid: u32,
    sig: i32,
    info: Option<[u8; 128]>,
}

/// A process whose threads are all stopped under our ptrace. Dropping it
/// detaches every thread, so any error path leaves the process running as
/// it was.
pub struct Frozen {
    pub pid: u32,
    pub tids: Vec<u32>,
    /// Signals that arrived while frozen, in order; delivered again on
    /// release.
    deferred: Mutex<Vec<Deferred>>,
    /// Threads auto-attached by an injected clone, before they are adopted:
    /// [`Frozen::kill`] must see them die too.
    attached: Mutex<Vec<u32>>,
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
            attached: Mutex::new(Vec::new()),
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
                match ptrace::seize(pid(tid), options) {
                    Ok(()) => {}
                    // A thread that ended since the list was read (a
                    // pool's worker, say) has nothing left to save.
                    Err(nix::errno::Errno::ESRCH)
                        if !std::path::Path::new(&format!("/proc/{pid_}/task/{tid}")).exists() =>
                    {
                        continue;
                    }
                    Err(e) => return Err(SnapshotError::process(tid, "PTRACE_SEIZE", e)),
                }
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
        self.attached
            .lock()
            .expect("attached threads")
            .retain(|&t| t != tid);
        self.wait_stopped(tid)
    }

    /// Takes over a process an injected fork auto-attached
    /// (PTRACE_O_TRACEFORK) as a frozen process of its own, once it stops.
    pub fn adopt_process(&self, pid_: u32) -> Result<Frozen, SnapshotError> {
        self.attached
            .lock()
            .expect("attached threads")
            .retain(|&t| t != pid_);
        let child = Frozen {
            pid: pid_,
            tids: vec![pid_],
            deferred: Mutex::new(Vec::new()),
            attached: Mutex::new(Vec::new()),
            released: false,
        };
        child.wait_stopped(pid_)?;
        Ok(child)
    }

    fn wait_stopped(&self, tid: u32) -> Result<(), SnapshotError> {
        loop {
            match wait(tid) {
                Ok(Status::Event { .. }) => return Ok(()),
                Ok(Status::Signal(sig)) => {
                    // A signal arrived first; the thread is stopped now, and
                    // the signal is owed to it.
                    self.defer(tid, sig);
                    return Ok(());
                }
                Ok(Status::Gone) => {
                    return Err(SnapshotError::process(
                        tid,
                        "thread exited while freezing",
                        Errno::ESRCH,
                    ))
                }
                Ok(Status::Other) => continue,
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

    /// Records signal `sig` that `tid` is in a signal-delivery-stop for,
    /// with its siginfo, to deliver it again on release.
    fn defer(&self, tid: u32, sig: i32) {
        let info = xptrace::get_siginfo(tid).ok();
        self.deferred
            .lock()
            .expect("deferred signals")
            .push(Deferred { tid, sig, info });
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
        let attached = std::mem::take(&mut *self.attached.lock().expect("attached threads"));
        let mut order: Vec<u32> = self
            .tids
            .iter()
            .chain(&attached)
            .copied()
            .filter(|&t| t != leader)
            .collect();
        order.dedup();
        order.push(leader);
        for tid in order {
            loop {
                match wait(tid) {
                    Ok(Status::Gone) => break,
                    Ok(_) => continue,
                    // ECHILD: already reaped, or never ours.
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
        for &tid in &self.tids {
            let _ = ptrace::detach(pid(tid), None);
        }
        // Delivered only once every thread runs again: a signal sent to a
        // thread still traced would stop it once more.
        let deferred = std::mem::take(&mut *self.deferred.lock().expect("deferred signals"));
        for d in deferred {
            redeliver(self.pid, d);
        }
    }

    /// Ends a single-threaded process with an injected `exit(0)` run from
    /// `code` (a `syscall; int3` in it), starting from registers
    /// `template`, and waits, as its tracer, until it is gone.
    pub fn exit(
        mut self,
        code: u64,
        template: libc::user_regs_struct,
    ) -> Result<(), SnapshotError> {
        let tid = self.pid;
        let mut regs = template;
        regs.rax = libc::SYS_exit as u64;
        regs.rdi = 0;
        regs.rip = code;
        regs.orig_rax = u64::MAX;
        ptrace::setregs(pid(tid), regs)
            .map_err(|e| SnapshotError::process(tid, "PTRACE_SETREGS", e))?;
        ptrace::cont(pid(tid), None).map_err(|e| SnapshotError::process(tid, "PTRACE_CONT", e))?;
        self.released = true;
        loop {
            match wait(tid) {
                Ok(Status::Gone) => return Ok(()),
                Ok(Status::Other) => continue,
                Ok(_) => {
                    ptrace::cont(pid(tid), None)
                        .map_err(|e| SnapshotError::process(tid, "PTRACE_CONT", e))?;
                }
                Err(e) => return Err(SnapshotError::process(tid, "waiting for its exit", e)),
            }
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
    /// user-mode register set of the process) and nothing is put back on
    /// success, which saves two of the six ptrace requests of a call.
    pub fn rebuilding_injector(&self, code: u64, template: libc::user_regs_struct) -> Injector<'_> {
        Injector {
            frozen: self,
            code,
            template: Some(template),
        }
    }
}

/// Sends a deferred signal again: with its original siginfo where the
/// kernel allows that (codes a process may queue, such as a timer's or
/// sigqueue's), else as a plain tgkill.
fn redeliver(tgid: u32, d: Deferred) {
    if let Some(info) = &d.info {
        if xptrace::tgsigqueueinfo(tgid, d.tid, d.sig, info).is_ok() {
            return;
        }
    }
    let _ = xptrace::tgkill(tgid, d.tid, d.sig);
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

/// Puts a thread's registers back when dropped, unless disarmed: whatever
/// way an injected call fails, the thread never resumes at the injection
/// site.
struct PutBack {
    tid: u32,
    saved: libc::user_regs_struct,
    armed: bool,
}

impl Drop for PutBack {
    fn drop(&mut self) {
        if self.armed {
            let _ = ptrace::setregs(pid(self.tid), self.saved);
        }
    }
}

impl Injector<'_> {
    /// Executes syscall `nr` in thread `tid` and returns its raw result
    /// (negative errno on failure). The thread's registers are put back,
    /// unless this injector is rebuilding the process; on error they are
    /// put back in every case.
    pub fn call(&self, tid: u32, nr: i64, args: &[u64]) -> Result<Injected, SnapshotError> {
        let saved = self.registers(tid)?;
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
        let mut guard = PutBack {
            tid,
            saved,
            armed: true,
        };
        let cloned = self.run_to_trap(tid, regs, &mut guard, &format!("injected syscall {nr}"))?;
        // rax alone, rather than the whole register set.
        const RAX: usize = 10 * 8;
        let ret = ptrace::read_user(pid(tid), RAX as ptrace::AddressType)
            .map_err(|e| SnapshotError::process(tid, "PTRACE_PEEKUSER rax", e))?
            as i64;
        self.put_back(tid, saved, guard)?;
        Ok(Injected { ret, cloned })
    }

    /// Executes `calls` one after another in thread `tid` in one stop:
    /// their code is written at `code` (in writable, executable scratch
    /// memory of [`BATCH_LEN`] bytes) and each raw result (negative
    /// errno on failure) is stored there too, read back with one read. A
    /// failing call does not stop the ones after it. Each injected call
    /// costs four to six ptrace requests and two context switches, which a
    /// dump's or restore's ~80 signal-action and limit calls paid each.
    /// The calls must not clone.
    pub fn call_all(
        &self,
        mem: &Memory,
        tid: u32,
        code: u64,
        calls: &[(i64, [u64; 6])],
    ) -> Result<Vec<i64>, SnapshotError> {
        let mut answers = Vec::with_capacity(calls.len());
        for part in calls.chunks(BATCH_CALLS) {
            answers.extend(self.run_batch(mem, tid, code, part)?);
        }
        Ok(answers)
    }

    fn run_batch(
        &self,
        mem: &Memory,
        tid: u32,
        code: u64,
        calls: &[(i64, [u64; 6])],
    ) -> Result<Vec<i64>, SnapshotError> {
        let results = code + (calls.len() * CALL_CODE_LEN + 1) as u64;
        mem.write(code, &batch_code(calls, results))?;
        let saved = self.registers(tid)?;
        let mut regs = saved;
        regs.rip = code;
        let mut guard = PutBack {
            tid,
            saved,
            armed: true,
        };
        let what = format!("{} injected syscalls", calls.len());
        if self.run_to_trap(tid, regs, &mut guard, &what)?.is_some() {
            return Err(SnapshotError::process(
                tid,
                format!("{what} cloned a thread"),
                Errno::EINVAL,
            ));
        }
        self.put_back(tid, saved, guard)?;
        let mut raw = vec![0u8; calls.len() * 8];
        mem.read(results, &mut raw)?;
        Ok(raw
            .chunks_exact(8)
            .map(|c| i64::from_ne_bytes(c.try_into().expect("8 bytes")))
            .collect())
    }

    /// [`Injector::call_all`] for calls that must all succeed: the first
    /// that failed is the error, named `what`.
    pub fn ok_all(
        &self,
        mem: &Memory,
        tid: u32,
        code: u64,
        what: &str,
        calls: &[(i64, [u64; 6])],
    ) -> Result<(), SnapshotError> {
        match self
            .call_all(mem, tid, code, calls)?
            .into_iter()
            .find(|&r| r < 0)
        {
            Some(r) => Err(SnapshotError::process(
                tid,
                what.to_string(),
                Errno::from_raw(-r as i32),
            )),
            None => Ok(()),
        }
    }

    /// The registers a call starts from.
    fn registers(&self, tid: u32) -> Result<libc::user_regs_struct, SnapshotError> {
        match self.template {
            Some(t) => Ok(t),
            None => ptrace::getregs(pid(tid))
                .map_err(|e| SnapshotError::process(tid, "PTRACE_GETREGS", e)),
        }
    }

    /// The thread's registers back as they were, unless this injector is
    /// rebuilding the process.
    fn put_back(
        &self,
        tid: u32,
        saved: libc::user_regs_struct,
        mut guard: PutBack,
    ) -> Result<(), SnapshotError> {
        guard.armed = false;
        if self.template.is_none() {
            ptrace::setregs(pid(tid), saved)
                .map_err(|e| SnapshotError::process(tid, "PTRACE_SETREGS", e))?;
        }
        Ok(())
    }

    /// Runs thread `tid` from `regs` until it traps at an `int3`; returns
    /// the thread it cloned meanwhile, if any.
    fn run_to_trap(
        &self,
        tid: u32,
        mut regs: libc::user_regs_struct,
        guard: &mut PutBack,
        what: &str,
    ) -> Result<Option<u32>, SnapshotError> {
        // Not in a syscall: the kernel must not apply restart logic.
        regs.orig_rax = u64::MAX;
        ptrace::setregs(pid(tid), regs)
            .map_err(|e| SnapshotError::process(tid, "PTRACE_SETREGS", e))?;
        ptrace::cont(pid(tid), None).map_err(|e| SnapshotError::process(tid, "PTRACE_CONT", e))?;
        let mut cloned = None;
        loop {
            match wait(tid) {
                Ok(Status::Signal(libc::SIGTRAP)) => return Ok(cloned),
                Ok(Status::Event { event, .. }) => {
                    if event == Event::PTRACE_EVENT_CLONE as i32
                        || event == Event::PTRACE_EVENT_FORK as i32
                    {
                        let child = ptrace::getevent(pid(tid))
                            .map_err(|e| SnapshotError::process(tid, "PTRACE_GETEVENTMSG", e))?
                            as u32;
                        self.frozen
                            .attached
                            .lock()
                            .expect("attached threads")
                            .push(child);
                        cloned = Some(child);
                    }
                    ptrace::cont(pid(tid), None)
                        .map_err(|e| SnapshotError::process(tid, "PTRACE_CONT", e))?;
                }
                Ok(Status::Signal(sig)) => {
                    if matches!(sig, libc::SIGSEGV | libc::SIGBUS | libc::SIGILL) {
                        return Err(SnapshotError::process(
                            tid,
                            format!("{what} faulted (signal {sig})"),
                            Errno::EFAULT,
                        ));
                    }
                    // Any other signal, real-time ones included, is owed
                    // to the thread: suppressed now, delivered on release.
                    self.frozen.defer(tid, sig);
                    ptrace::cont(pid(tid), None)
                        .map_err(|e| SnapshotError::process(tid, "PTRACE_CONT", e))?;
                }
                Ok(Status::Gone) => {
                    guard.armed = false;
                    return Err(SnapshotError::process(
                        tid,
                        format!("died during {what}"),
                        Errno::ESRCH,
                    ));
                }
                Ok(Status::Other) => continue,
                Err(e) => return Err(SnapshotError::process(tid, "waitpid", e)),
            }
        }
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

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), SnapshotError> {
        self.file.read_exact_at(buf, addr).map_err(|e| {
            SnapshotError::process(self.pid, format!("reading memory at {addr:#x}"), e)
        })
    }

    /// Reads a run of pages that only this process maps. `process_vm_readv`
    /// copies straight from the process's pages into `buf`; a read of
    /// /proc/PID/mem goes through a kernel bounce page (two copies: 4–6 GB/s
    /// against 7–9 here). It pins the pages it reads, and the kernel copies
    /// a shared anonymous page it pins: pages shared copy-on-write must be
    /// read with [`Memory::read`]. What `process_vm_readv` cannot read (a
    /// page the process may not read itself) is read through /proc/PID/mem,
    /// which ignores protection.
    pub fn read_pages(&self, addr: u64, buf: &mut [u8]) -> Result<(), SnapshotError> {
        let mut done = 0;
        while done < buf.len() {
            let at = addr + done as u64;
            let rest = &mut buf[done..];
            let remote = [nix::sys::uio::RemoteIoVec {
                base: at as usize,
                len: rest.len(),
            }];
            let n = nix::sys::uio::process_vm_readv(
                nix::unistd::Pid::from_raw(self.pid as i32),
                &mut [std::io::IoSliceMut::new(rest)],
                &remote,
            )
            .unwrap_or(0);
            if n == 0 {
                return self.read(at, rest);
            }
            done += n;
        }
        Ok(())
    }

    pub fn write(&self, addr: u64, data: &[u8]) -> Result<(), SnapshotError> {
        self.file.write_all_at(data, addr).map_err(|e| {
            SnapshotError::process(self.pid, format!("writing memory at {addr:#x}"), e)
        })
    }

    /// Writes the bytes of a kernel struct at `addr`.
    pub fn write_value<T: Plain>(&self, addr: u64, v: &T) -> Result<(), SnapshotError> {
        self.write(addr, abi::bytes_of(v))
    }

    /// Reads a kernel struct from `addr`.
    pub fn read_value<T: Plain>(&self, addr: u64) -> Result<T, SnapshotError> {
        let mut b = vec![0u8; std::mem::size_of::<T>()];
        self.read(addr, &mut b)?;
        Ok(abi::from_bytes(&b).expect("a buffer of the struct's size"))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn stopped(sig: i32, event: i32) -> i32 {
        (event << 16) | (sig << 8) | 0x7f
    }

    #[test]
    fn wait_statuses_decode_real_time_signals_and_events() {
        let rtmin = libc::SIGRTMIN();
        assert_eq!(decode(stopped(rtmin, 0)), Status::Signal(rtmin));
        assert_eq!(decode(stopped(64, 0)), Status::Signal(64));
        assert_eq!(
            decode(stopped(libc::SIGTRAP, 0)),
            Status::Signal(libc::SIGTRAP)
        );
        assert_eq!(
            decode(stopped(libc::SIGTRAP, libc::PTRACE_EVENT_CLONE)),
            Status::Event {
                event: libc::PTRACE_EVENT_CLONE,
                sig: libc::SIGTRAP
            }
        );
        assert_eq!(
            decode(stopped(libc::SIGSTOP, libc::PTRACE_EVENT_STOP)),
            Status::Event {
                event: libc::PTRACE_EVENT_STOP,
                sig: libc::SIGSTOP
            }
        );
        assert_eq!(decode(3 << 8), Status::Gone, "exit(3)");
        assert_eq!(decode(libc::SIGKILL), Status::Gone, "killed");
        assert_eq!(decode(0xffff), Status::Other, "continued");
    }

    #[test]
    fn batched_calls_load_every_register_call_and_store_rax_in_turn() {
        let calls = [(39, [1, 2, 3, 4, 5, 6]), (60, [0; 6])];
        let code = batch_code(&calls, 0x1000);
        assert_eq!(code.len(), 2 * CALL_CODE_LEN + 1);
        assert!(BATCH_CALLS * CALL_CODE_LEN + 1 + 8 * BATCH_CALLS <= BATCH_LEN as usize);
        let first = &code[..CALL_CODE_LEN];
        // movabs rax, 39; movabs rdi, 1; ... movabs r9, 6
        let regs: [&[u8]; 7] = [
            &[0x48, 0xb8],
            &[0x48, 0xbf],
            &[0x48, 0xbe],
            &[0x48, 0xba],
            &[0x49, 0xba],
            &[0x49, 0xb8],
            &[0x49, 0xb9],
        ];
        for (i, (op, value)) in regs.iter().zip([39u64, 1, 2, 3, 4, 5, 6]).enumerate() {
            let at = &first[i * 10..i * 10 + 10];
            assert_eq!(&at[..2], *op, "register {i}");
            assert_eq!(at[2..], value.to_le_bytes(), "value {i}");
        }
        assert_eq!(first[70..72], [0x0f, 0x05], "syscall");
        assert_eq!(first[72..74], [0x48, 0xa3], "movabs [moffs64], rax");
        assert_eq!(first[74..82], 0x1000u64.to_le_bytes());
        let second = &code[CALL_CODE_LEN..2 * CALL_CODE_LEN];
        assert_eq!(second[2..10], 60u64.to_le_bytes());
        assert_eq!(
            second[74..82],
            0x1008u64.to_le_bytes(),
            "the next result slot"
        );
        assert_eq!(code.last(), Some(&0xcc), "int3 at the end");
    }
}
