//! Memory, saved and restored side by side: which mappings a process has
//! and what kind each is (`classify`), the pages that hold data (present or
//! swapped, minus file pages still identical to the file and pages a child
//! still shares copy-on-write with its parent), shared anonymous objects
//! saved once; and on restore the vDSO moved to its saved place, every
//! mapping made again (or kept from the parent's fork), pages written or
//! mapped from a template, and the mm fields set.

use std::collections::{HashMap, HashSet};
use std::os::fd::AsRawFd;
use std::sync::mpsc;

use appshot_sys::abi::{self, PrctlMmMap};
use appshot_sys::{pidfd, uffd};
use nix::errno::Errno;
use std::os::fd::AsFd;

use crate::dump::DumpRequest;
use crate::error::{RestoreError, SnapshotError};
use crate::image::model::*;
use crate::image::{Image, ImageWriter, PAGE};
use crate::kinds;
use crate::kinds::files::file_ref;
use crate::lazy::{PageServer, Piece};
use crate::precopy::Copies;
use crate::proc::parse::{self, MapsLine};
use crate::ptrace::{Injector, Memory, BATCH_AT};
use crate::restore::{highest_fd, open_in};
use tracing::debug;

/// Largest run of pages read and written at once.
pub(crate) const CHUNK_PAGES: u64 = 1024;
/// Pages read out of a process and handed to the image writer at once.
/// Three buffers of 1 MiB stay in the CPUs' caches (2 MiB of L2 each on
/// this machine kind) between the reading and the writing thread, and
/// were faulted in once; three of 4 MiB did neither, and made the dump
/// up to twice as slow.
const PIPELINE_PAGES: u64 = 256;
/// Buffers of [`PIPELINE_PAGES`] between reading a process and writing its
/// image: one being read into, one being written, one ready.
const PIPELINE_BUFFERS: usize = 3;

/// Pagemap entries read at once (512 KiB).
pub(crate) const PAGEMAP_ENTRIES: u64 = 64 * 1024;

/// Pagemap's bits of a page in memory, and of one in swap.
pub(crate) const PM_PRESENT: u64 = 1 << 63;
pub(crate) const PM_SWAPPED: u64 = 1 << 62;
/// Pagemap's bit of a page that is the file's (or shared anonymous
/// memory's), not a private copy.
pub(crate) const PM_FILE_PAGE: u64 = 1 << 61;
/// Pagemap's bit of a page mapped by this process only.
const PM_MMAP_EXCLUSIVE: u64 = 1 << 56;

/// How a run of pages is read out of the process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reading {
    /// Every page is in memory and mapped by this process only:
    /// `process_vm_readv`, one copy.
    Exclusive,
    /// Some page may be shared copy-on-write with another process, or is
    /// in swap: /proc/PID/mem. `process_vm_readv` pins the pages it reads,
    /// and the kernel unshares (copies) a shared anonymous page it pins,
    /// which would break the sharing the dump records and grow the
    /// instance's memory.
    Shared,
}

/// What saving a process's memory needs from the processes before it.
pub(crate) struct MemoryContext<'a> {
    /// The parent's PID (ours) and saved mappings, if it is in the image.
    pub(crate) parent: Option<(u32, &'a [Vma])>,
    /// Shared anonymous objects (inodes) whose pages are saved already.
    pub(crate) shmem_saved: &'a mut HashSet<u64>,
    /// Pages copied into the image before the freeze and not written
    /// since (page address to offset in the pages section): referenced,
    /// not read again.
    pub(crate) precopied: Option<&'a Copies>,
}

/// Each mapping's VmFlags (/proc/PID/smaps), by start address.
pub(crate) struct VmFlags(HashMap<u64, String>);

impl VmFlags {
    /// Read once: smaps walks every page table of the process, which takes
    /// milliseconds per GiB.
    pub(crate) fn read(pid: u32) -> Result<VmFlags, SnapshotError> {
        let path = format!("/proc/{pid}/smaps");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| SnapshotError::process(pid, format!("reading {path}"), e))?;
        let flags = parse::smaps_vm_flags(&text).ok_or_else(|| {
            SnapshotError::process(pid, "parsing smaps", std::io::ErrorKind::InvalidData)
        })?;
        Ok(VmFlags(flags.into_iter().collect()))
    }

    fn has(&self, start: u64, flag: &str) -> bool {
        self.0
            .get(&start)
            .is_some_and(|f| f.split_whitespace().any(|x| x == flag))
    }

    /// What the process set on the mapping at `start`.
    pub(crate) fn advice(&self, start: u64) -> Advice {
        let has = |flag| self.has(start, flag);
        Advice {
            huge: match (has("hg"), has("nh")) {
                (true, _) => HugePages::Wanted,
                (_, true) => HugePages::Refused,
                _ => HugePages::System,
            },
            access: match (has("sr"), has("rr")) {
                (true, _) => Access::Sequential,
                (_, true) => Access::Random,
                _ => Access::Normal,
            },
            lock: match (has("lo"), has("lf")) {
                (true, true) => Lock::OnFault,
                (true, false) => Lock::Locked,
                _ => Lock::Unlocked,
            },
            dont_fork: has("dc"),
            wipe_on_fork: has("wf"),
            dont_dump: has("dd"),
            mergeable: has("mg"),
            no_reserve: has("nr"),
        }
    }
}

/// mmap flags a mapping is made with besides its kind's.
fn mmap_flags(advice: &Advice) -> u64 {
    if advice.no_reserve {
        libc::MAP_NORESERVE as u64
    } else {
        0
    }
}

