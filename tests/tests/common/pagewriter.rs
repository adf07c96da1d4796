//! Helpers for tests of `tests/programs/pagewriter.c`: a process that
//! keeps writing its memory and answers whether every page still holds
//! the version its table gives it.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use super::{poll, port_pairs, Harness};

/// One answer of pagewriter on real port `real`: (writes, intact, line).
pub fn ask(real: u16) -> (u64, bool, String) {
    let line = super::answer_of(real, "pagewriter");
    let field = |k: &str| {
        line.split_whitespace()
            .find_map(|f| f.strip_prefix(k))
            .unwrap_or_else(|| panic!("no {k} in {line:?}"))
            .to_string()
    };
    let writes = field("writes=").parse().expect("a count");
    let intact = field("intact=") == "1";
    (writes, intact, line)
}

/// Starts pagewriter (`mib` MiB) as `name` on `port`, as `user` if given,
/// with `extra` arguments; returns its real port.
pub fn start_writer(
    h: &mut Harness,
    name: &str,
    port: u16,
    mib: u32,
    user: Option<&str>,
    extra: &[&str],
) -> u16 {
    let bin = h.compile("pagewriter.c", "pagewriter");
    let dir = h.dir(name);
    let port_s = port.to_string();
    let mut flags = vec!["--port", &port_s];
    if let Some(user) = user {
        // The user must reach the program and its cwd.
        for d in [&dir, bin.parent().unwrap(), dir.parent().unwrap()] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        flags.extend(["--user", user]);
    }
    let mib = mib.to_string();
    let mut command = vec![bin.to_str().unwrap(), &port_s, &mib];
    command.extend(extra);
    h.start(name, name, &dir, &flags, &command);
    h.wait_log(name, "ready");
    real_port(h, name)
}

pub fn real_port(h: &Harness, name: &str) -> u16 {
    let row = h.instance(name).expect("listed");
    let pairs = port_pairs(&row);
    assert_eq!(pairs.len(), 1, "one translation: {row}");
    pairs[0].real
}

/// What of the write tracking is left in process `pid`: a userfaultfd in
/// its fd table, or a mapping registered for write-protect (`uw` in its
/// smaps flags).
pub fn tracking_left(pid: u32) -> Vec<String> {
    let mut left = Vec::new();
    if let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for fd in fds.flatten() {
            let link = std::fs::read_link(fd.path()).unwrap_or_default();
            if link.to_string_lossy().contains("userfaultfd") {
                left.push(format!("fd {:?} -> {}", fd.file_name(), link.display()));
            }
        }
    }
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    for line in smaps.lines().filter(|l| l.starts_with("VmFlags:")) {
        if line.split_whitespace().any(|f| f == "uw") {
            left.push(line.to_string());
        }
    }
    left
}

/// Polls until the writer has written more than `than` pages, intact.
pub fn writes_on(real: u16, than: u64) -> u64 {
    let mut last = (0, true, String::new());
    let moved = poll(Duration::from_secs(10), || {
        last = ask(real);
        last.0 > than
    });
    assert!(moved, "the writer stopped writing: {}", last.2);
    assert!(last.1, "memory broken: {}", last.2);
    last.0
}

pub fn snapshot_json(h: &Harness, name: &str, image: &Path, flags: &[&str]) -> Value {
    let mut all = flags.to_vec();
    all.push("--json");
    let ran = h.snapshot(name, image, &all);
    assert!(ran.success(), "snapshot {name} {flags:?}: {ran}");
    serde_json::from_str(&ran.stdout).unwrap_or_else(|e| panic!("{e}: {ran}"))
}
