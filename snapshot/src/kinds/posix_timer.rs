//! POSIX timers (timer_create): listed in /proc/PID/timers (id, signal and
//! value, notification, clock), their time left asked with an injected
//! timer_gettime. Restored under the same ids with
//! `PR_TIMER_CREATE_RESTORE_IDS` (Linux 6.11+; timer_create then takes the
//! id it is given), and re-armed with the time they had left.

use std::collections::HashMap;

use appshot_sys::abi::TraceeSigevent;

use super::{from_itimerspec, itimerspec};
use crate::error::SnapshotError;
use crate::image::model::{PosixTimer, TimerTime};
use crate::ptrace::{Injector, Memory};

const PR_TIMER_CREATE_RESTORE_IDS: u64 = 77;
const PR_TIMER_CREATE_RESTORE_IDS_OFF: u64 = 0;
const PR_TIMER_CREATE_RESTORE_IDS_ON: u64 = 1;
const SIGEV_SIGNAL: i32 = 0;
const SIGEV_NONE: i32 = 1;
const SIGEV_THREAD_ID: i32 = 4;
/// Clocks a timer can be re-created on from any thread: not a thread's
/// CPU clock (it would become the injecting thread's) nor another
/// process's.
const CLOCKS: [i32; 7] = [
    libc::CLOCK_REALTIME,
    libc::CLOCK_MONOTONIC,
    libc::CLOCK_PROCESS_CPUTIME_ID,
    libc::CLOCK_BOOTTIME,
    libc::CLOCK_REALTIME_ALARM,
    libc::CLOCK_BOOTTIME_ALARM,
    libc::CLOCK_TAI,
];

/// The timers of process `pid` from its /proc/PID/timers `text`, time not
/// yet known; `ns_tid` maps the process's host TIDs to its own. Refuses
/// what cannot be re-created.
pub fn list(
    pid: u32,
    text: &str,
    ns_tid: &HashMap<u32, u32>,
) -> Result<Vec<PosixTimer>, SnapshotError> {
    let entries = parse(text).ok_or_else(|| SnapshotError::Unsupported {
        pid,
        what: "unreadable /proc/PID/timers".into(),
    })?;
    let mut out = Vec::with_capacity(entries.len());
    for e in entries {
        let refuse = |why: String| SnapshotError::Unsupported {
            pid,
            what: format!("POSIX timer {}: {why}", e.timer.id),
        };
        if !CLOCKS.contains(&e.timer.clockid) {
            return Err(refuse(format!(
                "on clock {}, which cannot be saved yet",
                e.timer.clockid
            )));
        }
        let mut t = e.timer;
        if t.notify & SIGEV_THREAD_ID != 0 {
            t.thread = Some(
                *ns_tid
                    .get(&e.target)
                    .ok_or_else(|| refuse(format!("signals thread {}, not ours", e.target)))?,
            );
        } else if e.target != pid {
            return Err(refuse(format!("signals process {}", e.target)));
        }
        out.push(t);
    }
    Ok(out)
}

struct Entry {
    timer: PosixTimer,
    /// Host PID or TID the notification goes to.
    target: u32,
}

/// Entries of /proc/PID/timers: `ID: 2`, `signal: 12/00007f…` (signal and
/// value), `notify: signal/pid.7169` (or `none`, `thread`; `tid.N` with
/// SIGEV_THREAD_ID), `ClockID: 1`.
fn parse(text: &str) -> Option<Vec<Entry>> {
    let mut out: Vec<Entry> = Vec::new();
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if key == "ID" {
            out.push(Entry {
                timer: PosixTimer {
                    id: value.parse().ok()?,
                    clockid: 0,
                    notify: 0,
                    signo: 0,
                    sigval: 0,
                    thread: None,
                    time: TimerTime::default(),
                },
                target: 0,
            });
            continue;
        }
        let e = out.last_mut()?;
        match key {
            "signal" => {
                let (signo, sigval) = value.split_once('/')?;
                e.timer.signo = signo.parse().ok()?;
                e.timer.sigval = u64::from_str_radix(sigval, 16).ok()?;
            }
            "notify" => {
                let (how, whom) = value.split_once('/')?;
                let (kind, target) = whom.split_once('.')?;
                let base = match how {
                    "signal" => SIGEV_SIGNAL,
                    "none" => SIGEV_NONE,
                    _ => return None,
                };
                e.timer.notify = match kind {
                    "pid" => base,
                    "tid" => base | SIGEV_THREAD_ID,
                    _ => return None,
                };
                e.target = target.parse().ok()?;
            }
            "ClockID" => e.timer.clockid = value.parse().ok()?,
            _ => {}
        }
    }
    Some(out)
}

