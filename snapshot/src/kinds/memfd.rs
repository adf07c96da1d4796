//! memfd objects (`memfd_create`), saved and restored side by side.
//!
//! A memfd is an anonymous file: fds and mappings of every process of the
//! instance may name the same one, so it is saved once for the instance
//! (its bytes that hold data, its size, name and seals) and fds and
//! mappings refer to it by inode. A restore creates it in the first
//! process that needs it and keeps it there under a high fd until every
//! process is rebuilt; later processes open it through that process's
//! `/proc/PID/fd` (the instance's own proc, so ns pids), which names the
//! same file. Seals are applied once everything is mapped.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};

use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::unistd::{lseek, Whence};

use super::Stub;
use crate::error::{RestoreError, SnapshotError};
use crate::image::model::{FdImage, FdKind, MemfdObject, PageRun};
use crate::image::{Image, ImageWriter, PAGE};
use crate::ptrace::{Injector, Memory};

/// Bytes read and written at once.
const CHUNK: u64 = 1 << 22;
/// How far above a process's own fds the object's fd is kept, clear of the
/// numbers a restore places and stashes there.
const HIGH_GAP: u64 = 64;

/// The name `memfd_create` was given, from a link or mapping name
/// (`/memfd:NAME (deleted)`), or `None` for anything else.
pub fn name_of(link: &str) -> Option<&str> {
    link.strip_prefix("/memfd:")?.strip_suffix(" (deleted)")
}

/// Where each object of the instance can be read from while it is frozen:
/// an fd or a mapping of the first process seen holding it.
#[derive(Default)]
pub struct Sources {
    by_inode: BTreeMap<u64, (u32, String, String)>,
}

impl Sources {
    /// `pid`'s fd `fd` names the memfd `name`; returns its inode.
    pub fn note_fd(&mut self, pid: u32, fd: i32, name: &str) -> Result<u64, SnapshotError> {
        let path = format!("/proc/{pid}/fd/{fd}");
        let inode = std::fs::metadata(&path)
            .map_err(|e| SnapshotError::process(pid, format!("stat {path}"), e))?
            .ino();
        self.by_inode
            .entry(inode)
            .or_insert((pid, path, name.to_string()));
        Ok(inode)
    }

    /// `pid` maps the memfd `name` (inode `inode`) at `start`-`end`.
    pub fn note_mapping(&mut self, pid: u32, start: u64, end: u64, inode: u64, name: &str) {
        self.by_inode.entry(inode).or_insert_with(|| {
            (
                pid,
                format!("/proc/{pid}/map_files/{start:x}-{end:x}"),
                name.to_string(),
            )
        });
    }

    /// Reads every object into the pages section: its runs of data (holes
    /// stay holes), size and seals.
    pub fn save(self, writer: &mut ImageWriter) -> Result<Vec<MemfdObject>, SnapshotError> {
        let mut out = Vec::new();
        for (inode, (pid, path, name)) in self.by_inode {
            let io = |what: &str, e: std::io::Error| {
                SnapshotError::process(pid, format!("{what} memfd {name} ({path})"), e)
            };
            let file = File::open(&path).map_err(|e| io("opening", e))?;
            let size = file.metadata().map_err(|e| io("stat of", e))?.len();
            let seals = fcntl(file.as_raw_fd(), FcntlArg::F_GET_SEALS)
                .map_err(|e| io("F_GET_SEALS on", e.into()))?;
            let mut runs = Vec::new();
            let mut buf = Vec::new();
            for (start, end) in extents(&file, size).map_err(|e| io("SEEK_DATA in", e))? {
                let mut at = start;
                while at < end {
                    let n = (end - at).min(CHUNK);
                    buf.resize(n as usize, 0);
                    let got = file.read_at(&mut buf, at).map_err(|e| io("reading", e))?;
                    // The file may end inside its last page.
                    buf[got..].fill(0);
                    let offset = writer.write_pages(&buf)?;
                    runs.push(PageRun {
                        addr: at,
                        pages: n / PAGE,
                        offset,
                        layer: 0,
                    });
                    at += n;
                }
            }
            out.push(MemfdObject {
                inode,
                name,
                size,
                seals,
                runs,
            });
        }
        Ok(out)
    }
}

/// Page-aligned runs of `file` that hold data, below `size` rounded up.
fn extents(file: &File, size: u64) -> std::io::Result<Vec<(u64, u64)>> {
    let end = size.div_ceil(PAGE) * PAGE;
    let mut runs = Vec::new();
    let mut at = 0u64;
    while at < end {
        let data = match lseek(file.as_raw_fd(), at as i64, Whence::SeekData) {
            Ok(d) => d as u64,
            Err(nix::errno::Errno::ENXIO) => break,
            Err(e) => return Err(e.into()),
        };
        if data >= end {
            break;
        }
        let hole = (lseek(file.as_raw_fd(), data as i64, Whence::SeekHole)? as u64).min(end);
        let start = data / PAGE * PAGE;
        let stop = hole.div_ceil(PAGE) * PAGE;
        runs.push((start, stop));
        at = stop;
    }
    Ok(runs)
}

/// The objects made so far in a restore: inode → (ns pid of the process
/// holding it, its fd there, that process's host pid), with the
/// supervisor's own handle on it for the seals.
#[derive(Default)]
pub struct Made {
    by_inode: HashMap<u64, (u32, u64, u32, File)>,
}