/// Sets on each mapping of `vmas` what the process had set with madvise
/// and mlock. Called once every process of the tree is forked, since a
/// fork leaves out MADV_DONTFORK mappings and wipes MADV_WIPEONFORK ones,
/// and once the process has its own credentials and rlimits back, so that
/// a lock is allowed only as the application's own was.
/// Each call the kernel refuses fails the restore: a mapping is made back
/// as it was, or not at all.
pub(crate) fn advise(inj: &Injector, pid: u32, vmas: &[Vma]) -> Result<(), SnapshotError> {
    const MLOCK_ONFAULT: u64 = 1;
    for v in vmas {
        let a = &v.advice;
        if matches!(v.kind, VmaKind::Vdso(_)) || *a == Advice::default() {
            continue;
        }
        let len = v.end - v.start;
        let huge = match a.huge {
            HugePages::System => None,
            HugePages::Wanted => Some(("MADV_HUGEPAGE", libc::MADV_HUGEPAGE)),
            HugePages::Refused => Some(("MADV_NOHUGEPAGE", libc::MADV_NOHUGEPAGE)),
        };
        let access = match a.access {
            Access::Normal => None,
            Access::Sequential => Some(("MADV_SEQUENTIAL", libc::MADV_SEQUENTIAL)),
            Access::Random => Some(("MADV_RANDOM", libc::MADV_RANDOM)),
        };
        let flags = [
            (a.dont_fork, "MADV_DONTFORK", libc::MADV_DONTFORK),
            (a.wipe_on_fork, "MADV_WIPEONFORK", libc::MADV_WIPEONFORK),
            (a.dont_dump, "MADV_DONTDUMP", libc::MADV_DONTDUMP),
            (a.mergeable, "MADV_MERGEABLE", libc::MADV_MERGEABLE),
        ]
        .into_iter()
        .filter_map(|(set, name, advice)| set.then_some((name, advice)));
        for (name, advice) in huge.into_iter().chain(access).chain(flags) {
            inj.ok(
                pid,
                &format!("madvise {name} on {:#x}-{:#x}", v.start, v.end),
                libc::SYS_madvise,
                &[v.start, len, advice as u64],
            )?;
        }
        let lock = match a.lock {
            Lock::Unlocked => None,
            Lock::Locked => Some(0),
            Lock::OnFault => Some(MLOCK_ONFAULT),
        };
        if let Some(flags) = lock {
            inj.ok(
                pid,
                &format!("mlock2 {:#x}-{:#x}", v.start, v.end),
                libc::SYS_mlock2,
                &[v.start, len, flags],
            )?;
        }
    }
    Ok(())
}

/// What a mapping is saved as (`None`: not saved), or why it cannot be.
/// Anonymous memory that grows down is a stack even without the `[stack]`
/// name (a piece of a split stack keeps VM_GROWSDOWN but not the name).
pub(crate) fn classify(
    m: &MapsLine,
    pid: u32,
    flags: &VmFlags,
) -> Result<Option<VmaKind>, SnapshotError> {
    let unsupported = |what: String| SnapshotError::Unsupported { pid, what };
    let anon = if flags.has(m.start, "gd") {
        VmaKind::Stack
    } else {
        VmaKind::Anon
    };
    let kind = match m.name.as_str() {
        "" | "[heap]" => anon,
        "[stack]" => VmaKind::Stack,
        n if n.starts_with("[anon:") => anon,
        "[vvar]" | "[vvar_vclock]" | "[vdso]" => VmaKind::Vdso(m.name.clone()),
        "[vsyscall]" => return Ok(None),
        "/dev/zero (deleted)" if m.shared => {
            // One object however many processes map it; a piece of it at
            // an offset (split or remapped) is not rebuilt yet.
            if m.offset != 0 {
                return Err(unsupported(format!(
                    "shared anonymous mapping {:#x}-{:#x} at offset {:#x} of its object",
                    m.start, m.end, m.offset
                )));
            }
            VmaKind::SharedAnon { inode: m.inode }
        }
        n if n.starts_with("/SYSV") && n.ends_with(" (deleted)") && m.shared => {
            // The inode of a System V segment's mapping is its id.
            VmaKind::SysvShm { id: m.inode as i32 }
        }
        n if kinds::memfd::name_of(n).is_some() => VmaKind::Memfd {
            inode: m.inode,
            offset: m.offset,
        },
        n if n.ends_with(" (deleted)") => {
            return Err(unsupported(format!(
                "mapping {:#x}-{:#x} of deleted file {n}",
                m.start, m.end
            )))
        }
        n if n.starts_with('/') => VmaKind::File {
            file: file_ref(n, pid)?,
            offset: m.offset,
        },
        n => {
            return Err(unsupported(format!(
                "mapping {:#x}-{:#x} of kind {n}",
                m.start, m.end
            )))
        }
    };
    if m.shared
        && !matches!(
            kind,
            VmaKind::File { .. }
                | VmaKind::SharedAnon { .. }
                | VmaKind::SysvShm { .. }
                | VmaKind::Memfd { .. }
        )
    {
        return Err(unsupported(format!(
            "shared anonymous mapping {:#x}-{:#x} ({})",
            m.start, m.end, m.name
        )));
    }
    Ok(Some(kind))
}

