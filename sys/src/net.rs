//! Socket calls `nix` cannot express.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

/// `bind(fd, addr)` with the address exactly as a task passed it, so the
/// kernel applies its own checks and errnos for every family.
pub fn bind_raw(fd: &OwnedFd, addr: &[u8]) -> io::Result<()> {
    with_raw_address(libc::bind, fd, addr)
}

/// `connect(fd, addr)` with the address exactly as a task passed it.
pub fn connect_raw(fd: &OwnedFd, addr: &[u8]) -> io::Result<()> {
    with_raw_address(libc::connect, fd, addr)
}

type AddressCall =
    unsafe extern "C" fn(libc::c_int, *const libc::sockaddr, libc::socklen_t) -> libc::c_int;

fn with_raw_address(call: AddressCall, fd: &OwnedFd, addr: &[u8]) -> io::Result<()> {
    // SAFETY: `call` is bind or connect, which read `addr.len()` bytes from
    // a live slice and nothing else.
    let ret = unsafe {
        call(
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