impl Made {
    /// An fd in process `pid` (host; `ns_pid` in the instance) for memfd
    /// `inode`, which the caller closes with [`Made::release`] when done.
    /// The first process asking creates the object and keeps it.
    #[allow(clippy::too_many_arguments)]
    pub fn fd_in(
        &mut self,
        inj: &Injector,
        mem: &Memory,
        pid: u32,
        ns_pid: u32,
        data: u64,
        image: &Image,
        inode: u64,
        highest_fd: u64,
    ) -> Result<u64, SnapshotError> {
        if let Some(&(owner, fd, _, _)) = self.by_inode.get(&inode) {
            let path = format!("/proc/{owner}/fd/{fd}");
            return crate::restore::open_in(
                inj,
                mem,
                pid,
                data,
                &path,
                libc::O_RDWR | libc::O_CLOEXEC,
            );
        }
        let obj = image
            .manifest
            .memfds
            .iter()
            .find(|o| o.inode == inode)
            .ok_or_else(|| RestoreError::Image {
                what: format!("has no memfd {inode}"),
            })?;
        let mut name = obj.name.as_bytes().to_vec();
        name.push(0);
        mem.write(data, &name)?;
        let flags = (libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) as u64;
        let created = inj.ok(
            pid,
            &format!("memfd_create {}", obj.name),
            libc::SYS_memfd_create,
            &[data, flags],
        )?;
        let fd = inj.ok(
            pid,
            "F_DUPFD_CLOEXEC of a memfd",
            libc::SYS_fcntl,
            &[created, libc::F_DUPFD_CLOEXEC as u64, highest_fd + HIGH_GAP],
        )?;
        inj.call(pid, libc::SYS_close, &[created])?;
        let path = format!("/proc/{pid}/fd/{fd}");
        let io = |what: &str, e: std::io::Error| {
            SnapshotError::process(pid, format!("{what} memfd {}", obj.name), e)
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| io("opening", e))?;
        file.set_len(obj.size).map_err(|e| io("sizing", e))?;
        let mut buf = Vec::new();
        for run in &obj.runs {
            let len = (run.pages * PAGE).min(obj.size.saturating_sub(run.addr));
            buf.resize(len as usize, 0);
            image.read_pages(run.offset, &mut buf)?;
            file.write_all_at(&buf, run.addr)
                .map_err(|e| io("filling", e))?;
        }
        self.by_inode.insert(inode, (ns_pid, fd, pid, file));
        Ok(fd)
    }

    /// Opens the memfd of `f` (an `FdKind::Memfd`) in the stub (`ns_pid`
    /// in the instance) at its fd and offset; `highest_fd` as for
    /// [`Made::fd_in`].
    pub fn restore_fd(
        &mut self,
        stub: &Stub,
        f: &FdImage,
        image: &Image,
        ns_pid: u32,
        highest_fd: u64,
    ) -> Result<(), SnapshotError> {
        let FdKind::Memfd { inode, flags, pos } = &f.kind else {
            return Ok(());
        };
        let Stub {
            inj,
            mem,
            pid,
            data,
            ..
        } = *stub;
        let object = self.fd_in(inj, mem, pid, ns_pid, data, image, *inode, highest_fd)?;
        // A description of its own, as the application's was.
        let path = format!("/proc/self/fd/{object}");
        let open_flags = flags & !libc::O_CREAT | libc::O_CLOEXEC;
        let temp = (stub.to_high)(crate::restore::open_in(
            inj, mem, pid, data, &path, open_flags,
        )?)?;
        self.release(inj, pid, *inode, object)?;
        (stub.place)(temp, f, *flags)?;
        inj.call(pid, libc::SYS_close, &[temp])?;
        inj.ok(
            pid,
            &format!("lseek fd {}", f.fd),
            libc::SYS_lseek,
            &[f.fd as u64, *pos, libc::SEEK_SET as u64],
        )?;
        Ok(())
    }

    /// Closes an fd [`Made::fd_in`] gave, unless it is the object's own.
    pub fn release(
        &self,
        inj: &Injector,
        pid: u32,
        inode: u64,
        fd: u64,
    ) -> Result<(), SnapshotError> {
        if self
            .by_inode
            .get(&inode)
            .is_some_and(|&(_, own, host, _)| own == fd && host == pid)
        {
            return Ok(());
        }
        inj.call(pid, libc::SYS_close, &[fd])?;
        Ok(())
    }

    /// Once every process has its fds and mappings: the seals, then each
    /// object's fd closed in the process that held it (`inj_for` gives the
    /// injector of a host pid).
    pub fn finish<'a>(
        self,
        image: &Image,
        inj_for: impl Fn(u32) -> Option<Injector<'a>>,
    ) -> Result<(), SnapshotError> {
        for (inode, (_, fd, host, file)) in self.by_inode {
            let seals = image
                .manifest
                .memfds
                .iter()
                .find(|o| o.inode == inode)
                .map_or(0, |o| o.seals);
            if seals != 0 {
                fcntl(
                    file.as_raw_fd(),
                    FcntlArg::F_ADD_SEALS(SealFlag::from_bits_truncate(seals)),
                )
                .map_err(|e| SnapshotError::process(host, "F_ADD_SEALS on a memfd", e))?;
            }
            if let Some(inj) = inj_for(host) {
                inj.call(host, libc::SYS_close, &[fd])?;
            }
        }
        Ok(())
    }
}
