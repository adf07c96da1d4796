//! The timerfd ioctl a snapshot needs on its own side.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// `_IOW('T', 0, u64)`; the kernel has it with CONFIG_CHECKPOINT_RESTORE.
pub const TFD_IOC_SET_TICKS: u64 = 0x4008_5400;

/// Sets the expirations a read of timerfd `fd` returns next to `ticks`
/// (not 0).
pub fn set_ticks(fd: BorrowedFd<'_>, ticks: u64) -> io::Result<()> {
    // SAFETY: the ioctl reads one u64 from the pointer, which points at
    // `ticks` for the duration of the call.
    let r = unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            TFD_IOC_SET_TICKS as libc::Ioctl,
            &ticks as *const u64,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
