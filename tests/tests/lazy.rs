//! Lazy restore (`appshot restore --lazy`): the instance runs and answers
//! while its memory is still coming in (a userfaultfd page server in its
//! supervisor fills each page on fault and the rest in the background), and
//! then holds every page it had, checked by `tests/programs/lazymem.c`'s
//! checksum of its whole memory, read from user space, by the kernel and by
//! a child forked meanwhile. Pages given back with MADV_DONTNEED while
//! still pending read zero, then and after the background pass went over
//! them. An image truncated under a lazy restore kills the instance with
//! the reason in its supervisor's log; an image of several processes is
//! refused before anything starts. An unmodified redis-server (threads of
//! its own) restored lazily has the same dataset digest.

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use common::pagewriter::real_port;
use common::{alive, pid_of, poll, redis_cli, start_forkshare, start_redis, Harness, READY};

const PORT: u16 = 19461;

/// lazymem's answer to `request` on loopback port `real`.
fn ask(real: u16, request: &str) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", real)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.write_all(format!("{request}\n").as_bytes()).unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("an answer");
    answer.trim_end().to_string()
}

/// Starts lazymem holding `mib` MiB as `name`, snapshots it (stopping it)
/// into IMAGE and returns the image and its checksum answer before.
fn snapshotted(h: &mut Harness, name: &str, mib: u32) -> (std::path::PathBuf, String) {
    let bin = h.compile("lazymem.c", "lazymem");
    let dir = h.dir(name);
    let port = PORT.to_string();
    let mib = mib.to_string();
    h.start(
        name,
        name,
        &dir,
        &["--port", &port],
        &[bin.to_str().unwrap(), &port, &mib],
    );
    h.wait_log(name, "ready");
    let sum = ask(real_port(h, name), "sum");
    assert!(sum.ends_with("intact=1"), "{sum}");
    let image = dir.join("lazy.img");
    let ran = h.snapshot(name, &image, &[]);
    assert!(ran.success(), "snapshot: {ran}");
    (image, sum)
}

/// Kilobytes of `key` in the process's smaps_rollup.
fn rollup_kib(pid: u32, key: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {text}"))
}

/// Mappings of the process registered with a userfaultfd for missing
/// pages (`um` in their smaps flags).
fn registered(pid: u32) -> usize {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with("VmFlags:") && l.split_whitespace().any(|f| f == "um"))
        .count()
}

#[test]
fn a_lazy_restore_answers_before_its_memory_is_in_and_then_holds_every_page() {
    let test = "a_lazy_restore_answers_before_its_memory_is_in_and_then_holds_every_page";
    let Some(mut h) = Harness::new(test, &["gcc"]) else {
        return;
    };
    let (image, sum) = snapshotted(&mut h, "lz", 16);
    // 2 MiB a second in the background: the 16 MiB are far from in when
    // the first answers come.
    h.restore("lz", &image, &["--lazy", "--prefetch-rate", "2"]);
    let real = real_port(&h, "lz");
    assert_eq!(ask(real, "ping"), "pong");
    let pid = pid_of(&h.instance("lz").unwrap());
    let log = h.log("lz");
    assert!(
        log.contains("lazy restore: memory served on fault"),
        "{log}"
    );
    assert!(!log.contains("lazy restore complete"), "{log}");
    assert!(
        registered(pid) > 0,
        "no mapping registered for missing pages"
    );
    let resident = rollup_kib(pid, "Anonymous:");
    assert!(
        resident < 12 << 10,
        "{resident} KiB of anonymous memory in already: the memory is not lazy"
    );
    let refused = h.snapshot("lz", &h.dir("lz").join("early.img"), &[]);
    assert!(
        !refused.success() && refused.stderr.contains("still being restored lazily"),
        "a snapshot with pages pending: {refused}"
    );

    // The second half, still pending, given back: zeros, not the image's.
    assert_eq!(ask(real, "drop"), "dropped=1 zero=1");
    let dropped = ask(real, "sum");
    assert!(dropped.ends_with("intact=1"), "after the drop: {dropped}");
    assert_eq!(ask(real, "ksum"), dropped, "read by the kernel");
    assert_eq!(
        ask(real, "fork"),
        dropped,
        "read by a child forked meanwhile"
    );

    // The background pass is rate-limited to 8 s in all.
    assert!(
        poll(Duration::from_secs(60), || h.log("lz").contains(
            "lazy restore complete: every page in, pages verified"
        )),
        "the lazy restore never completes:\n{}",
        h.log("lz")
    );
    assert_eq!(registered(pid), 0, "ranges still registered once all is in");
    assert_eq!(
        ask(real, "sum"),
        dropped,
        "the background pass refilled dropped pages"
    );
    assert_ne!(dropped, sum, "the drop changed nothing");
    h.stop("lz");

    // The same image, restored lazily without a rate: the whole memory as
    // it was.
    h.restore("lz", &image, &["--lazy"]);
    let real = real_port(&h, "lz");
    assert_eq!(ask(real, "sum"), sum);
    assert_eq!(ask(real, "ksum"), sum);
    h.wait_log("lz", "lazy restore complete");
    h.stop("lz");
}

