//! Lazy restore (`appshot restore --lazy`): the process runs before its
//! memory is in. Its writable private anonymous mappings are made empty and
//! registered with a userfaultfd in missing mode (created inside the
//! process, taken out with `pidfd_getfd`, closed there); a page server
//! thread of the supervisor answers each fault with the saved pages around
//! it (`UFFDIO_COPY`), or zeros for a page the image does not hold, and
//! meanwhile reads every pages section of the image from start to end,
//! copying in whatever is still missing.
//!
//! That sequential pass is also where the pages are verified: a lazy
//! restore skips the whole-image checksum an eager one makes before
//! anything starts (reading 1 GiB first is exactly the wait it avoids),
//! and checks each section's CRC once the pass has read it. A mismatch, or
//! a section that cannot be read (truncated, I/O error), kills the
//! instance with the reason logged at error level: a fault is never left
//! unanswered, and an instance never goes on with memory it did not have.
//!
//! The process's own changes to its address space come as events, read by
//! the same thread before it fills anything more (a fill that races one
//! fails with EAGAIN and is retried after): a range given back with
//! `MADV_DONTNEED` or unmapped is no longer pending, so it reads zero as it
//! should instead of being refilled from the image; an `mremap`ed range's
//! pending pages move with it; a fork hands over the child's userfaultfd,
//! served with what its parent still had pending. Once everything is in,
//! the userfaultfds are closed and the process runs with no trace of it.
//!
//! Only images of one process are restored lazily (`check`): the pages a
//! child shares copy-on-write with its parent are rebuilt by forking a
//! filled parent, which a lazy parent is not.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use appshot_sys::{pidfd, uffd};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use serde::{Deserialize, Serialize};
use tracing::{debug, error, info};

use crate::error::{RestoreError, SnapshotError};
use crate::image::{Image, PAGE};

/// Pages around a fault filled with it: neighbours are likely next, and one
/// copy of 64 KiB costs little more than one of 4 KiB.
const FAULT_WINDOW: u64 = 16 * PAGE;
/// Bytes of a pages section read (and copied in) at once by the background
/// pass: small enough that a fault waits little behind one.
const CHUNK: u64 = 1 << 20;
/// The userfaultfd features a lazy restore needs: the process's own
/// address-space changes must be known to keep what is pending exact.
const FEATURES: u64 = uffd::FEATURE_EVENT_FORK
    | uffd::FEATURE_EVENT_REMAP
    | uffd::FEATURE_EVENT_REMOVE
    | uffd::FEATURE_EVENT_UNMAP;

/// How a lazy restore prefetches.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LazySettings {
    /// At most this many bytes a second read and copied in the background
    /// (`restore --prefetch-rate`); faults are always served at once.
    pub prefetch_bytes_per_sec: Option<u64>,
}

/// Refuses an image a lazy restore cannot serve, before anything starts.
pub fn check(image: &Image) -> Result<(), SnapshotError> {
    let n = image.manifest.processes.len();
    if n > 1 {
        return Err(RestoreError::Lazy(format!(
            "the image holds {n} processes; only an image of one process is restored lazily (restore it without --lazy)"
        ))
        .into());
    }
    Ok(())
}

/// Saved pages of a mapping, still to be filled: `len` bytes at `addr`,
/// from `offset` of the pages section of image `layer` of the chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Piece {
    pub addr: u64,
    pub len: u64,
    pub layer: u32,
    pub offset: u64,
}

impl Piece {
    fn end(&self) -> u64 {
        self.addr + self.len
    }

    /// The part of it at addresses `start..end` (within it).
    fn sub(&self, start: u64, end: u64) -> Piece {
        Piece {
            addr: start,
            len: end - start,
            layer: self.layer,
            offset: self.offset + (start - self.addr),
        }
    }
}

/// The pieces of one process still pending, by address and by place in
/// the image; none overlap.
#[derive(Clone, Default, Debug)]
struct Pending {
    by_addr: BTreeMap<u64, Piece>,
    by_offset: BTreeMap<(u32, u64, u64), ()>,
    bytes: u64,
}