/// Fills in each timer's time left and period, asked from thread `pid`.
pub fn save_times(
    inj: &Injector,
    mem: &Memory,
    pid: u32,
    data: u64,
    timers: &mut [PosixTimer],
) -> Result<(), SnapshotError> {
    for t in timers {
        inj.ok(
            pid,
            &format!("timer_gettime of POSIX timer {}", t.id),
            libc::SYS_timer_gettime,
            &[t.id as u64, data],
        )?;
        t.time = from_itimerspec(&mem.read_value(data)?);
    }
    Ok(())
}

fn sigevent(t: &PosixTimer) -> TraceeSigevent {
    TraceeSigevent {
        value: t.sigval,
        signo: t.signo,
        notify: t.notify,
        thread_id: t.thread.unwrap_or(0) as i32,
        pad: [0; 44],
    }
}

/// Re-creates the timers in process `pid` (its main thread) under their
/// ids, then arms them: created all first, so that one firing early does
/// not interrupt the creation of the others.
pub fn restore(
    inj: &Injector,
    mem: &Memory,
    pid: u32,
    data: u64,
    timers: &[PosixTimer],
) -> Result<(), SnapshotError> {
    if timers.is_empty() {
        return Ok(());
    }
    let prctl = |what: &str, on: u64| {
        inj.ok(
            pid,
            what,
            libc::SYS_prctl,
            &[PR_TIMER_CREATE_RESTORE_IDS, on, 0, 0, 0],
        )
    };
    prctl(
        "PR_TIMER_CREATE_RESTORE_IDS (Linux 6.11+, needed to keep POSIX timer ids)",
        PR_TIMER_CREATE_RESTORE_IDS_ON,
    )?;
    let created = (|| -> Result<(), SnapshotError> {
        for t in timers {
            let id_at = data + 64;
            mem.write_value(data, &sigevent(t))?;
            mem.write_value(id_at, &t.id)?;
            inj.ok(
                pid,
                &format!("timer_create of POSIX timer {}", t.id),
                libc::SYS_timer_create,
                &[t.clockid as u64, data, id_at],
            )?;
        }
        Ok(())
    })();
    prctl(
        "PR_TIMER_CREATE_RESTORE_IDS off",
        PR_TIMER_CREATE_RESTORE_IDS_OFF,
    )?;
    created?;
    for t in timers.iter().filter(|t| t.time.value_ns != 0) {
        mem.write_value(data, &itimerspec(t.time))?;
        inj.ok(
            pid,
            &format!("timer_settime of POSIX timer {}", t.id),
            libc::SYS_timer_settime,
            &[t.id as u64, 0, data, 0],
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMERS: &str = "ID: 2\nsignal: 12/0000000000005eed\nnotify: signal/pid.7169\nClockID: 1\n\
                          ID: 0\nsignal: 34/0000000000000000\nnotify: signal/tid.7171\nClockID: 0\n";

    #[test]
    fn timers_listing() {
        let ns: HashMap<u32, u32> = [(7169, 1), (7171, 3)].into();
        let t = list(7169, TIMERS, &ns).unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(
            (t[0].id, t[0].signo, t[0].sigval, t[0].notify, t[0].thread),
            (2, libc::SIGUSR2, 0x5eed, SIGEV_SIGNAL, None)
        );
        assert_eq!(t[0].clockid, libc::CLOCK_MONOTONIC);
        assert_eq!(
            (t[1].notify, t[1].thread),
            (SIGEV_SIGNAL | SIGEV_THREAD_ID, Some(3))
        );
        assert_eq!(list(1, "", &ns).unwrap(), vec![]);
    }

    #[test]
    fn timers_that_cannot_be_recreated_are_refused_by_id() {
        let ns: HashMap<u32, u32> = [(7169, 1)].into();
        let err = list(7169, TIMERS, &ns).unwrap_err().to_string();
        assert!(
            err.contains("POSIX timer 0") && err.contains("7171"),
            "{err}"
        );
        let thread_clock = TIMERS.replace("ClockID: 1", "ClockID: 3");
        let err = list(7169, &thread_clock, &ns).unwrap_err().to_string();
        assert!(
            err.contains("POSIX timer 2") && err.contains("clock 3"),
            "{err}"
        );
    }

    #[test]
    fn sigevent_layout() {
        let t = PosixTimer {
            id: 2,
            clockid: 1,
            notify: SIGEV_SIGNAL | SIGEV_THREAD_ID,
            signo: 12,
            sigval: 0x5eed,
            thread: Some(3),
            time: TimerTime::default(),
        };
        let e = sigevent(&t);
        assert_eq!(
            (e.value, e.signo, e.notify, e.thread_id),
            (0x5eed, 12, 4, 3)
        );
    }
}
