//! Pre-copy: the memory of a live snapshot is copied while the instance
//! runs, and only the pages written meanwhile are copied again once it is
//! frozen.
//!
//! Writes are tracked without soft-dirty (this kernel has none): a
//! userfaultfd is created inside each process (an injected
//! `userfaultfd()`), taken out with `pidfd_getfd` and closed in the
//! process again at once, so the process never holds it. Its writable
//! private mappings are registered for asynchronous write-protect
//! (WP_ASYNC: a write to a protected page is resolved by the kernel in the
//! writing thread, nobody answers a fault), and each pass is one
//! `PAGEMAP_SCAN` per mapping that lists the pages written since the last
//! pass and protects them again in the same walk.
//!
//! A tracking may outlive its snapshot: the supervisor keeps it on the
//! running instance (`snapshot --track`), and an incremental snapshot
//! takes it over ([`Tracking::base_on`]): the pages written since the
//! last snapshot are exactly those its next scan reports.
//!
//! The userfaultfd lives only in the dumper. Dropping a [`Tracking`]
//! unregisters every range (their pages lose their protection); if the
//! dumper dies instead, the kernel closes its fd, and releasing the last
//! reference to a userfaultfd unregisters every range it had, the same
//! way. Either way the process never waits on it: with WP_ASYNC no fault
//! is ever queued for a reader.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::{AsFd, OwnedFd};

use appshot_sys::abi;
use appshot_sys::pidfd;
use appshot_sys::uffd::{self, PageRegion};
use nix::sys::ptrace::Options;
use tracing::debug;

use crate::error::SnapshotError;
use crate::image::model::VmaKind;
use crate::image::{Image, ImageWriter, PAGE};
use crate::kinds::memory::{
    classify, VmFlags, CHUNK_PAGES, PAGEMAP_ENTRIES, PM_FILE_PAGE, PM_PRESENT, PM_SWAPPED,
};
use crate::proc::parse;
use crate::ptrace::{Frozen, Memory};

/// Regions one scan call can return.
const REGIONS: usize = 4096;
/// Pages one scan call covers: no more than twice [`REGIONS`], so that even
/// every other page written fits, and no call ever stops early. (A scan
/// stopped by a full buffer and resumed from its `walk_end` was measured
/// to lose written pages here: protected, never reported.)
const SCAN_PAGES: u64 = 2 * REGIONS as u64;
/// Passes after the first, at most: each copies what the one before let
/// be written.
const MAX_PASSES: usize = 8;
/// A pass that copied no more than this is the last one while running:
/// copying it again while frozen costs well under a millisecond.
const SETTLED_BYTES: u64 = 1 << 20;

/// One registered, writable private mapping.
struct Range {
    start: u64,
    end: u64,
    /// Pages still identical to their file are not saved (the restore maps
    /// them from it), so they are not copied either.
    file_backed: bool,
}

/// The write tracking of one process.
struct Tracked {
    pid: u32,
    /// When the process started (`/proc/PID/stat`), which tells it from a
    /// later process given its PID once it ended.
    started: u64,
    uffd: OwnedFd,
    mem: Memory,
    /// Ranges whose every write is tracked. A piece of one whose mapping
    /// was replaced (its scan fails with EPERM) is dropped, with what was
    /// copied of it.
    ranges: Vec<Range>,
    /// Where the latest copy of every page copied and not written since
    /// it was protected is.
    copied: Copies,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        for r in &self.ranges {
            // An error means the mapping is gone: nothing left to undo.
            let _ = uffd::unregister(self.uffd.as_fd(), r.start, r.end - r.start);
        }
    }
}

/// Pages of live processes copied into an image, with their writes tracked
/// since.
pub struct Tracking {
    procs: Vec<Tracked>,
    /// Bytes copied while the processes ran.
    pub copied_bytes: u64,
}

/// What a pass does between pieces of work.
pub struct Hooks<'a> {
    /// Called with (bytes done, bytes total) while pages are copied.
    pub progress: &'a dyn Fn(u64, u64),
    /// `true` abandons the pre-copy.
    pub cancelled: &'a dyn Fn() -> bool,
}

