//! Parsers for the /proc files a dump reads. Pure text work, unit-tested.

use crate::image::model::{EpollTarget, MmFields};

/// One line of /proc/PID/maps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapsLine {
    pub start: u64,
    pub end: u64,
    pub read: bool,
    pub write: bool,
    pub exec: bool,
    pub shared: bool,
    pub offset: u64,
    pub inode: u64,
    /// Path, `[heap]`-style name, or empty for anonymous memory.
    pub name: String,
}

impl MapsLine {
    pub fn prot(&self) -> u32 {
        let mut p = 0;
        if self.read {
            p |= libc::PROT_READ as u32;
        }
        if self.write {
            p |= libc::PROT_WRITE as u32;
        }
        if self.exec {
            p |= libc::PROT_EXEC as u32;
        }
        p
    }
}

pub fn maps(text: &str) -> Option<Vec<MapsLine>> {
    text.lines()
        .filter(|l| !l.is_empty())
        .map(maps_line)
        .collect()
}

fn maps_line(line: &str) -> Option<MapsLine> {
    let mut it = line.splitn(6, ' ');
    let range = it.next()?;
    let perms = it.next()?.as_bytes();
    let offset = u64::from_str_radix(it.next()?, 16).ok()?;
    let _dev = it.next()?;
    let inode = it.next()?.parse().ok()?;
    let name = it.next().unwrap_or("").trim_start().to_string();
    let (s, e) = range.split_once('-')?;
    if perms.len() != 4 {
        return None;
    }
    Some(MapsLine {
        start: u64::from_str_radix(s, 16).ok()?,
        end: u64::from_str_radix(e, 16).ok()?,
        read: perms[0] == b'r',
        write: perms[1] == b'w',
        exec: perms[2] == b'x',
        shared: perms[3] == b's',
        offset,
        inode,
        name,
    })
}

/// Each mapping's VmFlags line in /proc/PID/smaps (two-letter codes
/// separated by spaces), by the mapping's start address.
pub fn smaps_vm_flags(text: &str) -> Option<Vec<(u64, String)>> {
    let mut out = Vec::new();
    let mut current = None;
    for line in text.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some(flags) = line.strip_prefix("VmFlags:") {
            out.push((current?, flags.trim().to_string()));
        } else if !first.ends_with(':') && first.contains('-') {
            current = Some(maps_line(line)?.start);
        }
    }
    Some(out)
}

/// The memory-layout fields of /proc/PID/stat (fields 26–28 and 45–51);
/// `brk` is not there and is filled in by the caller.
pub fn stat_mm(text: &str) -> Option<MmFields> {
    // The command name may hold spaces and parentheses; fields start after
    // the last ')'.
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state).
    let field = |n: usize| f.get(n - 3).and_then(|v| v.parse::<u64>().ok());
    Some(MmFields {
        start_code: field(26)?,
        end_code: field(27)?,
        start_stack: field(28)?,
        start_data: field(45)?,
        end_data: field(46)?,
        start_brk: field(47)?,
        brk: 0,
        arg_start: field(48)?,
        arg_end: field(49)?,
        env_start: field(50)?,
        env_end: field(51)?,
    })
}

/// A `Key:\tvalue` field of /proc/PID/status.
pub fn status_field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .map(str::trim)
}

/// The fields of /proc/PID/fdinfo/FD that a dump uses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FdInfo {
    pub pos: u64,
    /// Octal in the file.
    pub flags: i32,
    pub epoll: Vec<EpollTarget>,
    pub eventfd_count: Option<u64>,
    pub eventfd_semaphore: bool,
}

