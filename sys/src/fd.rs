//! Taking ownership of file descriptors that arrive from outside Rust's
//! view: inherited across exec, or received with SCM_RIGHTS.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Claims an fd this process inherited by number (passed on the command
/// line), after checking it is open.
pub fn inherit(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_GETFD only reads the descriptor flags.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the fd is open, and by the exec contract with our parent no
    // other owner exists in this process.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Runs `f` with a message header for one byte of data and room for one
/// fd's control message, all on this stack frame: nothing is allocated, as
/// [`send_fd`] runs between fork and exec.
fn with_one_fd_msghdr<R>(f: impl FnOnce(&mut libc::msghdr) -> R) -> R {
    // Aligned storage for one cmsghdr carrying one int.
    let mut control = [0u64; 4];
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    // SAFETY: an all-zero msghdr is a valid value (null pointers, zero
    // lengths); the fields set below point at the locals above, which
    // outlive `f`.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    f(&mut msg)
}

/// Sends one fd with SCM_RIGHTS, without allocating.
pub(crate) fn send_fd(channel: RawFd, fd: RawFd) -> io::Result<()> {
    with_one_fd_msghdr(|msg| {
        // SAFETY: CMSG_* compute offsets inside the header's control buffer,
        // which is large enough for CMSG_SPACE(sizeof(int)); the kernel
        // reads the message from live stack storage.
        unsafe {
            msg.msg_controllen = libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) as usize;
            let cmsg = libc::CMSG_FIRSTHDR(msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as usize;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd);
            if libc::sendmsg(channel, msg, libc::MSG_NOSIGNAL) < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    })
}

/// Receives one fd sent with SCM_RIGHTS. `Ok(None)` when the peer closed
/// the channel without sending one.
pub fn recv_fd(channel: &OwnedFd) -> io::Result<Option<OwnedFd>> {
    with_one_fd_msghdr(|msg| {
        // SAFETY: the kernel writes into the header's live buffers; CMSG_*
        // walk inside the control buffer as filled in by the kernel, and
        // MSG_CMSG_CLOEXEC makes the received fd close-on-exec atomically.
        unsafe {
            let n = loop {
                let n = libc::recvmsg(channel.as_raw_fd(), msg, libc::MSG_CMSG_CLOEXEC);
                if n >= 0 || io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                    break n;
                }
            };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let cmsg = libc::CMSG_FIRSTHDR(msg);
            if n == 0 || cmsg.is_null() {
                return Ok(None);
            }
            if (*cmsg).cmsg_level != libc::SOL_SOCKET || (*cmsg).cmsg_type != libc::SCM_RIGHTS {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "unexpected control message",
                ));
            }
            let fd = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>());
            Ok(Some(OwnedFd::from_raw_fd(fd)))
        }
    })
}
