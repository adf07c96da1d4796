//! Socket calls `nix` cannot express.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

/// `connect(fd, {AF_UNSPEC})`: dissolves a socket's association (UDP
/// disconnect, TCP abort). `nix` has no way to build an AF_UNSPEC address.
pub fn connect_unspec(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: an all-zero sockaddr has family AF_UNSPEC; the kernel reads
    // `size_of::<sockaddr>()` bytes from a live stack value.
    let ret = unsafe {
        let addr: libc::sockaddr = std::mem::zeroed();
        libc::connect(
            fd.as_raw_fd(),
            &addr,
            std::mem::size_of::<libc::sockaddr>() as libc::socklen_t,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