impl Pending {
    fn insert(&mut self, p: Piece) {
        if p.len == 0 {
            return;
        }
        self.by_addr.insert(p.addr, p);
        self.by_offset.insert((p.layer, p.offset, p.addr), ());
        self.bytes += p.len;
    }

    fn remove(&mut self, addr: u64) -> Piece {
        let p = self.by_addr.remove(&addr).expect("a pending piece");
        self.by_offset.remove(&(p.layer, p.offset, p.addr));
        self.bytes -= p.len;
        p
    }

    fn is_empty(&self) -> bool {
        self.by_addr.is_empty()
    }

    /// Takes out whatever is pending at `start..end`, in address order.
    fn cut(&mut self, start: u64, end: u64) -> Vec<Piece> {
        let hit: Vec<u64> = self
            .by_addr
            .range(..end)
            .rev()
            .take_while(|(_, p)| p.end() > start)
            .map(|(&a, _)| a)
            .collect();
        let mut out = Vec::with_capacity(hit.len());
        for addr in hit.into_iter().rev() {
            let p = self.remove(addr);
            if p.addr < start {
                self.insert(p.sub(p.addr, start));
            }
            if p.end() > end {
                self.insert(p.sub(end, p.end()));
            }
            out.push(p.sub(p.addr.max(start), p.end().min(end)));
        }
        out
    }

    /// Takes out whatever is pending from `from..to` of image `layer`'s
    /// pages section.
    fn cut_offsets(&mut self, layer: u32, from: u64, to: u64) -> Vec<Piece> {
        let hit: Vec<Piece> = self
            .by_offset
            .range((layer, 0, 0)..(layer, to, 0))
            .map(|(&(_, _, addr), _)| self.by_addr[&addr])
            .filter(|p| p.offset + p.len > from)
            .collect();
        let mut out = Vec::new();
        for p in hit {
            let start = p.addr + from.saturating_sub(p.offset);
            let end = p.addr + (to.min(p.offset + p.len) - p.offset);
            out.extend(self.cut(start, end));
        }
        out
    }

    /// Takes out up to `max` bytes of the lowest pending piece.
    fn first(&mut self, max: u64) -> Option<Piece> {
        let p = *self.by_addr.values().next()?;
        self.cut(p.addr, p.addr + p.len.min(max)).pop()
    }

    /// What was pending at `from..from+len` is now at `to`.
    fn moved(&mut self, from: u64, to: u64, len: u64) {
        for p in self.cut(from, from + len) {
            self.insert(Piece {
                addr: p.addr - from + to,
                ..p
            });
        }
    }
}

/// What the supervisor sees of a lazy restore while its page server runs.
#[derive(Clone, Debug, Default)]
pub struct LazyStatus(Arc<StatusInner>);

#[derive(Debug, Default)]
struct StatusInner {
    pending: AtomicU64,
    state: AtomicU8,
}

const RUNNING: u8 = 0;
const COMPLETE: u8 = 1;
const FAILED: u8 = 2;

impl LazyStatus {
    /// Saved bytes not yet in the process's memory.
    pub fn pending_bytes(&self) -> u64 {
        self.0.pending.load(Ordering::SeqCst)
    }

    /// Whether the page server is still at work (pages pending, or the
    /// pages sections not all verified yet).
    pub fn in_progress(&self) -> bool {
        self.0.state.load(Ordering::SeqCst) == RUNNING
    }
}

/// One process served.
struct Served {
    pid: u32,
    /// `None` for a child forked during the lazy phase: we learn its
    /// userfaultfd, not its PID; it dies with the instance.
    pidfd: Option<OwnedFd>,
    uffd: OwnedFd,
    pending: Pending,
    /// Faults whose fill met a changing address space: answered once its
    /// events are read.
    retry: Vec<u64>,
    gone: bool,
}

/// An image's pages section as the server reads it.
struct Layer {
    path: PathBuf,
    file: File,
    pages_off: u64,
    pages_len: u64,
    crc: u32,
}