/// Saves the pages that hold data: every present or swapped page of a
/// private mapping, except pages of private file mappings still identical
/// to the file (pagemap's file-page bit), which restore maps from the file.
/// A mapping the parent has identically is inherited at restore: of its
/// pages, those still the parent's very page (same frame, copy-on-write
/// since the fork) are neither saved nor written again. A shared anonymous
/// object is saved once, with the first process that maps it.
#[allow(clippy::too_many_arguments)]
pub(crate) fn dump_memory(
    pid: u32,
    mem: &Memory,
    maps: &[MapsLine],
    flags: &VmFlags,
    ctx: MemoryContext,
    writer: &mut ImageWriter,
    req: &DumpRequest,
    check: &dyn Fn() -> Result<(), SnapshotError>,
) -> Result<Vec<Vma>, SnapshotError> {
    const PFN: u64 = (1 << 55) - 1;
    let open_pagemap = |pid: u32| {
        std::fs::File::open(format!("/proc/{pid}/pagemap"))
            .map_err(|e| SnapshotError::process(pid, "opening pagemap", e))
    };
    let pagemap = open_pagemap(pid)?;
    let parent_pagemap = ctx.parent.map(|(p, _)| open_pagemap(p)).transpose()?;
    // Entries are u64, one a page, at the page's index times eight.
    let read_entries = |file: &std::fs::File, who: u32, entries: &mut [u64], at: u64| {
        std::os::unix::fs::FileExt::read_exact_at(file, abi::bytes_of_slice_mut(entries), at * 8)
            .map_err(|e| SnapshotError::process(who, "reading pagemap", e))
    };
    let mut vmas = Vec::new();
    let mut plan = Vec::new();
    // Read in bounded pieces: a mapping may be a huge reservation.
    let mut pagemap_buf = vec![0u64; PAGEMAP_ENTRIES as usize];
    let mut parent_buf = vec![0u64; PAGEMAP_ENTRIES as usize];
    for m in maps {
        let Some(kind) = classify(m, pid, flags)? else {
            continue;
        };
        let shape = |v: &&Vma| {
            v.start == m.start
                && v.end == m.end
                && v.prot == m.prot()
                && v.shared == m.shared
                && v.kind == kind
        };
        let inherited = ctx
            .parent
            .is_some_and(|(_, theirs)| theirs.iter().any(|v| shape(&v)));
        let file_backed = matches!(kind, VmaKind::File { .. } | VmaKind::Memfd { .. });
        let mut runs: Vec<(u64, u64, Reading)> = Vec::new();
        let mut cow: Vec<(u64, u64, Reading)> = Vec::new();
        let push = |runs: &mut Vec<(u64, u64, Reading)>, addr: u64, how: Reading| match runs
            .last_mut()
        {
            Some((start, n, h)) if *start + *n * PAGE == addr && *n < CHUNK_PAGES && *h == how => {
                *n += 1
            }
            _ => runs.push((addr, 1, how)),
        };
        if let VmaKind::SharedAnon { inode } = kind {
            if !inherited && ctx.shmem_saved.insert(inode) {
                // Read from the object, not through the page tables.
                runs = shmem_extents(pid, m)?
                    .into_iter()
                    .map(|(addr, n)| (addr, n, Reading::Shared))
                    .collect();
            }
        } else if !m.shared && !matches!(kind, VmaKind::Vdso(_)) {
            let npages = (m.end - m.start) / PAGE;
            let mut first = 0;
            while first < npages {
                let count = (npages - first).min(PAGEMAP_ENTRIES);
                let n = count as usize;
                read_entries(&pagemap, pid, &mut pagemap_buf[..n], m.start / PAGE + first)?;
                if let (true, Some(file), Some((ppid, _))) =
                    (inherited, &parent_pagemap, ctx.parent)
                {
                    read_entries(file, ppid, &mut parent_buf[..n], m.start / PAGE + first)?;
                }
                for (i, &e) in pagemap_buf[..n].iter().enumerate() {
                    let has_data = e & (PM_PRESENT | PM_SWAPPED) != 0
                        && !(file_backed && e & PM_FILE_PAGE != 0);
                    if !has_data {
                        continue;
                    }
                    let addr = m.start + (first + i as u64) * PAGE;
                    if inherited {
                        let p = parent_buf[i];
                        let same_frame = e & PM_PRESENT != 0
                            && p & PM_PRESENT != 0
                            && e & PFN != 0
                            && e & PFN == p & PFN;
                        if same_frame {
                            push(&mut cow, addr, Reading::Shared);
                            continue;
                        }
                    }
                    let how =
                        if e & (PM_PRESENT | PM_MMAP_EXCLUSIVE) == PM_PRESENT | PM_MMAP_EXCLUSIVE {
                            Reading::Exclusive
                        } else {
                            Reading::Shared
                        };
                    push(&mut runs, addr, how);
                }
                first += count;
            }
        }
        plan.push((m, kind, runs, inherited, cow));
    }
    let total: u64 = plan.iter().flat_map(|p| &p.2).map(|r| r.1 * PAGE).sum();
    let mut done = 0;
    let mut reused = 0;
    // Reading the process and writing the image overlap: this thread
    // copies pages out of the process into a free buffer and checksums it
    // while a writer thread writes the one before (writing into fresh page
    // cache is the slower half). Offsets are known ahead, since the writer
    // appends in the order it is handed buffers.
    let mut next_offset = writer.pages_len();
    std::thread::scope(|scope| -> Result<(), SnapshotError> {
        let (full_tx, full_rx) =
            mpsc::sync_channel::<(Vec<u8>, crc32fast::Hasher)>(PIPELINE_BUFFERS);
        let (free_tx, free_rx) = mpsc::channel::<Vec<u8>>();
        for _ in 0..PIPELINE_BUFFERS {
            free_tx
                .send(Vec::with_capacity((PIPELINE_PAGES * PAGE) as usize))
                .expect("receiver held here");
        }
        let writing = scope.spawn(move || -> Result<(), SnapshotError> {
            for (buf, sum) in full_rx {
                writer.write_summed_pages(&buf, &sum)?;
                // The reader may have stopped taking buffers back.
                let _ = free_tx.send(buf);
            }
            Ok(())
        });
        let reading = (|| -> Result<(), SnapshotError> {
            for (m, kind, runs, inherited, cow) in plan {
                // A shared object is read from the object itself, not
                // through the process's page tables, so that its holes stay
                // holes.
                let object = match kind {
                    VmaKind::SharedAnon { .. } if !runs.is_empty() => Some(map_file(pid, m)?),
                    _ => None,
                };
                let mut pages = Vec::with_capacity(runs.len());
                let precopied = ctx.precopied.filter(|_| object.is_none());
                let pieces = runs.into_iter().flat_map(|(addr, n, how)| {
                    let pieces = match precopied {
                        Some(copies) => copies.pieces(addr, n),
                        None => vec![(addr, n, None)],
                    };
                    pieces.into_iter().map(move |p| (p, how))
                });
                for ((addr, n, copy), how) in pieces {
                    let len = (n * PAGE) as usize;
                    if let Some((layer, offset)) = copy {
                        pages.push(PageRun {
                            addr,
                            pages: n,
                            offset,
                            layer,
                        });
                        done += len as u64;
                        reused += len as u64;
                        continue;
                    }
                    // A run is handed over in pieces of the buffers' size.
                    let step = PIPELINE_PAGES * PAGE;
                    let mut at = addr;
                    while at < addr + len as u64 {
                        let piece = (addr + len as u64 - at).min(step) as usize;
                        // A closed channel means the writer stopped: its
                        // error is the one reported.
                        let Ok(mut buf) = free_rx.recv() else {
                            return Ok(());
                        };
                        buf.resize(piece, 0);
                        match &object {
                            Some(f) => {
                                std::os::unix::fs::FileExt::read_exact_at(f, &mut buf, at - m.start)
                                    .map_err(|e| {
                                        SnapshotError::process(
                                            pid,
                                            format!("reading shared memory at {at:#x}"),
                                            e,
                                        )
                                    })?
                            }
                            None if how == Reading::Exclusive => mem.read_pages(at, &mut buf)?,
                            None => mem.read(at, &mut buf)?,
                        }
                        let mut sum = crc32fast::Hasher::new();
                        sum.update(&buf);
                        if full_tx.send((buf, sum)).is_err() {
                            return Ok(());
                        }
                        at += piece as u64;
                    }
                    pages.push(PageRun {
                        addr,
                        pages: n,
                        offset: next_offset,
                        layer: 0,
                    });
                    next_offset += len as u64;
                    done += len as u64;
                    (req.progress)(done, total);
                    check()?;
                }
                vmas.push(Vma {
                    start: m.start,
                    end: m.end,
                    prot: m.prot(),
                    shared: m.shared,
                    kind,
                    pages,
                    inherited,
                    cow: cow.into_iter().map(|(addr, n, _)| (addr, n)).collect(),
                    advice: flags.advice(m.start),
                });
            }
            Ok(())
        })();
        drop(full_tx);
        let written = writing.join().expect("image writer thread");
        reading.and(written)
    })?;
    debug!(pid, bytes = total, reused, "memory saved");
    Ok(vmas)
}

