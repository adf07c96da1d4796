//! A whole application: every kind of object a snapshot saves, set up
//! around a fork (`tests/programs/wholekeeper.c`), behaves after a restore
//! exactly as it would have without one.

mod common;

use std::time::{Duration, Instant};

use common::{poll, Harness};

const PORT: &str = "19660";

fn ask(h: &Harness, command: &str) -> String {
    let query = format!(
        "import socket\ns = socket.create_connection(('127.0.0.1', {PORT}), timeout=10)\n\
         s.sendall(b'{command}')\ns.shutdown(socket.SHUT_WR)\nprint(s.makefile().read(), end='')\n"
    );
    let ran = h.client("w", &["python3", "-c", &query]);
    assert!(ran.success(), "wholekeeper {command}: {ran}");
    ran.stdout.trim_end().to_string()
}

/// The value of `key=` in a wholekeeper answer.
fn field(answer: &str, key: &str) -> String {
    answer
        .split_whitespace()
        .find_map(|f| f.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key} in {answer}"))
        .to_string()
}

#[test]
fn every_object_of_a_forked_application_behaves_as_before_after_restore() {
    let test = "every_object_of_a_forked_application_behaves_as_before_after_restore";
    let Some(mut h) = Harness::new(test, &["gcc", "python3"]) else {
        return;
    };
    let bin = h.compile("wholekeeper.c", "wholekeeper");
    let dir = h.dir("w");
    let shm = format!("/appshot-whole-{}", std::process::id());
    // The timers are armed after this instant and before the log line.
    let started = Instant::now();
    h.start("w", "w", &dir, &[], &[bin.to_str().unwrap(), PORT, &shm]);
    h.wait_log("w", "wholekeeper listening");
    let armed = Instant::now();

    // Before the timers are due: nothing has fired, nothing was read.
    let image = h.dir("img").join("w.img");
    let ran = h.snapshot("w", &image, &[]);
    assert!(ran.success(), "{ran}");
    let frozen_after = armed.elapsed();
    assert!(
        frozen_after < Duration::from_millis(1800),
        "the snapshot came too late to catch the 2 s timer armed: {frozen_after:?}"
    );
    let held_since_start = started.elapsed();
    // The timers are re-armed during the restore, so they cannot fire before
    // this instant plus what they had left at the freeze, which is at least
    // 3 s minus the whole time from before the start to the snapshot's end.
    let restore_begun = Instant::now();
    h.restore("w", &image, &[]);

    let state = ask(&h, "state");
    assert_eq!(field(&state, "timerfd"), "0", "{state}");
    assert_eq!(field(&state, "alarms"), "0", "{state}");
    assert_eq!(field(&state, "sem"), "7,8,9", "{state}");
    assert_eq!(field(&state, "shm"), "sysv-segment", "{state}");
    assert_eq!(field(&state, "msgs"), "2", "{state}");

    // The socketpair split between parent and child: each side's unread
    // bytes, exactly once.
    assert_eq!(
        ask(&h, "sp"),
        "parent=child-to-parent child=parent-to-child"
    );
    assert_eq!(ask(&h, "sp"), "parent= child=");
    // The memfd the child wrote into is the parent's.
    assert!(field(&ask(&h, "state"), "memfd").starts_with("child-was-here"));
    // One offset for both: the parent reads byte 4, the child byte 5.
    assert_eq!(ask(&h, "offset"), "parent=4 child=5 pos=6");
    assert_eq!(ask(&h, "accept"), "pending=waiting");
    assert_eq!(ask(&h, "msgs"), "msgs=one,two");
    assert_eq!(ask(&h, "signal"), "signals=1", "SIGUSR1 pending, read once");
    assert_eq!(ask(&h, "signal"), "signals=1");
    // The write of `offset` shows on the watch the application made.
    assert!(poll(Duration::from_secs(2), || field(
        &ask(&h, "state"),
        "inotify"
    ) == "1"));

    // The timers fire once, with the time they had left counted from the
    // restore (the time spent stopped does not count).
    assert!(
        poll(Duration::from_secs(5), || {
            let s = ask(&h, "state");
            field(&s, "timerfd") == "1" && field(&s, "alarms") == "1"
        }),
        "the timers never fired: {}",
        ask(&h, "state")
    );
    let fired_by = restore_begun.elapsed();
    assert!(
        fired_by >= Duration::from_secs(3) - held_since_start,
        "the 3 s itimer fired too early after the restore: {fired_by:?} \
         (start to snapshot's end {held_since_start:?})"
    );
    std::thread::sleep(Duration::from_millis(500));
    let last = ask(&h, "state");
    assert_eq!(field(&last, "timerfd"), "1", "once: {last}");
    assert_eq!(field(&last, "alarms"), "1", "once: {last}");
    let _ = std::fs::remove_file(format!("/dev/shm{shm}"));
}