impl Layer {
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
        self.file
            .read_exact_at(buf, self.pages_off + offset)
            .map_err(|e| {
                format!(
                    "reading {} bytes of saved pages at offset {offset} of {}: {e}",
                    buf.len(),
                    self.path.display()
                )
            })
    }
}

/// The page server of one lazy restore: a thread, which the processes are
/// handed to as their memory is registered. Dropping this handle says no
/// more processes come; the thread goes on until all is in or the
/// processes are gone.
pub(crate) struct PageServer {
    add: Sender<Served>,
    /// Written once a process is sent; its end of file, when this handle
    /// goes, tells the thread that no more come.
    wake: UnixStream,
    status: LazyStatus,
}

impl PageServer {
    /// Starts the thread (before the restoring thread pins itself to one
    /// CPU: the server must not share it).
    pub(crate) fn start(
        image: &Image,
        settings: LazySettings,
    ) -> Result<PageServer, SnapshotError> {
        let mut layers = Vec::new();
        for i in 0..=image.ancestors.len() {
            let l = image.layer(i as u32);
            layers.push(Layer {
                path: l.path.clone(),
                file: l
                    .file
                    .try_clone()
                    .map_err(|e| SnapshotError::io(&l.path, e))?,
                pages_off: l.pages_off,
                pages_len: l.pages_len,
                crc: l.pages_crc,
            });
        }
        let (wake, woken) = UnixStream::pair()
            .and_then(|(a, b)| a.set_nonblocking(true).map(|_| (a, b)))
            .and_then(|(a, b)| b.set_nonblocking(true).map(|_| (a, b)))
            .map_err(|e| SnapshotError::io(&image.path, e))?;
        let (add, added) = channel();
        let status = LazyStatus::default();
        let server = Server {
            layers,
            rate: settings.prefetch_bytes_per_sec.filter(|&r| r > 0),
            status: status.clone(),
            procs: Vec::new(),
            layer: 0,
            at: 0,
            crc: crc32fast::Hasher::new(),
            faults: 0,
            prefetched: 0,
            read: 0,
            started: Instant::now(),
        };
        std::thread::Builder::new()
            .name("lazy-pages".into())
            .spawn(move || server.run(added, woken))
            .map_err(|e| SnapshotError::io(&image.path, e))?;
        Ok(PageServer { add, wake, status })
    }

    /// Creates the userfaultfd of process `pid` (stopped, being rebuilt:
    /// still root, so the userfaultfd handles faults the kernel takes on
    /// its behalf too) through `make` (the injected `userfaultfd()`, whose
    /// fd in the process it returns), registers `ranges` on it and hands
    /// it and the process's pending `pieces` to the server, which serves
    /// them from now on: the rest of the restore may touch them.
    pub(crate) fn add(
        &self,
        pid: u32,
        uffd_fd: i32,
        ranges: &[(u64, u64)],
        pieces: Vec<Piece>,
    ) -> Result<(), SnapshotError> {
        let pfd =
            pidfd::open_process(pid).map_err(|e| SnapshotError::process(pid, "pidfd_open", e))?;
        let fd = pidfd::get_fd(&pfd, uffd_fd)
            .map_err(|e| SnapshotError::process(pid, "taking its userfaultfd", e))?;
        uffd::api(fd.as_fd(), FEATURES).map_err(|e| {
            SnapshotError::process(
                pid,
                "UFFDIO_API with the fork, remap, remove and unmap events a lazy restore needs",
                e,
            )
        })?;
        for &(start, end) in ranges {
            uffd::register_missing(fd.as_fd(), start, end - start).map_err(|e| {
                SnapshotError::process(
                    pid,
                    format!("registering {start:#x}-{end:#x} for missing pages"),
                    e,
                )
            })?;
        }
        let mut pending = Pending::default();
        for p in pieces {
            pending.insert(p);
        }
        info!(
            pid,
            pending_bytes = pending.bytes,
            mappings = ranges.len(),
            "lazy restore: memory served on fault and prefetched in the background"
        );
        let served = Served {
            pid,
            pidfd: Some(pfd),
            uffd: fd,
            pending,
            retry: Vec::new(),
            gone: false,
        };
        self.add
            .send(served)
            .map_err(|_| RestoreError::Lazy("the page server thread is gone".into()))?;
        let _ = (&self.wake).write(&[1]);
        Ok(())
    }