/// The object behind a mapping, opened through /proc/PID/map_files.
pub(crate) fn map_file(pid: u32, m: &MapsLine) -> Result<std::fs::File, SnapshotError> {
    let path = format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end);
    std::fs::File::open(&path)
        .map_err(|e| SnapshotError::process(pid, format!("opening {path}"), e))
}

/// The runs of a shared anonymous object that hold data (SEEK_DATA and
/// SEEK_HOLE on the object), as addresses of the mapping.
pub(crate) fn shmem_extents(pid: u32, m: &MapsLine) -> Result<Vec<(u64, u64)>, SnapshotError> {
    use nix::unistd::{lseek, Whence};
    let f = map_file(pid, m)?;
    let len = (m.end - m.start) as i64;
    let mut runs = Vec::new();
    let mut at = 0i64;
    while at < len {
        let data = match lseek(f.as_raw_fd(), at, Whence::SeekData) {
            Ok(d) => d,
            Err(nix::errno::Errno::ENXIO) => break,
            Err(e) => return Err(SnapshotError::process(pid, "SEEK_DATA in shared memory", e)),
        };
        if data >= len {
            break;
        }
        let hole = lseek(f.as_raw_fd(), data, Whence::SeekHole)
            .map_err(|e| SnapshotError::process(pid, "SEEK_HOLE in shared memory", e))?
            .min(len);
        let mut start = data as u64 / PAGE * PAGE;
        let end = (hole as u64).div_ceil(PAGE) * PAGE;
        while start < end {
            let n = ((end - start) / PAGE).min(CHUNK_PAGES);
            runs.push((m.start + start, n));
            start += n * PAGE;
        }
        at = end as i64;
    }
    Ok(runs)
}

const ARCH_MAP_VDSO_64: u64 = 0x2003;

const PR_SET_MM: u64 = 35;

const PR_SET_MM_MAP: u64 = 14;

/// Moves the vDSO block to its saved address (all three special mappings
/// move together, which `arch_prctl(ARCH_MAP_VDSO_64)` does once they are
/// unmapped).
pub(crate) fn map_vdso(inj: &Injector, pid: u32, vmas: &[Vma]) -> Result<(), SnapshotError> {
    let block: Vec<&Vma> = vmas
        .iter()
        .filter(|v| matches!(v.kind, VmaKind::Vdso(_)))
        .collect();
    let Some(start) = block.iter().map(|v| v.start).min() else {
        return Ok(());
    };
    inj.ok(
        pid,
        "ARCH_MAP_VDSO_64",
        libc::SYS_arch_prctl,
        &[ARCH_MAP_VDSO_64, start],
    )?;
    let maps =
        parse::maps(&std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default())
            .unwrap_or_default();
    for v in block {
        let VmaKind::Vdso(name) = &v.kind else {
            continue;
        };
        if !maps
            .iter()
            .any(|m| &m.name == name && m.start == v.start && m.end == v.end)
        {
            return Err(RestoreError::Mapping {
                start: v.start,
                end: v.end,
                what: format!(
                    "{name} did not land there (this kernel lays the vDSO out differently)"
                ),
            }
            .into());
        }
    }
    Ok(())
}

