//! timerfd: saved from its fdinfo (clock, time left, period, expirations
//! not read yet), restored armed relative to the restore with the time it
//! had left, so it fires once at the moment it would have had the process
//! not been stopped; the unread expirations are put back with
//! `TFD_IOC_SET_TICKS`, as CRIU does.
//!
//! A periodic timer that expired and was not read since is stopped in the
//! kernel, which counts the periods missed only when it is read: fdinfo
//! shows one tick and no time left. Such a timer is read (from a duplicate
//! of its fd) to count them and restart it, and its count put back at once.

use std::os::fd::{AsFd, AsRawFd};

use appshot_sys::pidfd;
use appshot_sys::timerfd::{set_ticks, TFD_IOC_SET_TICKS};

use super::{field, itimerspec};
use crate::error::SnapshotError;
use crate::image::model::{FdImage, FdKind, TimerFd, TimerTime};
use crate::ptrace::{Injector, Memory};

const TFD_CLOEXEC: u64 = libc::O_CLOEXEC as u64;
const TFD_TIMER_CANCEL_ON_SET: u32 = 2;

/// The timerfd `fd` of process `pid`, from its fdinfo `info`.
pub fn save(pid: u32, fd: i32, info: &str, flags: i32) -> Result<FdKind, SnapshotError> {
    let unsupported = |what: &str| SnapshotError::UnsupportedFd {
        pid,
        fd,
        what: format!("timerfd {what}"),
    };
    let (clockid, settime, time, ticks) =
        parse(info).ok_or_else(|| unsupported("with unreadable fdinfo"))?;
    // Cancelling on a clock change needs an absolute deadline on the
    // realtime clock, which a relative re-arm does not keep.
    if settime & TFD_TIMER_CANCEL_ON_SET != 0 {
        return Err(unsupported(
            "armed with TFD_TIMER_CANCEL_ON_SET cannot be saved yet",
        ));
    }
    Ok(FdKind::TimerFd(TimerFd {
        clockid,
        flags,
        time,
        ticks,
    }))
}

/// Brings the periodic timerfds among `fds` of process `pid` that expired
/// unread up to date (see the module comment). Run once nothing can refuse
/// the snapshot any more: the process's timers are touched, though left
/// as they would have been.
pub fn catch_up(pid: u32, fds: &mut [FdImage]) -> Result<(), SnapshotError> {
    let mut pfd = None;
    for f in fds {
        let FdKind::TimerFd(t) = &mut f.kind else {
            continue;
        };
        if t.ticks == 0 || t.time.interval_ns == 0 {
            continue;
        }
        let fd = f.fd;
        let err = |what: &str, e: std::io::Error| {
            SnapshotError::process(pid, format!("fd {fd}: timerfd {what}"), e)
        };
        let pfd = match &mut pfd {
            Some(p) => p,
            None => pfd.insert(pidfd::open_thread(pid).map_err(|e| err("pidfd_open", e))?),
        };
        let ours = pidfd::get_fd(pfd, fd).map_err(|e| err("pidfd_getfd", e))?;
        // Does not block: there are ticks to read.
        let mut count = [0u8; 8];
        let n = nix::unistd::read(ours.as_raw_fd(), &mut count)
            .map_err(|e| err("read of expirations", e.into()))?;
        if n != 8 {
            return Err(err(
                "read of expirations",
                std::io::ErrorKind::UnexpectedEof.into(),
            ));
        }
        let ticks = u64::from_ne_bytes(count);
        set_ticks(ours.as_fd(), ticks).map_err(|e| err("TFD_IOC_SET_TICKS", e))?;
        let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}"))
            .map_err(|e| err("fdinfo", e))?;
        let (_, _, time, _) =
            parse(&info).ok_or_else(|| err("fdinfo", std::io::ErrorKind::InvalidData.into()))?;
        t.time = time;
        t.ticks = ticks;
    }
    Ok(())
}

/// (clockid, settime flags, time left and period, ticks).
fn parse(info: &str) -> Option<(i32, u32, TimerTime, u64)> {
    let pair = |key: &str| -> Option<u64> {
        let (s, ns) = field(info, key)?
            .strip_prefix('(')?
            .strip_suffix(')')?
            .split_once(',')?;
        Some(s.trim().parse::<u64>().ok()? * 1_000_000_000 + ns.trim().parse::<u64>().ok()?)
    };
    Some((
        field(info, "clockid")?.parse().ok()?,
        u32::from_str_radix(field(info, "settime flags")?, 8).ok()?,
        TimerTime {
            value_ns: pair("it_value")?,
            interval_ns: pair("it_interval")?,
        },
        field(info, "ticks")?.parse().ok()?,
    ))
}

/// Creates the timerfd in process `pid` (close-on-exec, its other flags
/// are the caller's) and returns its fd there; `data` is scratch memory.
pub fn restore(
    inj: &Injector,
    mem: &Memory,
    pid: u32,
    data: u64,
    fd: i32,
    t: &TimerFd,
) -> Result<u64, SnapshotError> {
    let TimerFd {
        clockid,
        time,
        ticks,
        ..
    } = *t;
    let tfd = inj.ok(
        pid,
        &format!("timerfd_create for fd {fd} (clock {clockid})"),
        libc::SYS_timerfd_create,
        &[clockid as u64, TFD_CLOEXEC],
    )?;
    if time.value_ns != 0 {
        mem.write_value(data, &itimerspec(time))?;
        inj.ok(
            pid,
            &format!("timerfd_settime for fd {fd}"),
            libc::SYS_timerfd_settime,
            &[tfd, 0, data, 0],
        )?;
    }
    if ticks != 0 {
        mem.write(data, &ticks.to_ne_bytes())?;
        inj.ok(
            pid,
            &format!("TFD_IOC_SET_TICKS for timerfd fd {fd}"),
            libc::SYS_ioctl,
            &[tfd, TFD_IOC_SET_TICKS, data],
        )?;
    }
    Ok(tfd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timerfd_fdinfo() {
        let info = "pos:\t0\nflags:\t02004002\nmnt_id:\t17\nino:\t1038\nclockid: 1\nticks: 7\n\
                    settime flags: 00\nit_value: (4, 997941260)\nit_interval: (1, 0)\n";
        let (clock, settime, time, ticks) = parse(info).unwrap();
        assert_eq!((clock, settime, ticks), (1, 0, 7));
        assert_eq!(time.value_ns, 4_997_941_260);
        assert_eq!(time.interval_ns, 1_000_000_000);
        let cancel = info.replace("settime flags: 00", "settime flags: 03");
        assert!(matches!(
            save(9, 4, &cancel, 0),
            Err(SnapshotError::UnsupportedFd { pid: 9, fd: 4, what }) if what.contains("CANCEL_ON_SET")
        ));
        assert!(parse("pos:\t0\nclockid: 1\n").is_none());
    }
}
