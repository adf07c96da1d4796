//! Write tracking without soft-dirty: a userfaultfd in asynchronous
//! write-protect mode (`UFFD_FEATURE_WP_ASYNC`, Linux 6.7) and the
//! `PAGEMAP_SCAN` ioctl of `/proc/PID/pagemap`. With WP_ASYNC a write to a
//! protected page is resolved by the kernel in the writing task (no fault
//! message, nobody has to answer), so the tracker may be another process or
//! may die: the page simply becomes writable, and "written" to a scan.
//!
//! Lazy restore uses the same file in missing mode: pages of registered
//! ranges that are not there fault to whoever holds the userfaultfd, which
//! fills them with `UFFDIO_COPY` (or `UFFDIO_ZEROPAGE`) and hears of the
//! process's own changes to those ranges as events.
//!
//! Debian's headers lack `PAGEMAP_SCAN` and the newer feature bits, so the
//! structures and numbers of `linux/userfaultfd.h` and `linux/fs.h` (6.7)
//! are spelled out here.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

const UFFD_API: u64 = 0xaa;
/// `_IOWR(0xaa, 0x3f, struct uffdio_api)`.
const UFFDIO_API: libc::c_ulong = 0xc018_aa3f;
/// `_IOWR(0xaa, 0x00, struct uffdio_register)`.
const UFFDIO_REGISTER: libc::c_ulong = 0xc020_aa00;
/// `_IOR(0xaa, 0x01, struct uffdio_range)`.
const UFFDIO_UNREGISTER: libc::c_ulong = 0x8010_aa01;
/// `_IOWR(0xaa, 0x06, struct uffdio_writeprotect)`.
const UFFDIO_WRITEPROTECT: libc::c_ulong = 0xc018_aa06;
/// `_IOR(0xaa, 0x02, struct uffdio_range)`.
const UFFDIO_WAKE: libc::c_ulong = 0x8010_aa02;
/// `_IOWR(0xaa, 0x03, struct uffdio_copy)`.
const UFFDIO_COPY: libc::c_ulong = 0xc028_aa03;
/// `_IOWR(0xaa, 0x04, struct uffdio_zeropage)`.
const UFFDIO_ZEROPAGE: libc::c_ulong = 0xc020_aa04;
/// `_IOWR('f', 16, struct pm_scan_arg)`.
const PAGEMAP_SCAN: libc::c_ulong = 0xc060_6610;

/// Empty pages count as protected, so that a scan may write-protect
/// anonymous memory at all (without it the kernel refuses WP matching on
/// anonymous mappings).
pub const FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
/// Write faults on protected pages are resolved in-kernel.
pub const FEATURE_WP_ASYNC: u64 = 1 << 15;
/// The process's forks get a userfaultfd of their own, handed to the
/// reader of this one (`Event::Fork`); without it a child's registered
/// ranges are silently unregistered.
pub const FEATURE_EVENT_FORK: u64 = 1 << 1;
/// `mremap` of a registered range is reported (`Event::Remap`) and the
/// registration moves with it.
pub const FEATURE_EVENT_REMAP: u64 = 1 << 2;
/// `MADV_DONTNEED`/`MADV_REMOVE` of a registered range is reported
/// (`Event::Remove`) before the pages go.
pub const FEATURE_EVENT_REMOVE: u64 = 1 << 3;
/// `munmap` (and `mmap` over) a registered range is reported
/// (`Event::Unmap`).
pub const FEATURE_EVENT_UNMAP: u64 = 1 << 6;
const REGISTER_MODE_MISSING: u64 = 1 << 0;
const REGISTER_MODE_WP: u64 = 1 << 1;
const WRITEPROTECT_MODE_WP: u64 = 1 << 0;
/// `userfaultfd()` flag: only faults from user mode are handled, which is
/// what unprivileged processes may ask for when
/// `vm.unprivileged_userfaultfd` is 0.
pub const USER_MODE_ONLY: u64 = 1;