/// Builds the process's address space: mappings it did not inherit from
/// its parent's fork are created, then saved pages written. Of an inherited
/// mapping, pages still shared copy-on-write with the parent stay, and the
/// rest that it did not have is dropped. A shared anonymous object is
/// created by the first process that maps it and mapped from that process
/// (`shmem`: inode → its ns pid and mapping) by every later one.
#[allow(clippy::too_many_arguments)]
pub(crate) fn map_memory(
    inj: &Injector,
    mem: &Memory,
    pid: u32,
    data: u64,
    image: &Image,
    p: &ProcessImage,
    shmem: &mut HashMap<u64, (u32, u64, u64)>,
    memfds: &mut kinds::memfd::Made,
    lazy: Option<&PageServer>,
) -> Result<(), SnapshotError> {
    let mut files: HashMap<&str, u64> = HashMap::new();
    // A lazy restore leaves the pages of writable private anonymous
    // mappings to its page server; the rest (stacks, read-only and shared
    // memory, file mappings) is filled here as always.
    let mut lazy_ranges = Vec::new();
    let mut lazy_pieces = Vec::new();
    // An eager restore's private anonymous pages are put in place by the
    // kernel (`UFFDIO_COPY`): no page is zeroed first and no fault is taken
    // per page, as when the process reads them in itself.
    let mut copy_ranges = Vec::new();
    let mut copy_pieces = Vec::new();
    let mut buf = Vec::new();
    // The process reads its own saved pages from the image: one copy,
    // from the page cache into its memory. An
    // incremental image's pages are in the images up its chain: each is
    // opened as a run first needs it.
    let mut layer_fds: HashMap<u32, u64> = HashMap::new();
    let mut layer_fd = |layer: u32| -> Result<u64, SnapshotError> {
        if let Some(&fd) = layer_fds.get(&layer) {
            return Ok(fd);
        }
        let path = image.layer(layer).path.to_string_lossy();
        let fd = open_in(inj, mem, pid, data, &path, libc::O_RDONLY | libc::O_CLOEXEC)?;
        layer_fds.insert(layer, fd);
        Ok(fd)
    };
    let mut maps = Mappings {
        code: data - crate::restore::DATA + BATCH_AT,
        calls: Vec::new(),
        names: Vec::new(),
    };
    for v in &p.vmas {
        let len = v.end - v.start;
        let fixed = libc::MAP_FIXED as u64;
        match &v.kind {
            VmaKind::Anon | VmaKind::Stack | VmaKind::File { .. } | VmaKind::Memfd { .. }
                if v.inherited =>
            {
                if !v.shared {
                    drop_unsaved(inj, pid, v)?;
                }
            }
            _ if v.inherited => continue,
            VmaKind::Vdso(_) | VmaKind::Vsyscall => continue,
            VmaKind::SharedAnon { inode } => match shmem.get(inode) {
                Some(&(owner, start, end)) => {
                    let path = format!("/proc/{owner}/map_files/{start:x}-{end:x}");
                    let mode = if v.prot & libc::PROT_WRITE as u32 != 0 {
                        libc::O_RDWR
                    } else {
                        libc::O_RDONLY
                    };
                    let fd = open_in(inj, mem, pid, data, &path, mode | libc::O_CLOEXEC)?;
                    inj.ok(
                        pid,
                        &format!("mmap of shared memory {path}"),
                        libc::SYS_mmap,
                        &[
                            v.start,
                            len,
                            v.prot as u64,
                            libc::MAP_SHARED as u64 | fixed,
                            fd,
                            0,
                        ],
                    )?;
                    inj.call(pid, libc::SYS_close, &[fd])?;
                }
                None => {
                    let flags = (libc::MAP_SHARED | libc::MAP_ANONYMOUS) as u64
                        | fixed
                        | mmap_flags(&v.advice);
                    inj.ok(
                        pid,
                        "mmap shared anonymous",
                        libc::SYS_mmap,
                        &[v.start, len, v.prot as u64, flags, u64::MAX, 0],
                    )?;
                    shmem.insert(*inode, (p.ns_pid, v.start, v.end));
                }
            },
            VmaKind::Anon | VmaKind::Stack => {
                let grows = if v.kind == VmaKind::Stack {
                    libc::MAP_GROWSDOWN
                } else {
                    0
                };
                let flags = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | grows) as u64
                    | fixed
                    | mmap_flags(&v.advice);
                maps.push(
                    "mmap anonymous".into(),
                    [v.start, len, v.prot as u64, flags, u64::MAX, 0],
                );
            }
            VmaKind::Memfd { inode, offset } => {
                let fd =
                    memfds.fd_in(inj, mem, pid, p.ns_pid, data, image, *inode, highest_fd(p))?;
                let share = if v.shared {
                    libc::MAP_SHARED
                } else {
                    libc::MAP_PRIVATE
                } as u64;
                inj.ok(
                    pid,
                    "mmap of a memfd",
                    libc::SYS_mmap,
                    &[
                        v.start,
                        len,
                        v.prot as u64,
                        share | fixed | mmap_flags(&v.advice),
                        fd,
                        *offset,
                    ],
                )?;
                memfds.release(inj, pid, *inode, fd)?;
            }
            VmaKind::SysvShm { id } => {
                let mut flags = 0;
                if v.prot & libc::PROT_WRITE as u32 == 0 {
                    flags |= libc::SHM_RDONLY;
                }
                if v.prot & libc::PROT_EXEC as u32 != 0 {
                    flags |= libc::SHM_EXEC;
                }
                let at = inj.ok(
                    pid,
                    &format!("shmat of System V segment {id}"),
                    libc::SYS_shmat,
                    &[*id as u64, v.start, flags as u64],
                )?;
                if at != v.start {
                    return Err(RestoreError::SysV {
                        kind: "Shm",
                        id: *id,
                        what: format!("attached at {at:#x}, not {:#x}", v.start),
                    }
                    .into());
                }
            }
            VmaKind::File { file, offset } => {
                let fd = match files.get(file.path.as_str()) {
                    Some(&fd) => fd,
                    None => {
                        let mode = if v.shared && v.prot & libc::PROT_WRITE as u32 != 0 {
                            libc::O_RDWR
                        } else {
                            libc::O_RDONLY
                        };
                        let fd = open_in(inj, mem, pid, data, &file.path, mode | libc::O_CLOEXEC)?;
                        files.insert(&file.path, fd);
                        fd
                    }
                };
                let share = if v.shared {
                    libc::MAP_SHARED
                } else {
                    libc::MAP_PRIVATE
                } as u64;
                maps.push(
                    format!("mmap {}", file.path),
                    [
                        v.start,
                        len,
                        v.prot as u64,
                        share | fixed | mmap_flags(&v.advice),
                        fd,
                        *offset,
                    ],
                );
            }
        }
        let lazily = lazy.is_some()
            && v.kind == VmaKind::Anon
            && !v.inherited
            && !v.shared
            && v.prot & libc::PROT_WRITE as u32 != 0
            && !v.pages.is_empty();
        let pieces = v.pages.iter().map(|run| Piece {
            addr: run.addr,
            len: run.pages * PAGE,
            layer: run.layer,
            offset: run.offset,
        });
        if lazily {
            lazy_ranges.push((v.start, v.end));
            lazy_pieces.extend(pieces);
            continue;
        }
        let by_copy = v.kind == VmaKind::Anon
            && !v.inherited
            && !v.shared
            && v.prot & libc::PROT_WRITE as u32 != 0
            && !v.pages.is_empty();
        if by_copy {
            copy_ranges.push((v.start, v.end));
            // Within one mapping: an UFFDIO_COPY must not cross mappings.
            copy_pieces.extend(joined(pieces));
            continue;
        }
        if !v.pages.is_empty() {
            maps.make(inj, mem, pid)?;
        }
        for run in &v.pages {
            let n = (run.pages * PAGE) as usize;
            let layer = image.layer(run.layer);
            if v.prot & libc::PROT_WRITE as u32 != 0 {
                read_in(inj, pid, image, &mut layer_fd, &pieces_of(run))?;
                continue;
            }
            // Read-only pages (text, RELRO) cannot be read into by the
            // process; /proc/PID/mem writes them.
            buf.resize(n, 0);
            layer.read_pages(run.offset, &mut buf[..n])?;
            mem.write(run.addr, &buf[..n])?;
        }
    }
    maps.make(inj, mem, pid)?;
    if !copy_pieces.is_empty() {
        let started = std::time::Instant::now();
        let how = match copy_in(inj, pid, image, &copy_ranges, &copy_pieces)? {
            Ok(()) => "copied in",
            Err(why) => {
                debug!(pid, why = %why, "no userfaultfd copy");
                read_in(inj, pid, image, &mut layer_fd, &copy_pieces)?;
                "read in by the process"
            }
        };
        debug!(
            pid,
            bytes = copy_pieces.iter().map(|p| p.len).sum::<u64>(),
            ms = started.elapsed().as_secs_f64() * 1e3,
            "private anonymous pages {how}"
        );
    }
    for fd in files.into_values().chain(layer_fds.into_values()) {
        inj.call(pid, libc::SYS_close, &[fd])?;
    }
    if let (Some(server), false) = (lazy, lazy_pieces.is_empty()) {
        // Made by the process itself (its mm is the one registered), taken
        // out and closed in it: the page server holds the only one.
        let flags = (libc::O_CLOEXEC | libc::O_NONBLOCK) as u64;
        let fd = inj.ok(pid, "userfaultfd", libc::SYS_userfaultfd, &[flags])?;
        let added = server.add(pid, fd as i32, &lazy_ranges, lazy_pieces);
        inj.call(pid, libc::SYS_close, &[fd])?;
        added?;
    }
    debug!(pid, "address space rebuilt");
    Ok(())
}

