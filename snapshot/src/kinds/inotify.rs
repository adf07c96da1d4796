//! inotify: every watch with its path and mask, under the watch
//! descriptor the application knows.
//!
//! fdinfo lists each watch's inode, device and file handle; the path is
//! found by opening the handle on a mount of that device (which needs
//! CAP_DAC_READ_SEARCH) and reading the link of the opened file, then
//! checked against the inode as the process sees it. A restore sets the
//! next watch descriptor (`INOTIFY_IOC_SETNEXTWD`, as CRIU does where the
//! kernel has it) before each add, so numbers survive gaps without dummy
//! watches, whose removal would queue IN_IGNORED events the application
//! never caused. Events queued but not read when saved are lost.

use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::MetadataExt;

use appshot_sys::handle::open_by_handle_at;

use crate::error::{RestoreError, SnapshotError};
use crate::image::model::{FdKind, InotifyWatch};
use crate::ptrace::{Injector, Memory};

/// `_IOW('I', 0, __s32)`.
const INOTIFY_IOC_SETNEXTWD: u64 = 0x4004_4900;

/// One `inotify wd:…` line of fdinfo.
#[derive(Debug, PartialEq, Eq)]
struct Mark {
    wd: i32,
    ino: u64,
    /// The kernel's dev_t: major in the bits above 20, minor below.
    sdev: u64,
    mask: u32,
    handle_type: i32,
    handle: Vec<u8>,
}

pub fn save(pid: u32, fd: i32, info: &str, flags: i32) -> Result<FdKind, SnapshotError> {
    let marks = parse(info).ok_or_else(|| SnapshotError::UnsupportedFd {
        pid,
        fd,
        what: "inotify with unreadable fdinfo".into(),
    })?;
    let mut watches = Vec::with_capacity(marks.len());
    for m in marks {
        watches.push(InotifyWatch {
            wd: m.wd,
            path: path_of(pid, &m).map_err(|why| SnapshotError::Unsupported {
                pid,
                what: format!(
                    "fd {fd}: inotify watch {} (inode {} on device {}:{}): {why}",
                    m.wd,
                    m.ino,
                    m.sdev >> 20,
                    m.sdev & 0xfffff
                ),
            })?,
            mask: m.mask,
        });
    }
    watches.sort_by_key(|w| w.wd);
    Ok(FdKind::Inotify { flags, watches })
}

fn parse(info: &str) -> Option<Vec<Mark>> {
    let mut out = Vec::new();
    for line in info.lines() {
        let Some(rest) = line.strip_prefix("inotify ") else {
            continue;
        };
        let get = |key: &str| {
            rest.split_whitespace()
                .find_map(|w| w.strip_prefix(key)?.strip_prefix(':'))
        };
        let hex = |key: &str| u64::from_str_radix(get(key)?, 16).ok();
        let text = get("f_handle")?;
        let handle = (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
            .collect::<Option<Vec<u8>>>()?;
        if handle.len() as u64 != hex("fhandle-bytes")? {
            return None;
        }
        out.push(Mark {
            wd: hex("wd")? as i32,
            ino: hex("ino")?,
            sdev: hex("sdev")?,
            mask: hex("mask")? as u32,
            handle_type: hex("fhandle-type")? as i32,
            handle,
        });
    }
    Some(out)
}

/// The path of the watched file as process `pid` sees it.
fn path_of(pid: u32, m: &Mark) -> Result<String, String> {
    let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))
        .map_err(|e| format!("reading mountinfo: {e}"))?;
    let dev = format!("{}:{}", m.sdev >> 20, m.sdev & 0xfffff);
    let mut last = "no mount of its device".to_string();
    for mount_point in mounts_of(&mountinfo, &dev) {
        let mount = match std::fs::File::open(format!("/proc/{pid}/root{mount_point}")) {
            Ok(f) => f,
            Err(e) => {
                last = format!("opening mount {mount_point}: {e}");
                continue;
            }
        };
        let file = match open_by_handle_at(mount.as_fd(), m.handle_type, &m.handle, libc::O_PATH) {
            Ok(f) => f,
            Err(e) => {
                last = format!("open_by_handle_at on mount {mount_point}: {e}");
                continue;
            }
        };
        let path = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
            .map_err(|e| format!("reading the link of its handle: {e}"))?
            .to_string_lossy()
            .into_owned();
        match std::fs::metadata(format!("/proc/{pid}/root{path}")) {
            Ok(meta) if meta.ino() == m.ino => return Ok(path),
            _ => last = format!("found as {path}, which the process does not see as that inode"),
        }
    }
    Err(last)
}