#[test]
fn a_lazy_restore_whose_image_is_truncated_midway_kills_the_instance_and_says_why() {
    let test = "a_lazy_restore_whose_image_is_truncated_midway_kills_the_instance_and_says_why";
    let Some(mut h) = Harness::new(test, &["gcc"]) else {
        return;
    };
    let (image, _) = snapshotted(&mut h, "lt", 16);
    h.restore("lt", &image, &["--lazy", "--prefetch-rate", "1"]);
    let real = real_port(&h, "lt");
    assert_eq!(ask(real, "ping"), "pong");
    let pid = pid_of(&h.instance("lt").unwrap());
    std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .unwrap()
        .set_len(4096)
        .unwrap();
    // Its faults need pages the image no longer has: the answer never
    // comes, and nothing hangs.
    let asked = Instant::now();
    let mut s = std::net::TcpStream::connect(("127.0.0.1", real)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(b"sum\n").unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(
        answer.is_empty() && asked.elapsed() < Duration::from_secs(20),
        "answered {answer:?} after {:?}",
        asked.elapsed()
    );
    assert!(poll(READY, || !alive(pid)), "pid {pid} still runs");
    let log = h.wait_log("lt", "instance exited");
    let line = log
        .lines()
        .find(|l| l.contains("lazy restore failed, instance killed"))
        .unwrap_or_else(|| panic!("no reason logged:\n{log}"));
    assert!(
        line.contains("ERROR") && line.contains(image.to_str().unwrap()),
        "{line}"
    );
    assert!(
        poll(READY, || h.instance("lt").is_none()),
        "still listed as running"
    );
}

#[test]
fn an_image_of_several_processes_is_refused_lazily_and_restores_eagerly() {
    let test = "an_image_of_several_processes_is_refused_lazily_and_restores_eagerly";
    let Some(mut h) = Harness::new(test, &["gcc"]) else {
        return;
    };
    let (dir, _) = start_forkshare(&mut h, "fs", "fs", 3);
    let image = dir.join("fs.img");
    let ran = h.snapshot("fs", &image, &[]);
    assert!(ran.success(), "snapshot: {ran}");
    let ran = h.try_restore("fs", &image, &["--lazy"]);
    assert!(!ran.success(), "restored lazily: {ran}");
    assert!(
        ran.stderr.contains("holds 2 processes") && ran.stderr.contains("without --lazy"),
        "{ran}"
    );
    assert!(h.instance("fs").is_none(), "an instance started: {ran}");
    assert!(Path::new(&image).exists());
    h.restore("fs", &image, &[]);
    h.stop("fs");
}

#[test]
fn a_redis_restored_lazily_holds_the_same_dataset() {
    let test = "a_redis_restored_lazily_holds_the_same_dataset";
    let Some(mut h) = Harness::new(test, &["redis-server", "redis-cli"]) else {
        return;
    };
    start_redis(&mut h, "rl", "rl", &["--enable-debug-command", "yes"]);
    assert_eq!(redis_cli(&h, "rl", &["debug", "populate", "300000"]), "OK");
    let digest = redis_cli(&h, "rl", &["debug", "digest"]);
    let image = h.dir("rl").join("redis.img");
    let ran = h.snapshot("rl", &image, &[]);
    assert!(ran.success(), "snapshot: {ran}");
    // 1 MiB a second: DIGEST reads every key through faults.
    h.restore("rl", &image, &["--lazy", "--prefetch-rate", "1"]);
    assert_eq!(redis_cli(&h, "rl", &["debug", "digest"]), digest);
    assert!(
        !h.log("rl").contains("lazy restore complete"),
        "all in before the first answer: not lazy"
    );
    assert_eq!(redis_cli(&h, "rl", &["dbsize"]), "300000");
    h.stop("rl");
}
