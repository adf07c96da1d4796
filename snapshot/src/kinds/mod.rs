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

/// `struct itimerspec`: it_interval, then it_value, each (tv_sec, tv_nsec).
fn itimerspec(t: TimerTime) -> [u8; 32] {
    let mut b = [0u8; 32];
    for (i, v) in [
        t.interval_ns / NS,
        t.interval_ns % NS,
        t.value_ns / NS,
        t.value_ns % NS,
    ]
    .into_iter()
    .enumerate()
    {
        b[i * 8..i * 8 + 8].copy_from_slice(&v.to_ne_bytes());
    }
    b
}

fn from_itimerspec(b: &[u8; 32]) -> TimerTime {
    let f = |i: usize| u64::from_ne_bytes(b[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    TimerTime {
        interval_ns: f(0) * NS + f(1),
        value_ns: f(2) * NS + f(3),
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
        let b = itimerspec(t);
        assert_eq!(
            u64::from_ne_bytes(b[8..16].try_into().unwrap()),
            250_000_000
        );
        assert_eq!(u64::from_ne_bytes(b[16..24].try_into().unwrap()), 2);
        assert_eq!(from_itimerspec(&b), t);
    }
}