    pub(crate) fn status(&self) -> LazyStatus {
        self.status.clone()
    }
}

struct Server {
    layers: Vec<Layer>,
    rate: Option<u64>,
    status: LazyStatus,
    procs: Vec<Served>,
    /// The background pass: in section `layer`, at offset `at`, with the
    /// CRC of what it read of that section so far.
    layer: usize,
    at: u64,
    crc: crc32fast::Hasher,
    faults: u64,
    prefetched: u64,
    read: u64,
    started: Instant,
}

/// How a fill ended.
enum Fill {
    Done,
    /// The address space is changing: the bytes from this offset on are
    /// still to fill, after the events.
    Again(u64),
    /// The process is gone (ESRCH).
    Gone,
    /// Any other error: the fault would never be answered.
    Failed(i32),
}

impl Server {
    fn run(mut self, added: Receiver<Served>, mut woken: UnixStream) {
        // A panic must not leave faults waiting: it fails the restore like
        // any other error, killing the processes.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.serve(&added, &mut woken)
        }))
        .unwrap_or_else(|_| Err("the page server panicked".into()));
        self.finish(outcome);
    }

    /// Serves until every page is in (`Ok(true)`), the processes are gone
    /// (`Ok(false)`), or something fails.
    fn serve(&mut self, added: &Receiver<Served>, woken: &mut UnixStream) -> Result<bool, String> {
        let mut sealed = false;
        let mut buf = vec![0u8; CHUNK as usize];
        loop {
            let work =
                self.layer < self.layers.len() || self.procs.iter().any(|p| !p.pending.is_empty());
            if sealed && self.procs.is_empty() {
                return Ok(false);
            }
            if sealed && !work {
                return Ok(true);
            }
            let timeout = if self.procs.iter().any(|p| !p.retry.is_empty()) {
                PollTimeout::ZERO
            } else if !work || !sealed || self.procs.is_empty() {
                PollTimeout::NONE
            } else {
                match self.rate {
                    Some(rate) => {
                        let due = Duration::from_secs_f64(self.read as f64 / rate as f64);
                        let left = due.saturating_sub(self.started.elapsed());
                        PollTimeout::try_from(left.as_millis().min(i32::MAX as u128) as i32)
                            .unwrap_or(PollTimeout::ZERO)
                    }
                    None => PollTimeout::ZERO,
                }
            };
            let mut fds = Vec::with_capacity(1 + 2 * self.procs.len());
            if !sealed {
                fds.push(PollFd::new(woken.as_fd(), PollFlags::POLLIN));
            }
            for p in &self.procs {
                fds.push(PollFd::new(p.uffd.as_fd(), PollFlags::POLLIN));
                if let Some(pfd) = &p.pidfd {
                    fds.push(PollFd::new(pfd.as_fd(), PollFlags::POLLIN));
                }
            }
            match poll(&mut fds, timeout) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(format!("poll: {e}")),
            }
            let ready: Vec<bool> = fds
                .iter()
                .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
                .collect();
            drop(fds);
            let mut at = 0;
            if !sealed {
                if ready[0] {
                    let mut b = [0u8; 64];
                    loop {
                        match woken.read(&mut b) {
                            // The handle went: every process it sent is in
                            // the channel, and no more come.
                            Ok(0) => {
                                sealed = true;
                                break;
                            }
                            Ok(_) => {}
                            Err(_) => break,
                        }
                    }
                    self.procs.extend(added.try_iter());
                }
                at = 1;
            }
            let mut exited = Vec::new();
            let mut events_of = Vec::new();
            for (i, p) in self.procs.iter().enumerate() {
                if ready.get(at).copied().unwrap_or(false) {
                    events_of.push(i);
                }
                at += 1;
                if p.pidfd.is_some() {
                    if ready.get(at).copied().unwrap_or(false) {
                        exited.push(i);
                    }
                    at += 1;
                }
            }
            self.handle_events(&events_of, &mut buf)?;
            for i in exited {
                self.procs[i].gone = true;
            }
            self.retry(&mut buf)?;
            // The background pass waits for the release: until then it
            // would take CPU time from the restore itself.
            if sealed
                && work
                && self.procs.iter().all(|p| p.retry.is_empty())
                && self.prefetch_due()
            {
                self.prefetch(&mut buf)?;
            }
            self.procs.retain(|p| !p.gone);
            let pending = self.procs.iter().map(|p| p.pending.bytes).sum();
            self.status.0.pending.store(pending, Ordering::SeqCst);
        }
    }

    fn finish(&self, outcome: Result<bool, String>) {
        let ms = self.started.elapsed().as_secs_f64() * 1e3;
        match outcome {
            Ok(true) => {
                self.status.0.state.store(COMPLETE, Ordering::SeqCst);
                info!(
                    ms,
                    faults = self.faults,
                    prefetched_bytes = self.prefetched,
                    "lazy restore complete: every page in, pages verified"
                );
            }
            Ok(false) => {
                self.status.0.state.store(COMPLETE, Ordering::SeqCst);
                info!(ms, "lazy restore ended with its processes");
            }
            Err(why) => {
                self.status.0.state.store(FAILED, Ordering::SeqCst);
                for p in &self.procs {
                    if let Some(pfd) = &p.pidfd {
                        let _ = pidfd::send_signal(pfd, libc::SIGKILL);
                    }
                }
                error!(
                    pids = ?self.procs.iter().map(|p| p.pid).collect::<Vec<_>>(),
                    "lazy restore failed, instance killed: {why}"
                );
            }
        }
        // Dropping the userfaultfds unregisters every range: from now on
        // the kernel fills missing pages itself.
    }

    fn handle_events(&mut self, which: &[usize], buf: &mut [u8]) -> Result<(), String> {
        let mut events = Vec::new();
        let mut forked = Vec::new();
        for &i in which {
            events.clear();
            if let Err(e) = uffd::read_events(self.procs[i].uffd.as_fd(), &mut events) {
                return Err(format!(
                    "reading the userfaultfd of pid {}: {e}",
                    self.procs[i].pid
                ));
            }
            for ev in events.drain(..) {
                let p = &mut self.procs[i];
                match ev {
                    uffd::Event::Fault { addr } => {
                        self.faults += 1;
                        p.retry.push(addr);
                    }
                    uffd::Event::Remove { start, end } | uffd::Event::Unmap { start, end } => {
                        p.pending.cut(start, end);
                    }
                    uffd::Event::Remap { from, to, len } => p.pending.moved(from, to, len),
                    uffd::Event::Fork { uffd } => {
                        debug!(pid = p.pid, "lazy restore: the process forked");
                        forked.push(Served {
                            pid: p.pid,
                            pidfd: None,
                            uffd,
                            pending: p.pending.clone(),
                            retry: Vec::new(),
                            gone: false,
                        });
                    }
                }
            }
        }
        self.procs.extend(forked);
        self.retry(buf)
    }

    /// Answers the faults waiting, each with the window around it.
    fn retry(&mut self, buf: &mut [u8]) -> Result<(), String> {
        for i in 0..self.procs.len() {
            let faults = std::mem::take(&mut self.procs[i].retry);
            for addr in faults {
                self.serve_fault(i, addr, buf)?;
            }
        }
        Ok(())
    }

    fn serve_fault(&mut self, i: usize, addr: u64, buf: &mut [u8]) -> Result<(), String> {
        let start = addr / FAULT_WINDOW * FAULT_WINDOW;
        let pieces = self.procs[i].pending.cut(start, start + FAULT_WINDOW);
        let mut answered = false;
        let mut again = false;
        for piece in &pieces {
            if again {
                self.procs[i].pending.insert(*piece);
                continue;
            }
            let data = &mut buf[..piece.len as usize];
            self.layers[piece.layer as usize].read(piece.offset, data)?;
            match fill(&self.procs[i].uffd, piece.addr, data) {
                Fill::Done => {}
                Fill::Again(done) => {
                    self.procs[i]
                        .pending
                        .insert(piece.sub(piece.addr + done, piece.end()));
                    again = true;
                    continue;
                }
                Fill::Gone => {
                    self.procs[i].gone = true;
                    return Ok(());
                }
                Fill::Failed(e) => return Err(copy_failed(self.procs[i].pid, piece.addr, e)),
            }
            answered |= piece.addr <= addr && addr < piece.end();
        }
        if again && !answered {
            self.procs[i].retry.push(addr);
            return Ok(());
        }
        if answered || pieces.iter().any(|p| p.addr <= addr && addr < p.end()) {
            return Ok(());
        }
        // Not saved, given back, or filled already (a stale message).
        let u = self.procs[i].uffd.as_fd();
        match uffd::zeropage(u, addr, PAGE) {
            Ok(_) | Err((_, libc::ENOENT)) => {}
            Err((_, libc::EEXIST)) => {
                let _ = uffd::wake(u, addr, PAGE);
            }
            Err((_, libc::EAGAIN)) => self.procs[i].retry.push(addr),
            Err((_, libc::ESRCH)) => self.procs[i].gone = true,
            Err((_, e)) => {
                return Err(format!(
                    "zero page at {addr:#x} of pid {}: {}",
                    self.procs[i].pid,
                    std::io::Error::from_raw_os_error(e)
                ))
            }
        }
        Ok(())
    }

    fn prefetch_due(&self) -> bool {
        match self.rate {
            Some(rate) => self.started.elapsed().as_secs_f64() >= self.read as f64 / rate as f64,
            None => true,
        }
    }

    /// One chunk of the background pass: the next part of the current
    /// pages section read, checksummed and copied in wherever still
    /// pending; after the last section, whatever a changing address space
    /// left pending.
    fn prefetch(&mut self, buf: &mut [u8]) -> Result<(), String> {
        if self.layer < self.layers.len() {
            let (layer, from) = (self.layer as u32, self.at);
            let n = CHUNK.min(self.layers[self.layer].pages_len - from);
            self.layers[self.layer].read(from, &mut buf[..n as usize])?;
            self.crc.update(&buf[..n as usize]);
            self.read += n;
            for i in 0..self.procs.len() {
                let pieces = self.procs[i].pending.cut_offsets(layer, from, from + n);
                self.copy_pieces(i, pieces, |p| {
                    let at = (p.offset - from) as usize;
                    Some(&buf[at..at + p.len as usize])
                })?;
            }
            self.at += n;
            let l = &self.layers[self.layer];
            if self.at == l.pages_len {
                let crc = std::mem::take(&mut self.crc).finalize();
                if crc != l.crc {
                    return Err(format!(
                        "image {} is corrupt: pages checksum mismatch",
                        l.path.display()
                    ));
                }
                debug!(image = %l.path.display(), "lazy restore: pages verified");
                self.layer += 1;
                self.at = 0;
            }
            return Ok(());
        }
        for i in 0..self.procs.len() {
            if let Some(p) = self.procs[i].pending.first(CHUNK) {
                let data = &mut buf[..p.len as usize];
                self.layers[p.layer as usize].read(p.offset, data)?;
                self.read += p.len;
                self.copy_pieces(i, vec![p], |_| Some(&*data))?;
                return Ok(());
            }
        }
        Ok(())
    }

    /// Copies `pieces` into process `i`, each from the bytes `data` gives;
    /// what a changing address space stopped goes back to pending.
    fn copy_pieces<'b>(
        &mut self,
        i: usize,
        pieces: Vec<Piece>,
        data: impl Fn(&Piece) -> Option<&'b [u8]>,
    ) -> Result<(), String> {
        let mut again = false;
        for p in pieces {
            let Some(bytes) = data(&p) else { continue };
            if again {
                self.procs[i].pending.insert(p);
                continue;
            }
            match fill(&self.procs[i].uffd, p.addr, bytes) {
                Fill::Done => self.prefetched += p.len,
                Fill::Again(done) => {
                    self.prefetched += done;
                    self.procs[i].pending.insert(p.sub(p.addr + done, p.end()));
                    again = true;
                }
                Fill::Gone => {
                    self.procs[i].gone = true;
                    return Ok(());
                }
                Fill::Failed(e) => return Err(copy_failed(self.procs[i].pid, p.addr, e)),
            }
        }
        Ok(())
    }
}