/// Private anonymous and file mappings to make, made together in one batch
/// of injected calls (code at `code`) before any page is put into one of
/// them: a 64 MiB memhold's ~20 mappings took a ptrace round trip each.
struct Mappings {
    code: u64,
    calls: Vec<(i64, [u64; 6])>,
    /// Each call's name for its error.
    names: Vec<String>,
}

impl Mappings {
    fn push(&mut self, name: String, args: [u64; 6]) {
        self.calls.push((libc::SYS_mmap, args));
        self.names.push(name);
    }

    /// Makes those pushed so far.
    fn make(&mut self, inj: &Injector, mem: &Memory, pid: u32) -> Result<(), SnapshotError> {
        let answers = inj.call_all(mem, pid, self.code, &self.calls)?;
        self.calls.clear();
        let names = std::mem::take(&mut self.names);
        match names
            .into_iter()
            .zip(answers)
            .find(|(_, r)| (-4095..0).contains(r))
        {
            Some((name, r)) => Err(SnapshotError::process(
                pid,
                name,
                nix::errno::Errno::from_raw(-r as i32),
            )),
            None => Ok(()),
        }
    }
}

/// `pieces` cut in two of about the same number of bytes, at a page.
fn halves(pieces: &[Piece]) -> (Vec<Piece>, Vec<Piece>) {
    let total: u64 = pieces.iter().map(|p| p.len).sum();
    let mut left = (total / 2) / PAGE * PAGE;
    let (mut first, mut second) = (Vec::new(), Vec::new());
    for p in pieces {
        if left == 0 {
            second.push(*p);
        } else if p.len <= left {
            left -= p.len;
            first.push(*p);
        } else {
            first.push(Piece { len: left, ..*p });
            second.push(Piece {
                addr: p.addr + left,
                len: p.len - left,
                offset: p.offset + left,
                ..*p
            });
            left = 0;
        }
    }
    (first, second)
}