/// Write-protect the pages that match while reporting them.
const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
/// Fail with EPERM on any mapping in the range not registered for
/// asynchronous write-protect, rather than skipping it silently.
const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;
/// Present or swapped and not write-protected.
const PAGE_IS_WRITTEN: u64 = 1 << 1;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

#[repr(C)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

/// `struct page_region`: pages `start..end` share `categories`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PageRegion {
    pub start: u64,
    pub end: u64,
    pub categories: u64,
}

/// `struct pm_scan_arg`.
#[repr(C)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `UFFDIO_API` handshake asking for `features`; a kernel without one of
/// them fails with EINVAL.
pub fn api(uffd: BorrowedFd, features: u64) -> io::Result<()> {
    let mut arg = UffdioApi {
        api: UFFD_API,
        features,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API reads and writes one `struct uffdio_api`, which
    // `arg` is (repr(C), same fields) and which lives across the call.
    check(unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_API, &mut arg) })
}

/// Registers `start..start+len` of the userfaultfd's address space for
/// write-protect tracking. EBUSY: some of it is registered with another
/// userfaultfd.
pub fn register_wp(uffd: BorrowedFd, start: u64, len: u64) -> io::Result<()> {
    let mut arg = UffdioRegister {
        range: UffdioRange { start, len },
        mode: REGISTER_MODE_WP,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_REGISTER reads and writes one `struct uffdio_register`
    // (repr(C), same layout), alive across the call; it changes mappings of
    // the userfaultfd's process, never memory of ours.
    check(unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_REGISTER, &mut arg) })
}

/// Registers `start..start+len` for missing-page faults: a page of it that
/// is not there blocks the touching thread (in user or kernel mode) until
/// the holder of the userfaultfd fills it.
pub fn register_missing(uffd: BorrowedFd, start: u64, len: u64) -> io::Result<()> {
    let mut arg = UffdioRegister {
        range: UffdioRange { start, len },
        mode: REGISTER_MODE_MISSING,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_REGISTER reads and writes one `struct uffdio_register`
    // (repr(C), same layout), alive across the call; it changes mappings of
    // the userfaultfd's process, never memory of ours.
    check(unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_REGISTER, &mut arg) })
}

/// How far a fill got: `Ok(n)` bytes filled in all, or stopped after `n`
/// bytes because of `errno` (EEXIST: a page there already; ENOENT: no
/// registered mapping there any more; EAGAIN: the address space is
/// changing, read the events first; ESRCH: the process is gone).
pub type Filled = Result<u64, (u64, i32)>;

/// `UFFDIO_COPY`: fills the missing pages at `dst` (page-aligned) with
/// `src` (a whole number of pages) and wakes the threads waiting on them.
pub fn copy(uffd: BorrowedFd, dst: u64, src: &[u8]) -> Filled {
    fill(src.len() as u64, |at| {
        let mut arg = UffdioCopy {
            dst: dst + at,
            src: src[at as usize..].as_ptr() as u64,
            len: src.len() as u64 - at,
            mode: 0,
            copy: 0,
        };
        // SAFETY: UFFDIO_COPY reads and writes one `struct uffdio_copy`
        // (repr(C), same layout), alive across the call, and reads `len`
        // bytes at `src`, which are inside the borrowed slice; it writes
        // only memory of the userfaultfd's process.
        let ret = unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_COPY, &mut arg) };
        (ret, arg.copy)
    })
}

/// A read-only mapping of a file (an image's pages) as the source of
/// [`copy_from`]: only the kernel reads it, inside `UFFDIO_COPY`, so a file
/// that shrinks under it makes that copy fail with EFAULT, never this
/// process fault.
#[derive(Debug)]
pub struct FileSource {
    at: std::ptr::NonNull<libc::c_void>,
    len: usize,
}