pub fn fdinfo(text: &str) -> Option<FdInfo> {
    let mut info = FdInfo::default();
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("pos:") {
            info.pos = v.trim().parse().ok()?;
        } else if let Some(v) = line.strip_prefix("flags:") {
            info.flags = i32::from_str_radix(v.trim(), 8).ok()?;
        } else if let Some(v) = line.strip_prefix("eventfd-count:") {
            info.eventfd_count = Some(u64::from_str_radix(v.trim(), 16).ok()?);
        } else if let Some(v) = line.strip_prefix("eventfd-semaphore:") {
            info.eventfd_semaphore = v.trim() == "1";
        } else if line.starts_with("tfd:") {
            let words: Vec<&str> = line.split_whitespace().collect();
            let after = |key: &str| {
                words
                    .iter()
                    .position(|w| *w == key)
                    .and_then(|i| words.get(i + 1))
                    .copied()
            };
            info.epoll.push(EpollTarget {
                fd: after("tfd:")?.parse().ok()?,
                events: u32::from_str_radix(after("events:")?, 16).ok()?,
                data: u64::from_str_radix(after("data:")?, 16).ok()?,
            });
        }
    }
    Some(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_lines() {
        let m = maps(
            "55d0c0a00000-55d0c0a28000 r--p 00000000 fe:01 1312 /usr/bin/redis-server\n\
             7f18bf5f3000-7f18bf5f5000 r-xp 00000000 00:00 0                          [vdso]\n\
             7f00000000-7f00001000 rw-s 00001000 00:05 77 /memfd:x (deleted)\n\
             7ffeeb1a5000-7ffeeb1c6000 rw-p 00000000 00:00 0\n",
        )
        .unwrap();
        assert_eq!(m.len(), 4);
        assert_eq!(m[0].name, "/usr/bin/redis-server");
        assert_eq!(
            (m[0].start, m[0].end, m[0].prot()),
            (0x55d0c0a00000, 0x55d0c0a28000, 1)
        );
        assert_eq!(m[1].name, "[vdso]");
        assert!(m[1].exec && !m[1].write);
        assert!(m[2].shared && m[2].offset == 0x1000 && m[2].name == "/memfd:x (deleted)");
        assert_eq!(m[3].name, "");
        assert!(maps("zz-1 r--p 0 0:0 0\n").is_none());
    }

    #[test]
    fn stat_with_awkward_name() {
        let mut fields: Vec<String> = (3..=52).map(|i| i.to_string()).collect();
        fields[0] = "S".into();
        let text = format!("42 (a) b (c)) {}", fields.join(" "));
        let mm = stat_mm(&text).unwrap();
        assert_eq!((mm.start_code, mm.end_code, mm.start_stack), (26, 27, 28));
        assert_eq!((mm.start_data, mm.arg_start, mm.env_end), (45, 48, 51));
    }

    #[test]
    fn fdinfo_epoll_and_eventfd() {
        let e = fdinfo(
            "pos:\t0\nflags:\t02000002\nmnt_id:\t17\nino:\t1038\n\
             tfd:        6 events:       19 data:                6  pos:0 ino:2ffe sdev:9\n\
             tfd:        3 events: 80000019 data: ffffffffffffffff  pos:0 ino:2ffb sdev:f\n",
        )
        .unwrap();
        assert_eq!(e.flags, 0o2000002);
        assert_eq!(e.epoll.len(), 2);
        assert_eq!(
            e.epoll[1],
            EpollTarget {
                fd: 3,
                events: 0x8000_0019,
                data: u64::MAX
            }
        );
        let ev = fdinfo(
            "pos:\t0\nflags:\t02004002\neventfd-count:               2a\neventfd-semaphore: 1\n",
        )
        .unwrap();
        assert_eq!((ev.eventfd_count, ev.eventfd_semaphore), (Some(42), true));
        assert_eq!(fdinfo("pos:\t12345\nflags:\t0100002\n").unwrap().pos, 12345);
    }

    #[test]
    fn smaps_vm_flags_by_mapping() {
        let text = "55d0c0a00000-55d0c0a28000 r--p 00000000 fe:01 1312 /usr/bin/x\n\
             Size:                160 kB\n\
             VmFlags: rd mr mw me sd\n\
             7ffeeb100000-7ffeeb1a5000 rw-p 00000000 00:00 0\n\
             Size:                660 kB\n\
             Rss:                   8 kB\n\
             VmFlags: rd wr mr mw me gd ac hg \n\
             7ffeeb1a5000-7ffeeb1c6000 rw-p 00000000 00:00 0                          [stack]\n\
             Size:                132 kB\n\
             VmFlags: rd wr mr mw me gd ac\n";
        assert_eq!(
            smaps_vm_flags(text),
            Some(vec![
                (0x55d0c0a00000, "rd mr mw me sd".to_string()),
                (0x7ffeeb100000, "rd wr mr mw me gd ac hg".to_string()),
                (0x7ffeeb1a5000, "rd wr mr mw me gd ac".to_string()),
            ])
        );
        assert_eq!(smaps_vm_flags("VmFlags: rd gd\n"), None);
        assert_eq!(smaps_vm_flags(""), Some(vec![]));
    }

    #[test]
    fn status_fields() {
        let s = "Name:\tredis\nUmask:\t0022\nUid:\t0\t0\t0\t0\n";
        assert_eq!(status_field(s, "Umask"), Some("0022"));
        assert_eq!(status_field(s, "Uid"), Some("0\t0\t0\t0"));
        assert_eq!(status_field(s, "Gid"), None);
    }
}