/// The pieces of one mapping, each run that continues the one before it in
/// memory and in the same image layer made one: the dump cuts runs at
/// [`CHUNK_PAGES`], and each piece is a call (an `UFFDIO_COPY` of 64 MiB
/// fills 1 GiB 5–15 % faster than one of 4 MiB).
fn joined(pieces: impl IntoIterator<Item = Piece>) -> Vec<Piece> {
    let mut out: Vec<Piece> = Vec::new();
    for p in pieces {
        match out.last_mut() {
            Some(last)
                if last.layer == p.layer
                    && last.addr + last.len == p.addr
                    && last.offset + last.len == p.offset =>
            {
                last.len += p.len
            }
            _ => out.push(p),
        }
    }
    out
}

fn pieces_of(run: &PageRun) -> [Piece; 1] {
    [Piece {
        addr: run.addr,
        len: run.pages * PAGE,
        layer: run.layer,
        offset: run.offset,
    }]
}

/// The process reads `pieces` of the image into its memory itself
/// (`pread64` from the layer files it opened): one copy, from the page
/// cache, with a fault per page it fills.
fn read_in(
    inj: &Injector,
    pid: u32,
    image: &Image,
    layer_fd: &mut dyn FnMut(u32) -> Result<u64, SnapshotError>,
    pieces: &[Piece],
) -> Result<(), SnapshotError> {
    for p in pieces {
        let layer = image.layer(p.layer);
        let got = inj.ok(
            pid,
            "pread64 of saved pages",
            libc::SYS_pread64,
            &[
                layer_fd(p.layer)?,
                p.addr,
                p.len,
                layer.pages_off + p.offset,
            ],
        )?;
        if got != p.len {
            return Err(RestoreError::Process {
                pid,
                what: format!(
                    "read {got} of {} saved bytes at {:#x} from the image {}",
                    p.len,
                    p.addr,
                    layer.path.display()
                ),
            }
            .into());
        }
    }
    Ok(())
}

/// Puts `pieces` of the image in place in the process's private anonymous
/// `ranges` with `UFFDIO_COPY`, from the image files mapped here: the
/// kernel allocates each page and copies into it. The process makes the
/// userfaultfd (so that it is of its address space) and this side takes
/// it; the ranges are unregistered again before it returns, so nothing of
/// it stays on the process. `Ok(Err(why))`: no userfaultfd or mapping of
/// the image could be had, and nothing was changed.
fn copy_in(
    inj: &Injector,
    pid: u32,
    image: &Image,
    ranges: &[(u64, u64)],
    pieces: &[Piece],
) -> Result<Result<(), String>, SnapshotError> {
    let mut layers = Vec::new();
    for p in pieces {
        if layers.iter().any(|(l, _)| *l == p.layer) {
            continue;
        }
        match uffd::FileSource::map(&image.layer(p.layer).file) {
            Ok(source) => layers.push((p.layer, source)),
            Err(e) => {
                return Ok(Err(format!(
                    "mapping {}: {e}",
                    image.layer(p.layer).path.display()
                )))
            }
        }
    }
    // User-mode faults only: nothing faults on these ranges while they are
    // registered (the process is stopped), and it needs no privilege.
    let flags = (libc::O_CLOEXEC | libc::O_NONBLOCK) as u64 | uffd::USER_MODE_ONLY;
    let made = inj.call(pid, libc::SYS_userfaultfd, &[flags])?.ret;
    if made < 0 {
        return Ok(Err(format!(
            "userfaultfd: {}",
            std::io::Error::from_raw_os_error(-made as i32)
        )));
    }
    let taken = pidfd::open_process(pid)
        .and_then(|pfd| pidfd::get_fd(&pfd, made as i32))
        .map_err(|e| SnapshotError::process(pid, "taking its userfaultfd", e));
    inj.call(pid, libc::SYS_close, &[made as u64])?;
    let fd = taken?;
    uffd::api(fd.as_fd(), 0).map_err(|e| SnapshotError::process(pid, "UFFDIO_API", e))?;
    for &(start, end) in ranges {
        uffd::register_missing(fd.as_fd(), start, end - start).map_err(|e| {
            SnapshotError::process(pid, format!("registering {start:#x}-{end:#x}"), e)
        })?;
    }
    let copy = |pieces: &[Piece]| -> Result<(), SnapshotError> {
        for p in pieces {
            let (_, source) = layers
                .iter()
                .find(|(l, _)| *l == p.layer)
                .expect("every layer mapped above");
            let offset = image.layer(p.layer).pages_off + p.offset;
            uffd::copy_from(fd.as_fd(), p.addr, source, offset, p.len).map_err(
                |(done, errno)| {
                    SnapshotError::process(
                        pid,
                        format!(
                            "UFFDIO_COPY of {} saved bytes to {:#x} from {} (stopped after {done})",
                            p.len,
                            p.addr,
                            image.layer(p.layer).path.display()
                        ),
                        Errno::from_raw(errno),
                    )
                },
            )?;
        }
        Ok(())
    };
    // Half of the pages on another CPU: this thread is pinned to the
    // stopped process's CPU (for the ptrace round trips), and the kernel
    // fills pages at 2.6-3.4 GB/s per thread here (256 MiB: 80-96 ms on
    // one thread, 53-63 ms on two, idle machine).
    let (here, there) = halves(pieces);
    if there.is_empty()
        || nix::unistd::sysconf(nix::unistd::SysconfVar::_NPROCESSORS_ONLN)
            .ok()
            .flatten()
            .is_none_or(|n| n < 2)
    {
        copy(pieces)?;
    } else {
        let current = nix::sched::sched_getcpu().ok();
        std::thread::scope(|scope| {
            let other = scope.spawn(|| {
                let mut others = nix::sched::CpuSet::new();
                for cpu in (0..nix::sched::CpuSet::count()).filter(|&c| Some(c) != current) {
                    let _ = others.set(cpu);
                }
                // Refused (no other CPU allowed): it shares this one.
                let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &others);
                copy(&there)
            });
            let mine = copy(&here);
            let theirs = other.join().expect("copying thread");
            mine.and(theirs)
        })?;
    }
    for &(start, end) in ranges {
        uffd::unregister(fd.as_fd(), start, end - start).map_err(|e| {
            SnapshotError::process(pid, format!("unregistering {start:#x}-{end:#x}"), e)
        })?;
    }
    Ok(Ok(()))
}

