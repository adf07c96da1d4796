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

/// An `int` socket option (`getsockopt(fd, level, name)`), for options
/// `nix` has no type for (SO_PEEK_OFF, SO_PASSCRED on any socket).
pub fn get_int_opt(fd: &impl AsRawFd, level: libc::c_int, name: libc::c_int) -> io::Result<i32> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `value`, a live
    // int, and updates `len`.
    let ret = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

/// Sets an `int` socket option.
pub fn set_int_opt(
    fd: &impl AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: i32,
) -> io::Result<()> {
    // SAFETY: setsockopt reads size_of::<c_int>() bytes from a live int.
    let ret = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
