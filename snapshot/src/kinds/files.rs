//! Files opened by path: saved as the path with what identifies the file
//! (inode, size, mtime) and the fd's flags and offset, reopened by path on
//! restore and put back at the offset.

use std::os::unix::fs::MetadataExt;

use super::Stub;
use crate::error::SnapshotError;
use crate::image::model::{FdImage, FdKind, FileRef, VmaKind};
use crate::image::Image;

pub(crate) fn file_ref(path: &str, pid: u32) -> Result<FileRef, SnapshotError> {
    let meta = std::fs::metadata(path)
        .map_err(|e| SnapshotError::process(pid, format!("stat {path}"), e))?;
    Ok(FileRef {
        path: path.to_string(),
        size: meta.size(),
        mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
        ino: meta.ino(),
    })
}

/// The fd of process `pid` open on `link` (an absolute path), with its
/// status `flags` and offset `pos`.
pub fn save(pid: u32, link: &str, flags: i32, pos: u64) -> Result<FdKind, SnapshotError> {
    Ok(FdKind::Path {
        file: file_ref(link, pid)?,
        flags,
        pos,
    })
}

/// Checks that every file the image maps or opens is still there and, for
/// mapped files, unchanged. Runs before anything is created.
pub fn check_files(image: &Image) -> Result<(), SnapshotError> {
    for p in &image.manifest.processes {
        let strict = std::iter::once(&p.exe).chain(p.vmas.iter().filter_map(|v| match &v.kind {
            VmaKind::File { file, .. } => Some(file),
            _ => None,
        }));
        for f in strict {
            let meta = std::fs::metadata(&f.path).map_err(|e| SnapshotError::FileChanged {
                path: f.path.clone(),
                why: format!("missing ({e})"),
            })?;
            let mtime = meta.mtime() * 1_000_000_000 + meta.mtime_nsec();
            if meta.ino() != f.ino || meta.size() != f.size || mtime != f.mtime_ns {
                return Err(SnapshotError::FileChanged {
                    path: f.path.clone(),
                    why: "changed since the snapshot (inode, size or mtime differ)".into(),
                });
            }
        }
        for fd in &p.fds {
            let (file, fifo) = match &fd.kind {
                FdKind::Path { file, .. } => (file, false),
                FdKind::Fifo { file, .. } => (file, true),
                _ => continue,
            };
            let meta = std::fs::metadata(&file.path).map_err(|e| SnapshotError::FileChanged {
                path: file.path.clone(),
                why: format!(
                    "open as fd {} of process {} but missing ({e})",
                    fd.fd, p.ns_pid
                ),
            })?;
            if fifo && !std::os::unix::fs::FileTypeExt::is_fifo(&meta.file_type()) {
                return Err(SnapshotError::FileChanged {
                    path: file.path.clone(),
                    why: format!(
                        "a FIFO open as fd {} of process {}, but no longer a FIFO",
                        fd.fd, p.ns_pid
                    ),
                });
            }
        }
    }
    Ok(())
}

/// Reopens the file of `f` (an `FdKind::Path`) in the stub at its fd and
/// offset.
pub fn restore(
    stub: &Stub,
    f: &FdImage,
    file: &FileRef,
    flags: i32,
    pos: u64,
) -> Result<(), SnapshotError> {
    let Stub {
        inj,
        mem,
        pid,
        data,
        ..
    } = *stub;
    let open_flags = flags & !(libc::O_CREAT | libc::O_TRUNC | libc::O_EXCL) | libc::O_CLOEXEC;
    let temp = (stub.to_high)(crate::restore::open_in(
        inj, mem, pid, data, &file.path, open_flags,
    )?)?;
    (stub.place)(temp, f, flags)?;
    inj.call(pid, libc::SYS_close, &[temp])?;
    if pos != 0 {
        inj.ok(
            pid,
            &format!("lseek fd {}", f.fd),
            libc::SYS_lseek,
            &[f.fd as u64, pos, libc::SEEK_SET as u64],
        )?;
    }
    Ok(())
}