/// Drops the pages of an inherited private mapping that the process did
/// not have: neither saved for it nor shared with its parent.
pub(crate) fn drop_unsaved(inj: &Injector, pid: u32, v: &Vma) -> Result<(), SnapshotError> {
    let mut kept: Vec<(u64, u64)> = v
        .pages
        .iter()
        .map(|r| (r.addr, r.pages))
        .chain(v.cow.iter().copied())
        .collect();
    kept.sort_unstable();
    let mut at = v.start;
    for (addr, pages) in kept.into_iter().chain(std::iter::once((v.end, 0))) {
        if addr > at {
            inj.ok(
                pid,
                "MADV_DONTNEED of pages the process did not have",
                libc::SYS_madvise,
                &[at, addr - at, libc::MADV_DONTNEED as u64],
            )?;
        }
        at = at.max(addr + pages * PAGE);
    }
    Ok(())
}

/// Sets the mm fields and, unless `keep_exe` (a child forked from a parent
/// with the same executable, which still maps it: the kernel refuses to
/// change an exe that is mapped), the exe link. `args`, if given, is the
/// (start, end) of the arguments /proc/PID/cmdline shows instead of the
/// saved ones.
pub(crate) fn set_mm(
    inj: &Injector,
    mem: &Memory,
    pid: u32,
    data: u64,
    p: &ProcessImage,
    keep_exe: bool,
    args: Option<(u64, u64)>,
) -> Result<(), SnapshotError> {
    let exe_fd = if keep_exe {
        None
    } else {
        Some(open_in(
            inj,
            mem,
            pid,
            data,
            &p.exe.path,
            libc::O_RDONLY | libc::O_CLOEXEC,
        )?)
    };
    let m = &p.mm;
    let (arg_start, arg_end) = args.unwrap_or((m.arg_start, m.arg_end));
    let auxv_at = data + 256;
    let auxv = abi::bytes_of_slice(&p.auxv);
    mem.write(auxv_at, auxv)?;
    let map = PrctlMmMap {
        start_code: m.start_code,
        end_code: m.end_code,
        start_data: m.start_data,
        end_data: m.end_data,
        start_brk: m.start_brk,
        brk: m.brk,
        start_stack: m.start_stack,
        arg_start,
        arg_end,
        env_start: m.env_start,
        env_end: m.env_end,
        auxv: auxv_at,
        auxv_size: auxv.len() as u32,
        // -1: the exe link stays.
        exe_fd: exe_fd.map_or(u32::MAX, |fd| fd as u32),
    };
    mem.write_value(data, &map)?;
    inj.ok(
        pid,
        "PR_SET_MM_MAP",
        libc::SYS_prctl,
        &[
            PR_SET_MM,
            PR_SET_MM_MAP,
            data,
            std::mem::size_of::<PrctlMmMap>() as u64,
            0,
        ],
    )?;
    if let Some(fd) = exe_fd {
        inj.call(pid, libc::SYS_close, &[fd])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn piece(addr: u64, len: u64, layer: u32, offset: u64) -> Piece {
        Piece {
            addr,
            len,
            layer,
            offset,
        }
    }

    #[test]
    fn halves_split_the_bytes_at_a_page() {
        let pieces = vec![
            piece(0x10000, 0x3000, 0, 0),
            piece(0x20000, 0x2000, 1, 0x8000),
        ];
        let (a, b) = halves(&pieces);
        assert_eq!(
            a,
            vec![piece(0x10000, 0x2000, 0, 0)],
            "5 pages: the first 2 here"
        );
        assert_eq!(
            b,
            vec![
                piece(0x12000, 0x1000, 0, 0x2000),
                piece(0x20000, 0x2000, 1, 0x8000)
            ]
        );
        let (a, b) = halves(&[piece(0x10000, 0x1000, 0, 0)]);
        assert!(a.is_empty());
        assert_eq!(b, vec![piece(0x10000, 0x1000, 0, 0)]);
    }

    #[test]
    fn runs_continuing_in_memory_and_in_their_layer_are_joined() {
        let pieces = vec![
            piece(0x10000, 0x4000, 0, 0),
            piece(0x14000, 0x1000, 0, 0x4000),
            // A gap in memory.
            piece(0x16000, 0x1000, 0, 0x5000),
            // Contiguous in memory, elsewhere in the image.
            piece(0x17000, 0x1000, 0, 0x9000),
            // Contiguous in both, another layer.
            piece(0x18000, 0x1000, 1, 0xa000),
            piece(0x19000, 0x2000, 1, 0xb000),
        ];
        assert_eq!(
            joined(pieces),
            vec![
                piece(0x10000, 0x5000, 0, 0),
                piece(0x16000, 0x1000, 0, 0x5000),
                piece(0x17000, 0x1000, 0, 0x9000),
                piece(0x18000, 0x3000, 1, 0xa000),
            ]
        );
    }
}