// SAFETY: the mapping is never dereferenced here, only passed to the
// kernel by address; unmapping in `drop` needs exclusive ownership, which
// `Drop` has.
unsafe impl Send for FileSource {}
// SAFETY: as above: `&FileSource` gives out the mapping's address only.
unsafe impl Sync for FileSource {}

impl FileSource {
    /// Maps all of `file` (its length now), read-only, its pages faulted
    /// in ahead (`MAP_POPULATE`) so that the copies do not fault on them
    /// one page-cache page at a time.
    pub fn map(file: &std::fs::File) -> io::Result<FileSource> {
        let len = usize::try_from(file.metadata()?.len())
            .map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
        if len == 0 {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        // SAFETY: a new private read-only mapping of a descriptor we hold;
        // the kernel chooses the address, so nothing of ours is replaced.
        let at = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_POPULATE,
                file.as_raw_fd(),
                0,
            )
        };
        if at == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let at =
            std::ptr::NonNull::new(at).ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        Ok(FileSource { at, len })
    }
}

impl Drop for FileSource {
    fn drop(&mut self) {
        // SAFETY: `at..at+len` is the mapping `map` made, and nothing
        // refers into it (it is never dereferenced).
        unsafe { libc::munmap(self.at.as_ptr(), self.len) };
    }
}

/// `UFFDIO_COPY` of `len` bytes at `offset` of `source` (both
/// page-aligned) to the missing pages at `dst`. A range beyond the mapped
/// file is refused with EINVAL before any copy.
pub fn copy_from(uffd: BorrowedFd, dst: u64, source: &FileSource, offset: u64, len: u64) -> Filled {
    let inside = offset
        .checked_add(len)
        .is_some_and(|end| end <= source.len as u64);
    if !inside {
        return Err((0, libc::EINVAL));
    }
    let src = source.at.as_ptr() as u64 + offset;
    fill(len, |at| {
        let mut arg = UffdioCopy {
            dst: dst + at,
            src: src + at,
            len: len - at,
            mode: 0,
            copy: 0,
        };
        // SAFETY: UFFDIO_COPY reads and writes one `struct uffdio_copy`
        // (repr(C), same layout), alive across the call, and reads `len`
        // bytes at `src`, inside the source mapping (checked above); it
        // writes only memory of the userfaultfd's process.
        let ret = unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_COPY, &mut arg) };
        (ret, arg.copy)
    })
}

/// `UFFDIO_ZEROPAGE`: maps zeros at the missing pages of `start..start+len`
/// and wakes the threads waiting on them.
pub fn zeropage(uffd: BorrowedFd, start: u64, len: u64) -> Filled {
    fill(len, |at| {
        let mut arg = UffdioZeropage {
            range: UffdioRange {
                start: start + at,
                len: len - at,
            },
            mode: 0,
            zeropage: 0,
        };
        // SAFETY: UFFDIO_ZEROPAGE reads and writes one `struct
        // uffdio_zeropage` (repr(C), same layout), alive across the call.
        let ret = unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_ZEROPAGE, &mut arg) };
        (ret, arg.zeropage)
    })
}

/// Runs one fill ioctl from offset 0 of `len` bytes, again from where it
/// stopped while it makes progress: the kernel ends a fill that got part of
/// the way with EAGAIN, and tells the real error only to the next call.
fn fill(len: u64, mut call: impl FnMut(u64) -> (libc::c_int, i64)) -> Filled {
    let mut at = 0;
    loop {
        let (ret, done) = call(at);
        if ret == 0 {
            return Ok(len);
        }
        let errno = io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO);
        // On error the kernel reports the bytes done before it, or -errno.
        let done = done.max(0) as u64;
        if done > 0 && at + done < len {
            at += done;
            continue;
        }
        return Err((at + done, errno));
    }
}

