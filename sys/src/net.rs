//! Socket calls `nix` cannot express.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

/// `bind(fd, addr)` with the address exactly as a task passed it, so the
/// kernel applies its own checks and errnos for every family.
pub fn bind_raw(fd: &OwnedFd, addr: &[u8]) -> io::Result<()> {
    // SAFETY: the kernel reads `addr.len()` bytes from a live slice.
    let ret = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            addr.as_ptr().cast(),
            addr.len() as libc::socklen_t,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `connect(fd, addr)` with the address exactly as a task passed it.
pub fn connect_raw(fd: &OwnedFd, addr: &[u8]) -> io::Result<()> {
    // SAFETY: the kernel reads `addr.len()` bytes from a live slice.
    let ret = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            addr.as_ptr().cast(),
            addr.len() as libc::socklen_t,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
