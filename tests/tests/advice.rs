//! What a process set on its mappings with madvise, mlock and mmap's
//! flags (huge pages, read-ahead, fork behaviour, core dumps, KSM, locked
//! pages, no swap reservation) comes back with a restore: the kernel shows
//! the same VmFlags for each mapping, and a fork in the restored process
//! leaves out and wipes what it did before (tests/programs/advised.c).

mod common;

use std::collections::HashMap;

use common::{pid_of, Harness};

const PORT: &str = "19890";

const QUERY: &str = "import socket\n\
s = socket.create_connection(('127.0.0.1', 19890), timeout=10)\n\
print(s.makefile().read(), end='')\n";

/// VmFlags of the mappings starting at `starts`, from /proc/PID/smaps.
fn vm_flags(pid: u32, starts: &[u64]) -> HashMap<u64, String> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let mut out = HashMap::new();
    let mut current = None;
    for line in smaps.lines() {
        if let Some(flags) = line.strip_prefix("VmFlags:") {
            if let Some(start) = current.filter(|s| starts.contains(s)) {
                out.insert(start, flags.trim().to_string());
            }
        } else if let Some((range, _)) = line.split_once(' ') {
            if let Some((start, _)) = range.split_once('-') {
                if let Ok(start) = u64::from_str_radix(start, 16) {
                    current = Some(start);
                }
            }
        }
    }
    out
}

fn ask(h: &Harness) -> String {
    let ran = h.client("adv", &["python3", "-c", QUERY]);
    assert!(ran.success(), "advised query: {ran}");
    ran.stdout.trim_end().to_string()
}

#[test]
fn madvise_mlock_and_noreserve_come_back_with_a_restore() {
    let test = "madvise_mlock_and_noreserve_come_back_with_a_restore";
    let Some(mut h) = Harness::new(test, &["gcc", "python3"]) else {
        return;
    };
    let bin = h.compile("advised.c", "advised");
    let dir = h.dir("adv");
    h.start("adv", "adv", &dir, &[], &[bin.to_str().unwrap(), PORT]);
    let log = h.wait_log("adv", "advised ");
    let line = log.lines().find(|l| l.contains("advised ")).unwrap();
    let starts: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| w.split_once('='))
        .map(|(_, a)| u64::from_str_radix(a, 16).unwrap())
        .collect();
    assert_eq!(starts.len(), 7, "{line}");
    assert_eq!(ask(&h), "contents=ok fork=ok", "before the snapshot");

    let before = vm_flags(pid_of(&h.instance("adv").unwrap()), &starts);
    assert_eq!(
        before.len(),
        7,
        "every region is its own mapping: {before:?}"
    );
    for (flag, region) in [
        ("hg", 0),
        ("nh", 1),
        ("dd", 1),
        ("dc", 2),
        ("sr", 2),
        ("wf", 3),
        ("rr", 3),
        ("lo", 4),
        ("lf", 5),
        ("nr", 6),
        ("mg", 6),
    ] {
        assert!(
            before[&starts[region]]
                .split_whitespace()
                .any(|f| f == flag),
            "region {region} lacks {flag} before the snapshot: {before:?}"
        );
    }

    let image = h.dir("img").join("adv.img");
    let ran = h.snapshot("adv", &image, &[]);
    assert!(ran.success(), "{ran}");
    h.restore("adv", &image, &[]);
    let after = vm_flags(pid_of(&h.instance("adv").unwrap()), &starts);
    for (i, start) in starts.iter().enumerate() {
        assert_eq!(
            after.get(start),
            before.get(start),
            "region {i} at {start:#x}: VmFlags before and after the restore"
        );
    }
    assert_eq!(ask(&h), "contents=ok fork=ok", "after the restore");
    h.stop("adv");
}