fn copy_failed(pid: u32, addr: u64, errno: i32) -> String {
    format!(
        "UFFDIO_COPY at {addr:#x} of pid {pid}: {}",
        std::io::Error::from_raw_os_error(errno)
    )
}

/// Copies `data` to the missing pages at `addr`: a page already there (the
/// process got it through a fault) is skipped, a range no longer mapped
/// given up.
fn fill(u: &OwnedFd, addr: u64, data: &[u8]) -> Fill {
    let mut at = 0u64;
    while at < data.len() as u64 {
        match uffd::copy(u.as_fd(), addr + at, &data[at as usize..]) {
            Ok(_) => return Fill::Done,
            Err((done, libc::EEXIST)) => {
                let _ = uffd::wake(u.as_fd(), addr + at + done, PAGE);
                at += done + PAGE;
            }
            Err((done, libc::EAGAIN)) => return Fill::Again(at + done),
            Err((done, libc::ENOENT)) => {
                // Unmapped since: its event is on the way; the pages after
                // it may still be mapped.
                at += done + PAGE;
            }
            Err((_, libc::ESRCH)) => return Fill::Gone,
            Err((_, e)) => return Fill::Failed(e),
        }
    }
    Fill::Done
}

#[cfg(test)]
mod tests {
    use super::*;

