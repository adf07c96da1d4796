//! Taking ownership of file descriptors that arrive from outside Rust's
//! view: inherited across exec, or received with SCM_RIGHTS.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

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

/// Why a path that must name a regular file was not opened.
#[derive(Debug)]
pub enum OpenRegularError {
    Io(io::Error),
    /// What the path is instead: "a FIFO", "a directory", …
    NotRegular(&'static str),
}

impl From<io::Error> for OpenRegularError {
    fn from(e: io::Error) -> Self {
        OpenRegularError::Io(e)
    }
}

/// Opens `path` read-only, refusing at once anything but a regular file.
/// Opening a FIFO waits for a writer and reading one (or a terminal) waits
/// for data, and some devices act on open; an image or config that is one
/// would hang the command. So the type is checked before the open, the open
/// cannot block (`O_NONBLOCK`, `O_NOCTTY`), and the type is checked again on
/// the opened descriptor, which no rename of the path can swap. Reads then
/// block as usual.
pub fn open_regular(path: &Path) -> Result<File, OpenRegularError> {
    not_regular(fs::metadata(path)?.file_type())?;
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    not_regular(file.metadata()?.file_type())?;
    clear_nonblock(&file)?;
    Ok(file)
}

fn not_regular(t: fs::FileType) -> Result<(), OpenRegularError> {
    let what = if t.is_file() {
        return Ok(());
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else {
        "of an unknown type"
    };
    Err(OpenRegularError::NotRegular(what))
}

fn clear_nonblock(file: &File) -> io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: F_GETFL only reads the status flags of an fd `file` owns.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: F_SETFL only changes the status flags of an fd `file` owns.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
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

/// The most fds [`recv_with_fds`] accepts in one message; any beyond are
/// closed by the kernel (MSG_CTRUNC) and the message is refused.
pub const MAX_FDS: usize = 8;

/// Receives one message of at most `max_len` bytes with the fds sent along
/// with SCM_RIGHTS (close-on-exec), in the order the sender gave them.
/// A message whose control data was truncated is refused, its fds closed.
pub fn recv_with_fds(channel: &OwnedFd, max_len: usize) -> io::Result<(Vec<u8>, Vec<OwnedFd>)> {
    let mut data = vec![0u8; max_len.max(1)];
    // Aligned room for one cmsghdr with MAX_FDS ints.
    let mut control = [0u64; 2 + MAX_FDS / 2];
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    // SAFETY: an all-zero msghdr is a valid value; the fields set below
    // point at `iov` and `control`, which live until the end of this
    // function, past every use of `msg`.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    let n = loop {
        // SAFETY: the kernel writes into the live buffers `msg` points at;
        // MSG_CMSG_CLOEXEC makes received fds close-on-exec atomically.
        let n = unsafe { libc::recvmsg(channel.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 || io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            break n;
        }
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: CMSG_FIRSTHDR/CMSG_NXTHDR walk the control buffer as the
    // kernel filled it in (msg_controllen was updated by recvmsg); each
    // SCM_RIGHTS payload holds (cmsg_len - CMSG_LEN(0)) / sizeof(int) fds
    // that this process now owns and nothing else refers to.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let bytes = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                for i in 0..bytes / std::mem::size_of::<RawFd>() {
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("more than {MAX_FDS} file descriptors in one message"),
        ));
    }
    data.truncate(n as usize);
    Ok((data, fds))
}

#[cfg(test)]
mod tests {
    use super::{open_regular, OpenRegularError};
    use std::ffi::CString;
    use std::io::Read;
    use std::os::unix::ffi::OsStrExt;

    fn refused_as(path: &std::path::Path) -> &'static str {
        match open_regular(path) {
            Err(OpenRegularError::NotRegular(what)) => what,
            Err(OpenRegularError::Io(e)) => panic!("{}: {e}", path.display()),
            Ok(_) => panic!("{} accepted", path.display()),
        }
    }

    #[test]
    fn only_regular_files_open_and_a_fifo_does_not_block() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let c = CString::new(fifo.as_os_str().as_bytes()).unwrap();
        // SAFETY: mkfifo reads one NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert_eq!(refused_as(&fifo), "a FIFO");
        assert_eq!(refused_as(dir.path()), "a directory");
        assert_eq!(
            refused_as(std::path::Path::new("/dev/null")),
            "a character device"
        );

        let file = dir.path().join("file");
        std::fs::write(&file, "text").unwrap();
        let mut opened = open_regular(&file).unwrap();
        let mut text = String::new();
        opened.read_to_string(&mut text).unwrap();
        assert_eq!(text, "text");
        // SAFETY: F_GETFL only reads the flags of an fd `opened` owns.
        let flags = unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&opened), libc::F_GETFL) };
        assert_eq!(flags & libc::O_NONBLOCK, 0, "reads block again");
        assert!(matches!(
            open_regular(&dir.path().join("missing")),
            Err(OpenRegularError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound
        ));
    }

    #[test]
    fn a_message_arrives_with_its_bytes_and_fd() {
        use std::os::fd::{AsRawFd, OwnedFd};
        use std::os::unix::net::UnixStream;
        let (a, b) = UnixStream::pair().unwrap();
        let null = std::fs::File::open("/dev/null").unwrap();
        super::send_fd(a.as_raw_fd(), null.as_raw_fd()).unwrap();
        let b: OwnedFd = b.into();
        let (data, got) = super::recv_with_fds(&b, 4096).unwrap();
        assert_eq!(data.len(), 1);
        assert_eq!(got.len(), 1);
        let link = std::fs::read_link(format!("/proc/self/fd/{}", got[0].as_raw_fd())).unwrap();
        assert_eq!(link, std::path::PathBuf::from("/dev/null"));
    }
}
