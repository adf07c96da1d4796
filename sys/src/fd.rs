//! Taking ownership of file descriptors that arrive from outside Rust's
//! view: inherited across exec, or received with SCM_RIGHTS.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// Claims an fd this process inherited by number (passed on the command
/// line), after checking it is open.
///
/// # Safety
///
/// Nothing else in this process may own `fd` or close it: the returned
/// [`OwnedFd`] closes it when dropped. Only the caller knows that the
/// number came from its parent and was not claimed before.
pub unsafe fn inherit(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_GETFD only reads the descriptor flags.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the fd is open, and the caller vouches that nothing else in
    // this process owns it.
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

/// A control message carrying `N` fds, laid out as the kernel lays out
/// `CMSG_SPACE(N * sizeof(int))` bytes on x86_64: the header, then the
/// ints, padded to the header's alignment.
#[repr(C)]
#[derive(Clone, Copy)]
struct FdsCmsg<const N: usize> {
    hdr: libc::cmsghdr,
    fds: [RawFd; N],
}

impl<const N: usize> FdsCmsg<N> {
    fn empty() -> Self {
        FdsCmsg {
            hdr: libc::cmsghdr {
                cmsg_len: 0,
                cmsg_level: 0,
                cmsg_type: 0,
            },
            fds: [-1; N],
        }
    }

    /// `CMSG_LEN(n * sizeof(int))`: the header and `n` fds, without the
    /// trailing padding.
    const fn len_for(n: usize) -> usize {
        std::mem::offset_of!(FdsCmsg<N>, fds) + n * std::mem::size_of::<RawFd>()
    }

    /// The fds of an SCM_RIGHTS message the kernel wrote into `self`, when
    /// it wrote one; `received` is the msg_controllen recvmsg left.
    fn rights(&self, received: usize) -> Result<&[RawFd], &'static str> {
        if received < std::mem::size_of::<libc::cmsghdr>() {
            return Ok(&[]);
        }
        if self.hdr.cmsg_level != libc::SOL_SOCKET || self.hdr.cmsg_type != libc::SCM_RIGHTS {
            return Err("unexpected control message");
        }
        let n = (self
            .hdr
            .cmsg_len
            .min(received)
            .saturating_sub(Self::len_for(0)))
            / std::mem::size_of::<RawFd>();
        Ok(&self.fds[..n.min(N)])
    }
}

/// A message header for the data `iov` points at and for `control`, which
/// must both outlive every use of the header.
fn msghdr_for<const N: usize>(iov: &mut libc::iovec, control: &mut FdsCmsg<N>) -> libc::msghdr {
    libc::msghdr {
        msg_name: std::ptr::null_mut(),
        msg_namelen: 0,
        msg_iov: iov,
        msg_iovlen: 1,
        msg_control: (control as *mut FdsCmsg<N>).cast(),
        msg_controllen: std::mem::size_of::<FdsCmsg<N>>(),
        msg_flags: 0,
    }
}

