//! The object kinds a snapshot holds, one module each, with its save and
//! its restore side by side (firecracker's `Persist` per component is the
//! model): `dump` and `restore` orchestrate, the kinds know their objects.

pub mod creds;
pub mod events;
pub mod files;
pub mod inotify;
pub mod itimer;
pub mod memfd;
pub mod memory;
pub mod pipes;
pub mod posix_timer;
pub mod signalfd;
pub mod signals;
pub mod sysv;
pub mod tcp;
pub mod threads;
pub mod timerfd;
pub mod tree;
pub mod udp;
pub mod unix;

use crate::error::SnapshotError;
use crate::image::model::{FdImage, TimerTime};
use crate::ptrace::{Injector, Memory};

/// Where restore builds: the stub, its scratch data area, and how a new
/// fd is moved above the saved ones and placed at its number.
pub struct Stub<'a> {
    pub inj: &'a Injector<'a>,
    pub mem: &'a Memory,
    pub pid: u32,
    pub data: u64,
    pub data_len: u64,
    pub to_high: &'a dyn Fn(u64) -> Result<u64, SnapshotError>,
    pub place: &'a dyn Fn(u64, &FdImage, i32) -> Result<(), SnapshotError>,
}

const NS: u64 = 1_000_000_000;

fn itimerspec(t: TimerTime) -> libc::itimerspec {
    let ts = |ns: u64| libc::timespec {
        tv_sec: (ns / NS) as libc::time_t,
        tv_nsec: (ns % NS) as libc::c_long,
    };
    libc::itimerspec {
        it_interval: ts(t.interval_ns),
        it_value: ts(t.value_ns),
    }
}

fn from_itimerspec(v: &libc::itimerspec) -> TimerTime {
    let ns = |ts: libc::timespec| ts.tv_sec as u64 * NS + ts.tv_nsec as u64;
    TimerTime {
        interval_ns: ns(v.it_interval),
        value_ns: ns(v.it_value),
    }
}

/// The value after `key` in an fdinfo line such as `clockid: 1`.
fn field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .map(str::trim)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn itimerspec_round_trip() {
        let t = TimerTime {
            value_ns: 2 * NS + 5,
            interval_ns: 250_000_000,
        };
        let v = itimerspec(t);
        assert_eq!(v.it_interval.tv_nsec, 250_000_000);
        assert_eq!((v.it_value.tv_sec, v.it_value.tv_nsec), (2, 5));
        assert_eq!(from_itimerspec(&v), t);
    }
}