/// Mount points (unescaped) of the mounts of device `dev` ("major:minor").
fn mounts_of(mountinfo: &str, dev: &str) -> Vec<String> {
    mountinfo
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f.get(2) == Some(&dev)).then(|| unescape(f.get(4).copied().unwrap_or("")))
        })
        .collect()
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let code = b.get(i + 1..i + 4).and_then(|o| {
            std::str::from_utf8(o)
                .ok()
                .and_then(|o| u8::from_str_radix(o, 8).ok())
        });
        match (b[i], code) {
            (b'\\', Some(c)) => {
                out.push(c);
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Creates the inotify instance in process `pid` (close-on-exec, its other
/// flags are the caller's) with its watches, and returns its fd there.
pub fn restore(
    inj: &Injector,
    mem: &Memory,
    pid: u32,
    data: u64,
    fd: i32,
    watches: &[InotifyWatch],
) -> Result<u64, SnapshotError> {
    let ifd = inj.ok(
        pid,
        &format!("inotify_init1 for fd {fd}"),
        libc::SYS_inotify_init1,
        &[libc::IN_CLOEXEC as u64],
    )?;
    for w in watches {
        inj.ok(
            pid,
            &format!("INOTIFY_IOC_SETNEXTWD {} for inotify fd {fd}", w.wd),
            libc::SYS_ioctl,
            &[ifd, INOTIFY_IOC_SETNEXTWD, w.wd as u64],
        )?;
        let mut path = w.path.as_bytes().to_vec();
        path.push(0);
        mem.write(data, &path)?;
        let got = inj.ok(
            pid,
            &format!("inotify fd {fd}: watching {}", w.path),
            libc::SYS_inotify_add_watch,
            &[ifd, data, w.mask as u64],
        )?;
        if got != w.wd as u64 {
            return Err(RestoreError::Fd {
                fd,
                what: format!(
                    "inotify: the watch of {} became wd {got}, not {}",
                    w.path, w.wd
                ),
            }
            .into());
        }
    }
    Ok(ifd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inotify_fdinfo() {
        let info = "pos:\t0\nflags:\t04000\nmnt_id:\t17\nino:\t1038\n\
            inotify wd:1b ino:13 sdev:fe00000 mask:40000002 ignored_mask:0 fhandle-bytes:8 fhandle-type:1 f_handle:1300000000000000\n\
            inotify wd:2 ino:25a sdev:800001 mask:2 ignored_mask:0 fhandle-bytes:8 fhandle-type:1 f_handle:5a020000ba0fd594\n";
        let marks = parse(info).unwrap();
        assert_eq!(marks.len(), 2);
        assert_eq!(
            marks[0],
            Mark {
                wd: 27,
                ino: 0x13,
                sdev: 0xfe00000,
                mask: 0x4000_0002,
                handle_type: 1,
                handle: vec![0x13, 0, 0, 0, 0, 0, 0, 0],
            }
        );
        assert_eq!(marks[1].sdev >> 20, 8);
        assert_eq!(marks[1].sdev & 0xfffff, 1);
        assert!(parse(
            "inotify wd:1 ino:13 sdev:fe00000 mask:2 fhandle-bytes:8 fhandle-type:1 f_handle:13\n"
        )
        .is_none());
        assert_eq!(parse("pos:\t0\n").unwrap(), vec![]);
    }

    #[test]
    fn mount_points_of_a_device() {
        let info = "22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n\
                    23 22 0:21 / /proc rw - proc proc rw\n\
                    40 22 254:0 /srv /my\\040data rw - ext4 /dev/vda rw\n";
        assert_eq!(mounts_of(info, "254:0"), vec!["/", "/my data"]);
        assert_eq!(mounts_of(info, "0:99"), Vec::<String>::new());
    }
}
