//! Interval timers (setitimer/alarm): the armed ones are saved with the
//! time they had left and re-armed with it in the restored process, so each
//! fires as if the process had not been stopped in between.

use crate::error::SnapshotError;
use crate::image::model::{ITimer, TimerTime};
use crate::ptrace::{Injector, Memory};

const WHICH: [(i32, &str); 3] = [
    (libc::ITIMER_REAL, "ITIMER_REAL"),
    (libc::ITIMER_VIRTUAL, "ITIMER_VIRTUAL"),
    (libc::ITIMER_PROF, "ITIMER_PROF"),
];

/// `struct itimerval`: it_interval, then it_value, each (tv_sec, tv_usec).
fn itimerval(t: TimerTime) -> [u8; 32] {
    let us = |ns: u64| [ns / 1_000_000_000, ns % 1_000_000_000 / 1000];
    let mut b = [0u8; 32];
    for (i, v) in us(t.interval_ns)
        .into_iter()
        .chain(us(t.value_ns))
        .enumerate()
    {
        b[i * 8..i * 8 + 8].copy_from_slice(&v.to_ne_bytes());
    }
    b
}

fn from_itimerval(b: &[u8; 32]) -> TimerTime {
    let f = |i: usize| u64::from_ne_bytes(b[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    TimerTime {
        interval_ns: f(0) * 1_000_000_000 + f(1) * 1000,
        value_ns: f(2) * 1_000_000_000 + f(3) * 1000,
    }
}

/// The armed interval timers of process `pid`, asked from its main thread.
pub fn save(
    inj: &Injector,
    mem: &Memory,
    pid: u32,
    data: u64,
) -> Result<Vec<ITimer>, SnapshotError> {
    let mut out = Vec::new();
    for (which, name) in WHICH {
        inj.ok(
            pid,
            &format!("getitimer {name}"),
            libc::SYS_getitimer,
            &[which as u64, data],
        )?;
        let mut b = [0u8; 32];
        mem.read(data, &mut b)?;
        let time = from_itimerval(&b);
        if time.value_ns != 0 {
            out.push(ITimer { which, time });
        }
    }
    Ok(out)
}

pub fn restore(
    inj: &Injector,
    mem: &Memory,
    pid: u32,
    data: u64,
    timers: &[ITimer],
) -> Result<(), SnapshotError> {
    for t in timers {
        mem.write(data, &itimerval(t.time))?;
        inj.ok(
            pid,
            &format!("setitimer {}", t.which),
            libc::SYS_setitimer,
            &[t.which as u64, data, 0],
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn itimerval_round_trip_in_microseconds() {
        let t = TimerTime {
            value_ns: 2_750_001_000,
            interval_ns: 0,
        };
        let b = itimerval(t);
        assert_eq!(u64::from_ne_bytes(b[16..24].try_into().unwrap()), 2);
        assert_eq!(u64::from_ne_bytes(b[24..32].try_into().unwrap()), 750_001);
        assert_eq!(from_itimerval(&b), t);
    }
}