/// Wakes the threads waiting on `start..start+len` (after a fill that found
/// the pages there already: they retry and find them).
pub fn wake(uffd: BorrowedFd, start: u64, len: u64) -> io::Result<()> {
    let arg = UffdioRange { start, len };
    // SAFETY: UFFDIO_WAKE reads one `struct uffdio_range` (repr(C)), alive
    // across the call.
    check(unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_WAKE, &arg) })
}

const EVENT_PAGEFAULT: u8 = 0x12;
const EVENT_FORK: u8 = 0x13;
const EVENT_REMAP: u8 = 0x14;
const EVENT_REMOVE: u8 = 0x15;
const EVENT_UNMAP: u8 = 0x16;
/// `sizeof(struct uffd_msg)`.
const MSG_LEN: usize = 32;

/// One message of a userfaultfd.
#[derive(Debug)]
pub enum Event {
    /// A thread waits for the page at `addr` (page-aligned).
    Fault { addr: u64 },
    /// The process forked; the child's registered ranges are served
    /// through `uffd`, now ours.
    Fork { uffd: OwnedFd },
    /// `from..from+len` moved to `to`.
    Remap { from: u64, to: u64, len: u64 },
    /// The pages of `start..end` were dropped (they read zero now).
    Remove { start: u64, end: u64 },
    /// `start..end` was unmapped.
    Unmap { start: u64, end: u64 },
}

/// Reads the messages waiting on a non-blocking userfaultfd into `out`
/// until none is left. A message of a kind not asked for is an error.
pub fn read_events(uffd: BorrowedFd, out: &mut Vec<Event>) -> io::Result<()> {
    let mut buf = [0u8; MSG_LEN * 64];
    loop {
        // SAFETY: read(2) writes at most `buf.len()` bytes into `buf`,
        // borrowed mutably for the call.
        let n = unsafe { libc::read(uffd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock {
                return Ok(());
            }
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Ok(());
        }
        for msg in buf[..n as usize].chunks_exact(MSG_LEN) {
            out.push(decode(msg)?);
        }
    }
}

fn decode(msg: &[u8]) -> io::Result<Event> {
    let word = |i: usize| {
        let at = 8 + 8 * i;
        u64::from_ne_bytes(msg[at..at + 8].try_into().expect("8 bytes"))
    };
    let page = !(4096u64 - 1);
    Ok(match msg[0] {
        EVENT_PAGEFAULT => Event::Fault {
            addr: word(1) & page,
        },
        EVENT_FORK => {
            let fd = u32::from_ne_bytes(msg[8..12].try_into().expect("4 bytes")) as i32;
            // SAFETY: the kernel installed this new fd in our table for
            // this message; nothing else refers to it.
            let uffd = unsafe { OwnedFd::from_raw_fd(fd) };
            Event::Fork { uffd }
        }
        EVENT_REMAP => Event::Remap {
            from: word(0),
            to: word(1),
            len: word(2),
        },
        EVENT_REMOVE => Event::Remove {
            start: word(0),
            end: word(1),
        },
        EVENT_UNMAP => Event::Unmap {
            start: word(0),
            end: word(1),
        },
        other => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("userfaultfd message of unknown kind {other:#x}"),
            ))
        }
    })
}

/// A new userfaultfd of this process (close-on-exec, non-blocking), which
/// handles kernel-mode faults too: root only here
/// (`vm.unprivileged_userfaultfd` is 0).
pub fn create() -> io::Result<OwnedFd> {
    // SAFETY: userfaultfd takes flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Unregisters a range: its pages lose their write protection.
pub fn unregister(uffd: BorrowedFd, start: u64, len: u64) -> io::Result<()> {
    let arg = UffdioRange { start, len };
    // SAFETY: UFFDIO_UNREGISTER reads one `struct uffdio_range` (repr(C)),
    // alive across the call.
    check(unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_UNREGISTER, &arg) })
}