    fn piece(addr: u64, pages: u64, offset: u64) -> Piece {
        Piece {
            addr: addr * PAGE,
            len: pages * PAGE,
            layer: 0,
            offset: offset * PAGE,
        }
    }

    fn pages(ps: &[Piece]) -> Vec<(u64, u64, u64)> {
        ps.iter()
            .map(|p| (p.addr / PAGE, p.len / PAGE, p.offset / PAGE))
            .collect()
    }

    fn left(p: &Pending) -> Vec<(u64, u64, u64)> {
        pages(&p.by_addr.values().copied().collect::<Vec<_>>())
    }

    #[test]
    fn pending_pieces_are_cut_by_address_and_by_offset_and_moved() {
        let mut p = Pending::default();
        p.insert(piece(100, 10, 0));
        p.insert(piece(200, 4, 10));
        assert_eq!(p.bytes, 14 * PAGE);
        assert_eq!(
            pages(&p.cut(105 * PAGE, 202 * PAGE)),
            vec![(105, 5, 5), (200, 2, 10)]
        );
        assert_eq!(left(&p), vec![(100, 5, 0), (202, 2, 12)]);
        assert_eq!(p.bytes, 7 * PAGE);
        // Offsets 3..13: the end of the first piece and the start of the second.
        assert_eq!(
            pages(&p.cut_offsets(0, 3 * PAGE, 13 * PAGE)),
            vec![(103, 2, 3), (202, 1, 12)]
        );
        assert_eq!(left(&p), vec![(100, 3, 0), (203, 1, 13)]);
        p.moved(99 * PAGE, 500 * PAGE, 3 * PAGE);
        assert_eq!(left(&p), vec![(102, 1, 2), (203, 1, 13), (501, 2, 0)]);
        assert_eq!(pages(&[p.first(PAGE).unwrap()]), vec![(102, 1, 2)]);
        assert_eq!(p.bytes, 3 * PAGE);
        assert!(p.cut_offsets(1, 0, 100 * PAGE).is_empty(), "another layer");
    }
}