/// Copies the memory of `pids` (the instance's processes, running) into
/// `writer`: every page once, then the pages written meanwhile, pass after
/// pass until a pass copies little or no less than the one before (the
/// process writes as fast as it is copied). The processes are stopped
/// only for the few injected calls that create their userfaultfd.
pub fn precopy(
    pids: &[u32],
    writer: &mut ImageWriter,
    hooks: &Hooks,
) -> Result<Tracking, SnapshotError> {
    let mut tracking = Tracking {
        procs: Vec::with_capacity(pids.len()),
        copied_bytes: 0,
    };
    for &pid in pids {
        if let Some(t) = track_unless_gone(pid)? {
            tracking.procs.push(t);
        }
    }
    let first = tracking.pass(writer, hooks, true)?;
    tracking.converge(writer, hooks, first)?;
    Ok(tracking)
}

/// When process `pid` started, if it runs (a zombie has no memory left).
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(") ")?;
    if rest.starts_with(['Z', 'X']) {
        return None;
    }
    // `rest` starts at field 3 (state); the start time is field 22.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// [`track`], or `None` for a process that ended before it could be
/// tracked (a short-lived child).
fn track_unless_gone(pid: u32) -> Result<Option<Tracked>, SnapshotError> {
    match track(pid) {
        Ok(t) => Ok(Some(t)),
        Err(_) if start_time(pid).is_none() => {
            debug!(pid, "ended before it was tracked");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Creates the write tracking of process `pid`: its userfaultfd, and every
/// writable private mapping registered and write-protected.
fn track(pid: u32) -> Result<Tracked, SnapshotError> {
    let started = start_time(pid).ok_or_else(|| {
        SnapshotError::process(pid, "reading its start time", std::io::ErrorKind::NotFound)
    })?;
    let uffd = take_userfaultfd(pid)?;
    uffd::api(
        uffd.as_fd(),
        uffd::FEATURE_WP_ASYNC | uffd::FEATURE_WP_UNPOPULATED,
    )
    .map_err(|e| SnapshotError::process(pid, "UFFDIO_API with WP_ASYNC", e))?;
    let text = std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .map_err(|e| SnapshotError::process(pid, "reading maps", e))?;
    let maps = parse::maps(&text).ok_or_else(|| {
        SnapshotError::process(pid, "parsing maps", std::io::ErrorKind::InvalidData)
    })?;
    let vm_flags = VmFlags::read(pid)?;
    let mut ranges = Vec::new();
    for m in maps.iter().filter(|m| m.write && !m.shared) {
        let file_backed = match classify(m, pid, &vm_flags)? {
            Some(VmaKind::Anon | VmaKind::Stack) => false,
            Some(VmaKind::File { .. } | VmaKind::Memfd { .. }) => true,
            _ => continue,
        };
        // Refused for a mapping another userfaultfd has (the
        // application's own) or one the kernel cannot track: its pages
        // are simply all copied once frozen.
        let len = m.end - m.start;
        if let Err(e) = uffd::register_wp(uffd.as_fd(), m.start, len) {
            debug!(pid, start = m.start, error = %e, "not tracked");
            continue;
        }
        // Before the first pass lists the pages: a write after this is
        // seen by the next scan whenever it happens.
        if let Err(e) = uffd::writeprotect(uffd.as_fd(), m.start, len) {
            debug!(pid, start = m.start, error = %e, "not tracked");
            let _ = uffd::unregister(uffd.as_fd(), m.start, len);
            continue;
        }
        ranges.push(Range {
            start: m.start,
            end: m.end,
            file_backed,
        });
    }
    Ok(Tracked {
        pid,
        started,
        uffd,
        mem: Memory::open(pid)?,
        ranges,
        copied: Copies::default(),
    })
}

/// Creates a userfaultfd inside `pid` (stopped only for the calls) and
/// takes it out: the process's own fd is closed again before it runs on.
fn take_userfaultfd(pid: u32) -> Result<OwnedFd, SnapshotError> {
    let frozen = Frozen::seize(pid, Options::empty())?;
    let mem = Memory::open(pid)?;
    let text = std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .map_err(|e| SnapshotError::process(pid, "reading maps", e))?;
    let maps = parse::maps(&text).ok_or_else(|| {
        SnapshotError::process(pid, "parsing maps", std::io::ErrorKind::InvalidData)
    })?;
    let code = crate::dump::code_page(pid, &maps, None)?;
    let taken = mem.with_code_at(code, |code| {
        let inj = frozen.injector(code);
        // User-mode faults only: all a process may ask for when
        // vm.unprivileged_userfaultfd is 0 and it is not root, and all
        // WP_ASYNC needs (it never hands a fault to a reader).
        let flags = (libc::O_CLOEXEC | libc::O_NONBLOCK) as u64 | uffd::USER_MODE_ONLY;
        let fd = inj.ok(pid, "userfaultfd", libc::SYS_userfaultfd, &[flags])? as i32;
        let ours = pidfd::open_process(pid).and_then(|p| pidfd::get_fd(&p, fd));
        inj.ok(
            pid,
            "close of its userfaultfd",
            libc::SYS_close,
            &[fd as u64],
        )?;
        ours.map_err(|e| SnapshotError::fd_call(pid, fd, "pidfd_getfd", e))
    });
    frozen.release();
    taken
}

impl Tracking {
    /// Tracks the processes of `pids` that are not yet (forked since the
    /// tracking began): from now on, so that the next incremental snapshot
    /// saves only what they write. What they hold now is not copied.
    pub fn track_new(&mut self, pids: &[u32]) -> Result<(), SnapshotError> {
        for &pid in pids {
            if !self.procs.iter().any(|t| t.pid == pid) {
                if let Some(t) = track_unless_gone(pid)? {
                    self.procs.push(t);
                }
            }
        }
        Ok(())
    }

    /// Copies the pages written since the last pass into `writer`, pass
    /// after pass (the last one copied `last` bytes), until a pass copies
    /// little or no less than the one before (the processes write as fast
    /// as they are copied).
    pub fn converge(
        &mut self,
        writer: &mut ImageWriter,
        hooks: &Hooks,
        mut last: u64,
    ) -> Result<(), SnapshotError> {
        for _ in 0..MAX_PASSES {
            if last <= SETTLED_BYTES {
                break;
            }
            let now = self.pass(writer, hooks, false)?;
            let shrinking = now < last / 2;
            last = now;
            if !shrinking {
                break;
            }
        }
        Ok(())
    }

    /// For an incremental snapshot on `parent`, the image whose freeze
    /// this tracking was last settled at: its pages become the copies of
    /// every page still tracked, so that the child refers to them (one
    /// layer further up than the parent does) unless they are written
    /// before it is frozen. Pages of the parent outside what is tracked
    /// now are saved again.
    pub fn base_on(&mut self, parent: &Image) {
        self.copied_bytes = 0;
        // A process that ended since has nothing left to track (its
        // ranges went with its address space).
        self.procs
            .retain(|t| std::path::Path::new(&format!("/proc/{}", t.pid)).exists());
        for t in &mut self.procs {
            t.copied = Copies::default();
            let ns_pid = crate::kinds::threads::ns_tid(t.pid);
            let Some(p) = parent
                .manifest
                .processes
                .iter()
                .find(|p| p.ns_pid == ns_pid)
            else {
                continue;
            };
            for run in p.vmas.iter().filter(|v| !v.shared).flat_map(|v| &v.pages) {
                let end = run.addr + run.pages * PAGE;
                for r in &t.ranges {
                    let (s, e) = (run.addr.max(r.start), end.min(r.end));
                    if s < e {
                        t.copied.insert(
                            s,
                            (e - s) / PAGE,
                            run.layer + 1,
                            run.offset + (s - run.addr),
                        );
                    }
                }
            }
        }
    }

    /// Copies the pages written since the last pass (the first pass: every
    /// page that holds data) into `writer`; returns the bytes copied.
    fn pass(
        &mut self,
        writer: &mut ImageWriter,
        hooks: &Hooks,
        first: bool,
    ) -> Result<u64, SnapshotError> {
        // A process that ended since has nothing left to copy.
        self.procs.retain(Tracked::runs);
        let mut work = Vec::with_capacity(self.procs.len());
        let mut ended = Vec::new();
        for t in &mut self.procs {
            match if first { t.with_data() } else { t.written() } {
                Ok(runs) => work.push(runs),
                Err(_) if !t.runs() => {
                    ended.push(t.pid);
                    work.push(Vec::new());
                }
                Err(e) => return Err(e),
            }
        }
        let total: u64 = work.iter().flatten().map(|r| r.1 * PAGE).sum();
        let mut done = 0;
        let mut buf = vec![0u8; (CHUNK_PAGES * PAGE) as usize];
        for (t, runs) in self.procs.iter_mut().zip(work) {
            for (addr, n) in runs {
                if (hooks.cancelled)() {
                    return Err(SnapshotError::Cancelled { pid: t.pid });
                }
                let len = (n * PAGE) as usize;
                // The mapping may go away under a running process: its
                // pages are then simply not copied now.
                if t.mem.read(addr, &mut buf[..len]).is_err() {
                    t.copied.forget(addr, addr + n * PAGE);
                    continue;
                }
                let offset = writer.write_pages(&buf[..len])?;
                t.copied.insert(addr, n, 0, offset);
                done += len as u64;
                if first {
                    (hooks.progress)(done, total);
                }
            }
        }
        self.procs.retain(|t| !ended.contains(&t.pid));
        self.copied_bytes += done;
        debug!(bytes = done, first, "pre-copy pass");
        Ok(done)
    }

    /// Once the processes are frozen: the copies still good of each
    /// process, by pid. Nothing of a piece whose scan fails is reused.
    pub(crate) fn settle(&mut self) -> HashMap<u32, Copies> {
        // Copies of a process that ended are nobody's: a process given its
        // PID since must not get them.
        self.procs.retain(Tracked::runs);
        let mut good = HashMap::new();
        for t in &mut self.procs {
            // Every page written since its copy is copied again: its copy
            // is forgotten. An unreadable scan forgets everything.
            match t.written() {
                Ok(runs) => {
                    for (addr, n) in runs {
                        t.copied.forget(addr, addr + n * PAGE);
                    }
                }
                Err(e) => {
                    debug!(pid = t.pid, error = %e, "no pre-copied page reused");
                    t.copied = Copies::default();
                }
            }
            good.insert(t.pid, std::mem::take(&mut t.copied));
        }
        good
    }
}

impl Tracked {
    /// Whether the tracked process still runs: its PID names a process
    /// that started when it did.
    fn runs(&self) -> bool {
        start_time(self.pid) == Some(self.started)
    }

    /// The runs of pages that hold data, as a dump saves them (present or
    /// swapped, and not still the file's).
    fn with_data(&self) -> Result<Vec<(u64, u64)>, SnapshotError> {
        let pid = self.pid;
        let pagemap = std::fs::File::open(format!("/proc/{pid}/pagemap"))
            .map_err(|e| SnapshotError::process(pid, "opening pagemap", e))?;
        let mut runs = Vec::new();
        for r in &self.ranges {
            // In bounded pieces: a mapping may be a huge reservation.
            let mut at = r.start;
            while at < r.end {
                let end = r.end.min(at + PAGEMAP_ENTRIES * PAGE);
                pages_with_data(&pagemap, pid, &mut runs, at, end, r.file_backed)?;
                at = end;
            }
        }
        Ok(runs)
    }

    /// The runs of pages written since the last scan, protected again;
    /// pieces of ranges that can no longer be scanned are dropped with
    /// their copies. Pagemap is opened afresh: it then speaks of the
    /// process's current address space, and one the process got from an
    /// exec has none of our registrations (EPERM).
    fn written(&mut self) -> Result<Vec<(u64, u64)>, SnapshotError> {
        let pid = self.pid;
        let pagemap = std::fs::File::open(format!("/proc/{pid}/pagemap"))
            .map_err(|e| SnapshotError::process(pid, "opening pagemap", e))?;
        let mut out = vec![PageRegion::default(); REGIONS];
        let mut runs = Vec::new();
        let mut kept = Vec::with_capacity(self.ranges.len());
        for r in std::mem::take(&mut self.ranges) {
            // The start of the part of `r` still tracked, up to `at`.
            let mut from = r.start;
            let mut at = r.start;
            while at < r.end {
                let to = r.end.min(at + SCAN_PAGES * PAGE);
                let mut piece = Vec::new();
                let scanned = match uffd::scan_written(pagemap.as_fd(), at, to, &mut out) {
                    Ok(n) if n < out.len() => out[..n].iter().try_for_each(|g| {
                        if r.file_backed {
                            pages_with_data(&pagemap, pid, &mut piece, g.start, g.end, true)
                        } else {
                            push_run(&mut piece, g.start, g.end);
                            Ok(())
                        }
                    }),
                    // Cannot happen (see SCAN_PAGES); if it did, what was
                    // not reported is unknown.
                    Ok(_) => Err(SnapshotError::process(
                        pid,
                        "PAGEMAP_SCAN",
                        std::io::Error::other("buffer full"),
                    )),
                    Err(e) => Err(SnapshotError::process(pid, "PAGEMAP_SCAN", e)),
                };
                match scanned {
                    Ok(()) => runs.extend(piece),
                    Err(e) => {
                        // A mapping of the piece was replaced (EPERM: not
                        // registered) or cannot be read: the piece is no
                        // longer tracked, nothing copied of it is reused,
                        // and the rest of the range is tracked on.
                        debug!(pid, start = at, error = %e, "piece no longer tracked");
                        self.copied.forget(at, to);
                        let _ = uffd::unregister(self.uffd.as_fd(), at, to - at);
                        if at > from {
                            kept.push(Range {
                                start: from,
                                end: at,
                                file_backed: r.file_backed,
                            });
                        }
                        from = to;
                    }
                }
                at = to;
            }
            if from < r.end {
                kept.push(Range {
                    start: from,
                    end: r.end,
                    file_backed: r.file_backed,
                });
            }
        }
        self.ranges = kept;
        Ok(runs)
    }
}

/// Of pages `start..end`, those present or swapped and, of a file mapping
/// (`file_backed`), no longer the file's (copied on write), as runs.
fn pages_with_data(
    pagemap: &std::fs::File,
    pid: u32,
    runs: &mut Vec<(u64, u64)>,
    start: u64,
    end: u64,
    file_backed: bool,
) -> Result<(), SnapshotError> {
    let mut entries = vec![0u64; ((end - start) / PAGE) as usize];
    let bytes = abi::bytes_of_slice_mut(&mut entries);
    std::os::unix::fs::FileExt::read_exact_at(pagemap, bytes, start / PAGE * 8)
        .map_err(|e| SnapshotError::process(pid, "reading pagemap", e))?;
    for (i, &e) in entries.iter().enumerate() {
        if e & (PM_PRESENT | PM_SWAPPED) != 0 && !(file_backed && e & PM_FILE_PAGE != 0) {
            let addr = start + i as u64 * PAGE;
            push_run(runs, addr, addr + PAGE);
        }
    }
    Ok(())
}

/// Where copies of pages are: runs of pages copied together, by first
/// page, none overlapping, each in the pages section of a layer of the
/// image's chain (0: the image being written, 1: its parent...). Runs
/// rather than pages: a GiB is 262,144 pages, looked up while the instance
/// is frozen.
#[derive(Debug, Default)]
pub(crate) struct Copies {
    /// First page's address to (pages, layer, offset of the first page's
    /// copy).
    runs: BTreeMap<u64, (u64, u32, u64)>,
}

impl Copies {
    /// Records the copy of `pages` pages from `addr` at `offset` of
    /// `layer`, replacing any earlier copy of them.
    fn insert(&mut self, addr: u64, pages: u64, layer: u32, offset: u64) {
        self.forget(addr, addr + pages * PAGE);
        self.runs.insert(addr, (pages, layer, offset));
    }

    /// Forgets the copies of the pages `start..end`.
    fn forget(&mut self, start: u64, end: u64) {
        let before = self
            .runs
            .range(..start)
            .next_back()
            .filter(|(&a, &(n, _, _))| a + n * PAGE > start)
            .map(|(&a, &v)| (a, v));
        let inside: Vec<(u64, (u64, u32, u64))> =
            self.runs.range(start..end).map(|(&a, &v)| (a, v)).collect();
        for (a, (n, layer, offset)) in before.into_iter().chain(inside) {
            self.runs.remove(&a);
            let e = a + n * PAGE;
            if a < start {
                self.runs.insert(a, ((start - a) / PAGE, layer, offset));
            }
            if e > end {
                self.runs
                    .insert(end, ((e - end) / PAGE, layer, offset + (end - a)));
            }
        }
    }

    /// Pages `addr..addr + pages * PAGE` in pieces `(addr, pages, copy)`:
    /// each either copied at consecutive offsets from `copy` (layer,
    /// offset) or not copied.
    pub(crate) fn pieces(&self, addr: u64, pages: u64) -> Vec<Piece> {
        let end = addr + pages * PAGE;
        let first = self
            .runs
            .range(..=addr)
            .next_back()
            .filter(|(&a, &(n, _, _))| a + n * PAGE > addr)
            .map(|(&a, &v)| (a, v));
        let rest = self.runs.range(addr + 1..end).map(|(&a, &v)| (a, v));
        let mut out = Vec::new();
        let mut at = addr;
        for (a, (n, layer, offset)) in first.into_iter().chain(rest) {
            let (s, e) = (a.max(at), (a + n * PAGE).min(end));
            if s > at {
                out.push((at, (s - at) / PAGE, None));
            }
            out.push((s, (e - s) / PAGE, Some((layer, offset + (s - a)))));
            at = e;
        }
        if at < end {
            out.push((at, (end - at) / PAGE, None));
        }
        out
    }
}

/// Pages `(addr, pages, copy)`, copied at (layer, offset) or not.
pub(crate) type Piece = (u64, u64, Option<(u32, u64)>);

/// Appends pages `start..end` to `runs`, in runs of at most
/// [`CHUNK_PAGES`], joining the last run where they continue it.
fn push_run(runs: &mut Vec<(u64, u64)>, start: u64, end: u64) {
    let mut at = start;
    while at < end {
        match runs.last_mut() {
            Some((s, n)) if *s + *n * PAGE == at && *n < CHUNK_PAGES => {
                let more = ((end - at) / PAGE).min(CHUNK_PAGES - *n);
                *n += more;
                at += more * PAGE;
            }
            _ => {
                let more = ((end - at) / PAGE).min(CHUNK_PAGES);
                runs.push((at, more));
                at += more * PAGE;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_are_replaced_forgotten_and_split_into_pieces() {
        let p = |a: u64| a * PAGE;
        let mut c = Copies::default();
        c.insert(p(0), 8, 1, p(100));
        c.insert(p(8), 4, 2, p(200));
        // Page 3 written: forgotten; pages 5-6 copied again into the
        // image being written.
        c.forget(p(3), p(4));
        c.insert(p(5), 2, 0, p(300));
        assert_eq!(
            c.pieces(p(1), 12),
            vec![
                (p(1), 2, Some((1, p(101)))),
                (p(3), 1, None),
                (p(4), 1, Some((1, p(104)))),
                (p(5), 2, Some((0, p(300)))),
                (p(7), 1, Some((1, p(107)))),
                (p(8), 4, Some((2, p(200)))),
                (p(12), 1, None),
            ]
        );
        c.forget(p(0), p(20));
        assert_eq!(c.pieces(p(0), 2), vec![(0, 2, None)]);
    }

    #[test]
    fn runs_join_and_split_at_the_chunk_size() {
        let mut runs = Vec::new();
        push_run(&mut runs, 0x1000, 0x3000);
        push_run(&mut runs, 0x3000, 0x4000);
        push_run(&mut runs, 0x6000, 0x7000);
        assert_eq!(runs, vec![(0x1000, 3), (0x6000, 1)]);
        let mut big = Vec::new();
        push_run(&mut big, 0, (CHUNK_PAGES + 2) * PAGE);
        assert_eq!(big, vec![(0, CHUNK_PAGES), (CHUNK_PAGES * PAGE, 2)]);
    }
}