/// Write-protects `start..start+len` (registered with [`register_wp`]):
/// with `FEATURE_WP_UNPOPULATED`, empty pages too, so that a scan counts
/// only pages really written afterwards (it counts an empty page that was
/// never protected as written).
pub fn writeprotect(uffd: BorrowedFd, start: u64, len: u64) -> io::Result<()> {
    let mut arg = UffdioWriteprotect {
        range: UffdioRange { start, len },
        mode: WRITEPROTECT_MODE_WP,
    };
    // SAFETY: UFFDIO_WRITEPROTECT reads and writes one `struct
    // uffdio_writeprotect` (repr(C), same layout), alive across the call.
    check(unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_WRITEPROTECT, &mut arg) })
}

/// One `PAGEMAP_SCAN` of `start..end` on an open `/proc/PID/pagemap`: the
/// pages written since they were last protected (present or swapped and
/// not write-protected) go into `out`, and are write-protected again in the
/// same walk. Every mapping of the range must be registered for
/// asynchronous write-protect, else EPERM. Returns the regions filled;
/// when that is all of `out`, the walk may have stopped before `end`.
pub fn scan_written(
    pagemap: BorrowedFd,
    start: u64,
    end: u64,
    out: &mut [PageRegion],
) -> io::Result<usize> {
    let mut arg = PmScanArg {
        size: std::mem::size_of::<PmScanArg>() as u64,
        flags: PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
        start,
        end,
        walk_end: 0,
        vec: out.as_mut_ptr() as u64,
        vec_len: out.len() as u64,
        max_pages: 0,
        category_inverted: 0,
        category_mask: PAGE_IS_WRITTEN,
        category_anyof_mask: 0,
        return_mask: PAGE_IS_WRITTEN,
    };
    // SAFETY: PAGEMAP_SCAN reads and writes back one `struct pm_scan_arg`
    // (repr(C), its size in `size`) and writes at most `vec_len` `struct
    // page_region`s (repr(C)) at `vec`, which is `out`, borrowed mutably
    // for the call.
    let n = unsafe { libc::ioctl(pagemap.as_raw_fd(), PAGEMAP_SCAN, &mut arg) };
    check(n)?;
    Ok(n as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn structures_have_the_kernel_sizes() {
        assert_eq!(std::mem::size_of::<UffdioApi>(), 24);
        assert_eq!(std::mem::size_of::<UffdioRegister>(), 32);
        assert_eq!(std::mem::size_of::<UffdioRange>(), 16);
        assert_eq!(std::mem::size_of::<UffdioWriteprotect>(), 24);
        assert_eq!((UFFDIO_WRITEPROTECT >> 16) & 0x3fff, 24);
        assert_eq!(std::mem::size_of::<PmScanArg>(), 96);
        assert_eq!(std::mem::size_of::<PageRegion>(), 24);
        // The size is part of each ioctl number.
        assert_eq!((UFFDIO_API >> 16) & 0x3fff, 24);
        assert_eq!((UFFDIO_REGISTER >> 16) & 0x3fff, 32);
        assert_eq!((UFFDIO_UNREGISTER >> 16) & 0x3fff, 16);
        assert_eq!((PAGEMAP_SCAN >> 16) & 0x3fff, 96);
        assert_eq!(std::mem::size_of::<UffdioCopy>(), 40);
        assert_eq!((UFFDIO_COPY >> 16) & 0x3fff, 40);
        assert_eq!(std::mem::size_of::<UffdioZeropage>(), 32);
        assert_eq!((UFFDIO_ZEROPAGE >> 16) & 0x3fff, 32);
        assert_eq!((UFFDIO_WAKE >> 16) & 0x3fff, 16);
    }

    /// A fresh private anonymous read-write mapping of `len` bytes, which
    /// the test unmaps.
    fn anonymous(len: usize) -> *mut libc::c_void {
        // SAFETY: a new mapping where the kernel chooses; nothing of ours is
        // replaced and nothing else refers to it.
        let at = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(at, libc::MAP_FAILED);
        at
    }

    /// Pages copied from a mapped file land where asked, with the file's
    /// bytes at the given offset; a range past the file is refused.
    #[test]
    fn pages_are_copied_from_a_mapped_file() {
        use std::io::Write;
        use std::os::fd::{AsFd, FromRawFd, OwnedFd};
        const PAGE: usize = 4096;
        let mut file = tempfile_in_tmp();
        let bytes: Vec<u8> = (0..4 * PAGE).map(|i| (i / PAGE + 1) as u8).collect();
        file.write_all(&bytes).unwrap();
        let source = FileSource::map(&file).expect("mapping the file");
        // SAFETY: userfaultfd takes flags and returns a new fd or -1.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_userfaultfd,
                libc::O_CLOEXEC | libc::O_NONBLOCK | USER_MODE_ONLY as i32,
            )
        };
        assert!(fd >= 0, "userfaultfd: {}", io::Error::last_os_error());
        // SAFETY: `fd` was just created and is owned by nothing else.
        let uffd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        api(uffd.as_fd(), 0).expect("UFFDIO_API");
        let at = anonymous(3 * PAGE);
        let base = at as u64;
        register_missing(uffd.as_fd(), base, 3 * PAGE as u64).expect("UFFDIO_REGISTER");
        let copied = copy_from(uffd.as_fd(), base, &source, PAGE as u64, 2 * PAGE as u64);
        assert_eq!(copied, Ok(2 * PAGE as u64));
        let past = copy_from(
            uffd.as_fd(),
            base + 2 * PAGE as u64,
            &source,
            3 * PAGE as u64,
            2 * PAGE as u64,
        );
        assert_eq!(past, Err((0, libc::EINVAL)));
        unregister(uffd.as_fd(), base, 3 * PAGE as u64).expect("UFFDIO_UNREGISTER");
        // SAFETY: the mapping is 3 pages long and readable.
        let got = unsafe { std::slice::from_raw_parts(at as *const u8, 3 * PAGE) };
        assert!(got[..PAGE].iter().all(|&b| b == 2), "file page 1 at page 0");
        assert!(
            got[PAGE..2 * PAGE].iter().all(|&b| b == 3),
            "file page 2 at page 1"
        );
        assert!(
            got[2 * PAGE..].iter().all(|&b| b == 0),
            "page 2 never filled: zeros"
        );
        // SAFETY: the test's own mapping, no longer referred to.
        unsafe { libc::munmap(at, 3 * PAGE) };
    }

    /// A new file in the temporary directory, already unlinked.
    fn tempfile_in_tmp() -> std::fs::File {
        let path = std::env::temp_dir().join(format!("appshot-uffd-test-{}", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        file
    }

    /// The numbers and layouts above, checked against the kernel: a page
    /// written after a scan, and only it, is reported by the next scan.
    #[test]
    fn a_scan_reports_exactly_the_pages_written_since_the_last() {
        use std::os::fd::{AsFd, FromRawFd, OwnedFd};
        const PAGE: usize = 4096;
        // SAFETY: userfaultfd takes flags and returns a new fd or -1.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_userfaultfd,
                libc::O_CLOEXEC | libc::O_NONBLOCK | USER_MODE_ONLY as i32,
            )
        };
        assert!(fd >= 0, "userfaultfd: {}", io::Error::last_os_error());
        // SAFETY: `fd` was just created and is owned by nothing else.
        let uffd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        api(uffd.as_fd(), FEATURE_WP_ASYNC | FEATURE_WP_UNPOPULATED).expect("UFFDIO_API");
        let len = 8 * PAGE;
        let at = anonymous(len);
        let base = at as u64;
        let write = |page: usize| {
            // SAFETY: `page` < 8: the offset stays inside the mapping.
            let p = unsafe { (at as *mut u8).add(page * PAGE) };
            // SAFETY: `p` is inside the mapping, which is writable.
            unsafe { p.write_volatile(1) }
        };
        write(0);
        write(5);
        register_wp(uffd.as_fd(), base, len as u64).expect("UFFDIO_REGISTER");
        let pagemap = std::fs::File::open("/proc/self/pagemap").unwrap();
        let mut out = [PageRegion::default(); 8];
        let scan = |out: &mut [PageRegion]| {
            let n = scan_written(pagemap.as_fd(), base, base + len as u64, out).unwrap();
            out[..n]
                .iter()
                .map(|r| {
                    (
                        (r.start - base) as usize / PAGE,
                        (r.end - base) as usize / PAGE,
                    )
                })
                .collect::<Vec<_>>()
        };
        writeprotect(uffd.as_fd(), base, len as u64).expect("UFFDIO_WRITEPROTECT");
        assert_eq!(scan(&mut out), vec![], "present and empty pages protected");
        write(5);
        write(2);
        assert_eq!(scan(&mut out), vec![(2, 3), (5, 6)], "written since");
        assert_eq!(scan(&mut out), vec![], "protected again by the scan");
        unregister(uffd.as_fd(), base, len as u64).expect("UFFDIO_UNREGISTER");
        // SAFETY: the mapping made above, no longer used.
        unsafe { libc::munmap(at, len) };
    }

    /// Missing mode checked against the kernel: a thread touching a
    /// registered page waits for the fault to be answered with a copy, and
    /// a page dropped with MADV_DONTNEED is reported before it goes.
    #[test]
    fn a_missing_page_is_served_by_copy_and_a_dropped_one_reported() {
        use std::os::fd::AsFd;
        const PAGE: usize = 4096;
        let uffd = create().expect("userfaultfd");
        api(uffd.as_fd(), FEATURE_EVENT_REMOVE | FEATURE_EVENT_UNMAP).expect("UFFDIO_API");
        let len = 4 * PAGE;
        let at = anonymous(len);
        let base = at as u64;
        register_missing(uffd.as_fd(), base, len as u64).expect("UFFDIO_REGISTER");
        let reader = std::thread::spawn(move || {
            // SAFETY: page 1 of the mapping, which lives until joined.
            unsafe { ((base as usize + PAGE) as *const u8).read_volatile() }
        });
        let mut events = Vec::new();
        while events.is_empty() {
            read_events(uffd.as_fd(), &mut events).unwrap();
            std::thread::yield_now();
        }
        assert!(matches!(events[..], [Event::Fault { addr }] if addr == base + PAGE as u64));
        let page = vec![7u8; PAGE];
        assert_eq!(
            copy(uffd.as_fd(), base + PAGE as u64, &page),
            Ok(PAGE as u64)
        );
        assert_eq!(reader.join().unwrap(), 7);
        assert_eq!(
            copy(uffd.as_fd(), base, &vec![1u8; 2 * PAGE]),
            Err((PAGE as u64, libc::EEXIST)),
            "the first page filled, the second there already"
        );
        let dropper = std::thread::spawn(move || {
            // SAFETY: drops pages of the mapping, which lives until joined.
            unsafe { libc::madvise(base as *mut libc::c_void, PAGE, libc::MADV_DONTNEED) }
        });
        events.clear();
        while events.is_empty() {
            read_events(uffd.as_fd(), &mut events).unwrap();
            std::thread::yield_now();
        }
        assert_eq!(dropper.join().unwrap(), 0);
        assert!(
            matches!(events[..], [Event::Remove { start, end }] if start == base && end == base + PAGE as u64),
            "{events:?}"
        );
        assert_eq!(zeropage(uffd.as_fd(), base, PAGE as u64), Ok(PAGE as u64));
        // SAFETY: the first page, zero-filled just above.
        assert_eq!(unsafe { (base as *const u8).read_volatile() }, 0);
        // Else the munmap would wait for its event to be read.
        drop(uffd);
        // SAFETY: the mapping made above, no longer used.
        unsafe { libc::munmap(at, len) };
    }
}
