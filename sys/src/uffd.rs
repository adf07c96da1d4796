//! Write tracking without soft-dirty: a userfaultfd in asynchronous
//! write-protect mode (`UFFD_FEATURE_WP_ASYNC`, Linux 6.7) and the
//! `PAGEMAP_SCAN` ioctl of `/proc/PID/pagemap`. With WP_ASYNC a write to a
//! protected page is resolved by the kernel in the writing task (no fault
//! message, nobody has to answer), so the tracker may be another process or
//! may die: the page simply becomes writable, and "written" to a scan.
//!
//! Debian's headers lack `PAGEMAP_SCAN` and the newer feature bits, so the
//! structures and numbers of `linux/userfaultfd.h` and `linux/fs.h` (6.7)
//! are spelled out here.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

const UFFD_API: u64 = 0xaa;
/// `_IOWR(0xaa, 0x3f, struct uffdio_api)`.
const UFFDIO_API: libc::c_ulong = 0xc018_aa3f;
/// `_IOWR(0xaa, 0x00, struct uffdio_register)`.
const UFFDIO_REGISTER: libc::c_ulong = 0xc020_aa00;
/// `_IOR(0xaa, 0x01, struct uffdio_range)`.
const UFFDIO_UNREGISTER: libc::c_ulong = 0x8010_aa01;
/// `_IOWR(0xaa, 0x06, struct uffdio_writeprotect)`.
const UFFDIO_WRITEPROTECT: libc::c_ulong = 0xc018_aa06;
/// `_IOWR('f', 16, struct pm_scan_arg)`.
const PAGEMAP_SCAN: libc::c_ulong = 0xc060_6610;

/// Empty pages count as protected, so that a scan may write-protect
/// anonymous memory at all (without it the kernel refuses WP matching on
/// anonymous mappings).
pub const FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
/// Write faults on protected pages are resolved in-kernel.
pub const FEATURE_WP_ASYNC: u64 = 1 << 15;
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
        // SAFETY: a fresh private anonymous mapping, unmapped below; nothing
        // else refers to it.
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
}
