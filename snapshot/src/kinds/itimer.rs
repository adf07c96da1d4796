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

fn itimerval(t: TimerTime) -> libc::itimerval {
    let tv = |ns: u64| libc::timeval {
        tv_sec: (ns / 1_000_000_000) as libc::time_t,
        tv_usec: (ns % 1_000_000_000 / 1000) as libc::suseconds_t,
    };
    libc::itimerval {
        it_interval: tv(t.interval_ns),
        it_value: tv(t.value_ns),
    }
}

fn from_itimerval(v: &libc::itimerval) -> TimerTime {
    let ns = |tv: libc::timeval| tv.tv_sec as u64 * 1_000_000_000 + tv.tv_usec as u64 * 1000;
    TimerTime {
        interval_ns: ns(v.it_interval),
        value_ns: ns(v.it_value),
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
        let time = from_itimerval(&mem.read_value(data)?);
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
        mem.write_value(data, &itimerval(t.time))?;
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
        let v = itimerval(t);
        assert_eq!((v.it_value.tv_sec, v.it_value.tv_usec), (2, 750_001));
        assert_eq!(from_itimerval(&v), t);
    }
}
