//! Timers and notification fds across `appshot snapshot` and `restore`:
//! timerfds, a signalfd, inotify watches, an interval timer and a POSIX
//! timer are saved and, restored, behave as before (tests/programs/
//! timekeeper.c holds them all). What cannot be saved refuses the snapshot
//! and the instance runs on.

mod common;

use std::collections::HashMap;
use std::fs;
use std::time::Duration;

use common::{alive, pid_of, poll, Harness};

const PORT: &str = "19700";

/// One connection to timekeeper: its whole answer.
const QUERY: &str = "import socket\n\
s = socket.create_connection(('127.0.0.1', 19700), timeout=10)\n\
print(s.makefile().read(), end='')\n";

/// CLOCK_MONOTONIC in milliseconds, the clock timekeeper reports in.
fn mono_ms() -> i64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).unwrap();
    ts.tv_sec() * 1000 + ts.tv_nsec() / 1_000_000
}

/// `key=value` words of a line.
fn fields(line: &str) -> HashMap<String, String> {
    line.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

struct Answer(HashMap<String, String>, String);

impl Answer {
    fn get(&self, key: &str) -> &str {
        self.0
            .get(key)
            .unwrap_or_else(|| panic!("timekeeper answer without {key}: {}", self.1))
    }

    fn num(&self, key: &str) -> i64 {
        self.get(key)
            .parse()
            .unwrap_or_else(|_| panic!("{key} not a number in {}", self.1))
    }
}

fn ask(h: &Harness, aid: &str) -> Answer {
    let ran = h.client(aid, &["python3", "-c", QUERY]);
    assert!(ran.success(), "timekeeper query under {aid}: {ran}");
    Answer(fields(&ran.stdout), ran.stdout.trim_end().to_string())
}

/// Starts timekeeper as `name`; returns its `ready` line's fields and the
/// watched file and directory.
fn start_timekeeper(
    h: &mut Harness,
    name: &str,
    extra: &[&str],
) -> (
    HashMap<String, String>,
    std::path::PathBuf,
    std::path::PathBuf,
) {
    let bin = h.compile("timekeeper.c", "timekeeper");
    let dir = h.dir(name);
    let file = dir.join("watched.txt");
    let sub = dir.join("watched-dir");
    fs::write(&file, "first\n").unwrap();
    fs::create_dir_all(&sub).unwrap();
    let mut cmd = vec![
        bin.to_str().unwrap(),
        PORT,
        file.to_str().unwrap(),
        sub.to_str().unwrap(),
    ];
    cmd.extend_from_slice(extra);
    h.start(name, name, &dir, &[], &cmd);
    let log = h.wait_log(name, "ready ");
    let line = log
        .lines()
        .find(|l| l.starts_with("ready "))
        .expect("ready line");
    (fields(line), file, sub)
}

/// Where, on CLOCK_MONOTONIC, a one-shot timer armed for `delay_ms`
/// between `armed` and `ready` must fire after a stop in between: it had
/// `deadline - F` left when frozen at F (within the snapshot command,
/// s0..s1) and is re-armed with that at A (within the restore command,
/// r0..r1), so it fires at A + deadline - F. 250 ms more are allowed for
/// the program to be scheduled on a busy machine, 2 ms less for rounding
/// to milliseconds.
fn window(
    delay_ms: i64,
    armed: i64,
    ready: i64,
    (s0, s1): (i64, i64),
    (r0, r1): (i64, i64),
) -> (i64, i64) {
    (
        r0 + armed + delay_ms - s1 - 2,
        r1 + ready + delay_ms - s0 + 250,
    )
}

#[test]
fn timers_signalfd_and_inotify_behave_as_before_after_restore() {
    let test = "timers_signalfd_and_inotify_behave_as_before_after_restore";
    let Some(mut h) = Harness::new(test, &["gcc", "python3"]) else {
        return;
    };
    let (ready, file, sub) = start_timekeeper(&mut h, "tk", &[]);
    let n = |k: &str| -> i64 { ready[k].parse().unwrap() };
    let image = h.dir("images").join("tk.img");

    let s0 = mono_ms();
    let ran = h.snapshot("tk", &image, &[]);
    let s1 = mono_ms();
    assert!(ran.success(), "snapshot of timekeeper: {ran}");
    let r0 = mono_ms();
    h.restore("tk", &image, &[]);
    let r1 = mono_ms();

    let first = ask(&h, "tk");
    assert!(
        s1 < n("armed_at") + 2000,
        "the snapshot ended {} ms after the first timer was armed for 2000 ms: too slow to test",
        s1 - n("armed_at")
    );
    for k in ["oneshot", "alarms", "ptimer"] {
        assert_eq!(
            first.num(k),
            0,
            "{k} fired before its time (snapshot {s0}..{s1}, restore {r0}..{r1}): {}",
            first.1
        );
    }
    assert_eq!(
        first.get("oneshot_flags"),
        "nb,ce",
        "timerfd flags: {}",
        first.1
    );
    assert_eq!(
        first.num("sigusr1"),
        1,
        "the SIGUSR1 pending when saved is read from the signalfd once: {}",
        first.1
    );
    // Expirations counted before the snapshot and not read are kept: at
    // least as many as had passed when the snapshot began.
    let before = (s0 - n("periodic_at")) / 100;
    assert!(
        first.num("periodic") >= before,
        "periodic timerfd: {} expirations read, {before} had passed before the snapshot: {}",
        first.num("periodic"),
        first.1
    );
    assert_eq!(
        first.num("ptimer_gettime"),
        0,
        "timer_gettime on the saved timer id works: {}",
        first.1
    );

    fs::write(&file, "second\n").unwrap();
    fs::write(sub.join("new-file"), "x").unwrap();
    let mut now = first;
    let fired = poll(Duration::from_secs(15), || {
        now = ask(&h, "tk");
        ["oneshot", "alarms", "ptimer"]
            .iter()
            .all(|k| now.num(k) >= 1)
            && now.get("inotify").contains("3:100:new-file")
            && now.get("inotify").split(',').any(|e| e == "1:2:")
    });
    assert!(fired, "timers and inotify events after restore: {}", now.1);
    let events = now.get("inotify").to_string();
    assert!(
        events
            .split(',')
            .any(|e| e == format!("{}:2:", ready["wd_file"])),
        "the write to the file is reported with its wd {}: {events}",
        ready["wd_file"]
    );
    assert!(
        events.contains(&format!("{}:100:new-file", ready["wd_dir"])),
        "the file created in the directory is reported with its wd {}: {events}",
        ready["wd_dir"]
    );
    assert_eq!(
        now.get("ptimer_id"),
        ready["timer_id"],
        "POSIX timer id: {}",
        now.1
    );
    assert_eq!(
        now.get("ptimer_val"),
        "5eed",
        "POSIX timer value: {}",
        now.1
    );

    let (armed, ready_at) = (n("armed_at"), n("ready_at"));
    for (key, at, delay) in [
        ("oneshot", "oneshot_at", 2000),
        ("ptimer", "ptimer_at", 2500),
        ("alarms", "alarm_at", 3000),
    ] {
        let (lo, hi) = window(delay, armed, ready_at, (s0, s1), (r0, r1));
        let t = now.num(at);
        assert!(
            (lo..=hi).contains(&t),
            "{key} (armed for {delay} ms) fired at {t}, outside {lo}..={hi} \
             (armed {armed}..{ready_at}, snapshot {s0}..{s1}, restore {r0}..{r1})"
        );
    }

    std::thread::sleep(Duration::from_millis(1500));
    let last = ask(&h, "tk");
    for k in ["oneshot", "alarms", "ptimer", "sigusr1"] {
        assert_eq!(
            last.num(k),
            1,
            "{k} fired (or was read) once only: {}",
            last.1
        );
    }
    assert!(
        last.num("periodic") > now.num("periodic"),
        "the periodic timerfd runs on: {} then {}",
        now.1,
        last.1
    );
}

#[test]
fn a_timer_that_cannot_be_saved_refuses_the_snapshot_and_the_instance_runs_on() {
    let test = "a_timer_that_cannot_be_saved_refuses_the_snapshot_and_the_instance_runs_on";
    let Some(mut h) = Harness::new(test, &["gcc", "python3"]) else {
        return;
    };
    start_timekeeper(&mut h, "tc", &["cancel-on-set"]);
    let app = pid_of(&h.instance("tc").expect("tc listed"));
    let images = h.dir("images");
    let ran = h.snapshot("tc", &images.join("tc.img"), &[]);
    assert!(!ran.success(), "a cancel-on-set timerfd must refuse: {ran}");
    assert!(
        ran.stderr.contains(&format!("pid {app}: fd "))
            && ran.stderr.contains("timerfd")
            && ran.stderr.contains("CANCEL_ON_SET"),
        "the refusal names the pid, the fd and the object: {ran}"
    );
    assert_eq!(fs::read_dir(&images).unwrap().count(), 0, "no image");
    assert!(alive(app), "the refused instance runs on");
    let answer = ask(&h, "tc");
    assert_eq!(answer.num("sigusr1"), 1, "untouched: {}", answer.1);
}
