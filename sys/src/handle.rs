//! open_by_handle_at: turning a file handle the kernel reported (in an
//! inotify watch's fdinfo) back into an open file, to learn its path.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// MAX_HANDLE_SZ of <linux/exportfs.h>.
const MAX_HANDLE_SZ: usize = 128;

/// `struct file_handle` with room for the largest handle any filesystem
/// makes (its `f_handle` is a flexible array in C).
#[repr(C)]
struct FileHandle {
    handle_bytes: u32,
    handle_type: i32,
    f_handle: [u8; MAX_HANDLE_SZ],
}

/// Opens the file that `handle` (of type `handle_type`) names on the
/// filesystem `mount` lies on, with `flags` (`O_PATH` to only name it).
/// Needs CAP_DAC_READ_SEARCH.
pub fn open_by_handle_at(
    mount: BorrowedFd<'_>,
    handle_type: i32,
    handle: &[u8],
    flags: i32,
) -> io::Result<OwnedFd> {
    if handle.len() > MAX_HANDLE_SZ {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let mut fh = FileHandle {
        handle_bytes: handle.len() as u32,
        handle_type,
        f_handle: [0; MAX_HANDLE_SZ],
    };
    fh.f_handle[..handle.len()].copy_from_slice(handle);
    // SAFETY: `fh` is a complete file_handle whose handle_bytes does not
    // exceed its array; the kernel only reads it, and returns a new fd or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_by_handle_at,
            mount.as_raw_fd(),
            &fh as *const FileHandle,
            flags,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd, owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn a_handle_from_name_to_handle_at_opens_the_same_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"x").unwrap();
        let mut fh = FileHandle {
            handle_bytes: MAX_HANDLE_SZ as u32,
            handle_type: 0,
            f_handle: [0; MAX_HANDLE_SZ],
        };
        let mut mount_id = 0i32;
        let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
        // SAFETY: a valid path, a file_handle with room for MAX_HANDLE_SZ
        // bytes, and an int for the mount id.
        let r = unsafe {
            libc::syscall(
                libc::SYS_name_to_handle_at,
                libc::AT_FDCWD,
                c.as_ptr(),
                &mut fh as *mut FileHandle,
                &mut mount_id as *mut i32,
                0,
            )
        };
        if r != 0 {
            eprintln!("SKIP: no file handles here: {}", io::Error::last_os_error());
            return;
        }
        let mount = std::fs::File::open(dir.path()).unwrap();
        let bytes = &fh.f_handle[..fh.handle_bytes as usize];
        let f = match open_by_handle_at(mount.as_fd(), fh.handle_type, bytes, libc::O_PATH) {
            Ok(f) => f,
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                eprintln!("SKIP: open_by_handle_at needs CAP_DAC_READ_SEARCH");
                return;
            }
            Err(e) => panic!("open_by_handle_at: {e}"),
        };
        let got = std::fs::read_link(format!("/proc/self/fd/{}", f.as_raw_fd())).unwrap();
        assert_eq!(got, path);
    }
}