/// recvmsg, restarted on EINTR, with received fds close-on-exec.
fn recvmsg_cloexec(channel: &OwnedFd, msg: &mut libc::msghdr) -> io::Result<usize> {
    loop {
        // SAFETY: the kernel writes into the live buffers `msg` points at;
        // MSG_CMSG_CLOEXEC makes received fds close-on-exec atomically.
        let n = unsafe { libc::recvmsg(channel.as_raw_fd(), msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

/// Takes ownership of fds the kernel just installed in this process.
fn own_received(fds: &[RawFd]) -> Vec<OwnedFd> {
    fds.iter()
        // SAFETY: each fd was installed by the kernel for this recvmsg and
        // nothing else in this process knows its number yet.
        .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect()
}

/// Sends one fd with SCM_RIGHTS, without allocating: it runs between fork
/// and exec.
pub(crate) fn send_fd(channel: RawFd, fd: RawFd) -> io::Result<()> {
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    let mut control = FdsCmsg::<1>::empty();
    control.hdr = libc::cmsghdr {
        cmsg_len: FdsCmsg::<1>::len_for(1),
        cmsg_level: libc::SOL_SOCKET,
        cmsg_type: libc::SCM_RIGHTS,
    };
    control.fds = [fd];
    let msg = msghdr_for(&mut iov, &mut control);
    // SAFETY: the kernel reads the message from `byte` and `control`, which
    // live on this stack frame past the call.
    if unsafe { libc::sendmsg(channel, &msg, libc::MSG_NOSIGNAL) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Receives one fd sent with SCM_RIGHTS. `Ok(None)` when the peer closed
/// the channel without sending one.
pub fn recv_fd(channel: &OwnedFd) -> io::Result<Option<OwnedFd>> {
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    let mut control = FdsCmsg::<1>::empty();
    let mut msg = msghdr_for(&mut iov, &mut control);
    let n = recvmsg_cloexec(channel, &mut msg)?;
    let received = msg.msg_controllen;
    let fds = control
        .rights(received)
        .map_err(|what| io::Error::new(io::ErrorKind::InvalidData, what))?;
    let mut fds = own_received(fds);
    if n == 0 || fds.is_empty() {
        return Ok(None);
    }
    Ok(fds.pop())
}

/// The most fds [`recv_with_fds`] accepts in one message; any beyond are
/// closed by the kernel (MSG_CTRUNC) and the message is refused.
pub const MAX_FDS: usize = 8;

/// Receives one message of at most `max_len` bytes with the fds sent along
/// with SCM_RIGHTS (close-on-exec), in the order the sender gave them.
/// A message whose control data was truncated is refused, its fds closed.
pub fn recv_with_fds(channel: &OwnedFd, max_len: usize) -> io::Result<(Vec<u8>, Vec<OwnedFd>)> {
    let mut data = vec![0u8; max_len.max(1)];
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    let mut control = FdsCmsg::<MAX_FDS>::empty();
    let mut msg = msghdr_for(&mut iov, &mut control);
    let n = recvmsg_cloexec(channel, &mut msg)?;
    let (received, flags) = (msg.msg_controllen, msg.msg_flags);
    let fds = control
        .rights(received)
        .map_err(|what| io::Error::new(io::ErrorKind::InvalidData, what))?;
    // Owned before any refusal, so that they are closed with it.
    let fds = own_received(fds);
    if flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("more than {MAX_FDS} file descriptors in one message"),
        ));
    }
    data.truncate(n);
    Ok((data, fds))
}

/// Starts writing a range of `file`'s dirty pages back to its disk, without
/// waiting for it: a later fsync then waits only for what is still in flight.
pub fn start_writeback(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    };
    // SAFETY: sync_file_range takes a descriptor we hold open and integers;
    // it touches no memory of ours.
    let r = unsafe {
        libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE)
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
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
    fn control_messages_are_laid_out_as_the_cmsg_macros_say() {
        let int = std::mem::size_of::<std::os::fd::RawFd>() as u32;
        // SAFETY: CMSG_SPACE only computes a size.
        let one = unsafe { libc::CMSG_SPACE(int) } as usize;
        // SAFETY: CMSG_SPACE only computes a size.
        let max = unsafe { libc::CMSG_SPACE(int * super::MAX_FDS as u32) } as usize;
        // SAFETY: CMSG_LEN only computes a size.
        let len = unsafe { libc::CMSG_LEN(int) } as usize;
        assert_eq!(std::mem::size_of::<super::FdsCmsg<1>>(), one);
        assert_eq!(
            std::mem::size_of::<super::FdsCmsg<{ super::MAX_FDS }>>(),
            max
        );
        assert_eq!(super::FdsCmsg::<1>::len_for(1), len);
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

    #[test]
    fn writeback_starts_on_a_written_range_and_refuses_a_negative_one() {
        use std::io::Write;
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&[7u8; 8192]).unwrap();
        super::start_writeback(&file, 0, 8192).unwrap();
        let err = super::start_writeback(&file, u64::MAX, 1).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
    }
}
