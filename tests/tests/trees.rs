//! Whole process trees: a parent and its child sharing a pipe, shared
//! anonymous memory and copy-on-write pages come back as they were, with
//! the same PIDs; nginx, master and 4 workers, serves again.

mod common;

use std::fs;
use std::path::Path;
use std::time::Duration;

use common::{
    alive, children, cmdline, forkshare_count as last_count, pid_of, poll, start_forkshare,
    Harness, READY,
};

/// `(ns pid, ns pgid, ns sid)` of a process, as the instance sees it.
fn ns_ids(pid: u32) -> (u32, u32, u32) {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| -> u32 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .and_then(|v| v.split_whitespace().last())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
    };
    (field("NSpid"), field("NSpgid"), field("NSsid"))
}

/// The process `root` and all its descendants.
fn tree(root: u32) -> Vec<u32> {
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        let more = children(out[i]);
        out.extend(more);
        i += 1;
    }
    out
}

/// Proportional set size of the processes, in KiB.
fn pss_kib(pids: &[u32]) -> u64 {
    pids.iter()
        .map(|p| {
            fs::read_to_string(format!("/proc/{p}/smaps_rollup"))
                .unwrap_or_default()
                .lines()
                .find_map(|l| l.strip_prefix("Pss:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .unwrap_or(0)
        })
        .sum()
}

#[test]
fn a_parent_and_child_sharing_a_pipe_and_shared_memory_go_on_after_restore() {
    let Some(mut h) = Harness::new(
        "a_parent_and_child_sharing_a_pipe_and_shared_memory_go_on_after_restore",
        &["gcc"],
    ) else {
        return;
    };
    let (dir, log) = start_forkshare(&mut h, "fs", "t", 5);
    let parent = pid_of(&h.instance("fs").expect("listed"));
    let before: Vec<_> = tree(parent).into_iter().map(ns_ids).collect();
    assert_eq!(before.len(), 2, "parent and child: {before:?}");
    let pss_before = pss_kib(&tree(parent));

    let image = dir.join("fs.img");
    let ran = h.snapshot("fs", &image, &[]);
    assert!(ran.success(), "snapshot of a parent and its child: {ran}");
    let at_snapshot = last_count(&log);
    let info = h.inspect(&image);
    let procs = info["processes"].as_array().expect("processes listed");
    assert_eq!(procs.len(), 2, "{info}");
    assert!(
        procs[1]["cow_bytes"].as_u64().unwrap() >= 8 << 20,
        "the child's 8 MiB written before the fork are shared with its parent, not saved again: {info}"
    );

    h.restore("fs", &image, &[]);
    assert!(
        poll(READY, || last_count(&log) >= at_snapshot + 10),
        "the child goes on reading what its parent writes: {:?}",
        fs::read_to_string(&log)
    );
    let text = fs::read_to_string(&log).unwrap();
    assert!(
        !text.contains("MISMATCH") && !text.contains("EOF"),
        "pipe and shared page agree after restore:\n{text}"
    );
    let counts: Vec<u64> = text
        .lines()
        .filter_map(|l| l.strip_prefix("ok "))
        .filter_map(|n| n.parse().ok())
        .collect();
    assert!(
        counts.windows(2).all(|w| w[1] == w[0] + 1),
        "every number once, in order, across the restore: {counts:?}"
    );
    let parent = pid_of(&h.instance("fs").expect("listed"));
    let after: Vec<_> = tree(parent).into_iter().map(ns_ids).collect();
    assert_eq!(after, before, "same PIDs, groups and sessions");
    let pss_after = pss_kib(&tree(parent));
    println!("forkshare PSS: {pss_before} KiB before, {pss_after} KiB after restore");
    assert!(
        pss_after * 10 <= pss_before * 12,
        "memory shared copy-on-write stays shared: PSS {pss_before} KiB before, {pss_after} KiB after"
    );
}

/// nginx with `worker_processes 4`, everything below `dir`.
fn write_config(dir: &Path, port: u16, daemon: bool) -> String {
    fs::create_dir_all(dir.join("www")).unwrap();
    let d = dir.display();
    let config = format!(
        "worker_processes 4;
daemon {};
user root;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 64; }}
http {{
    access_log {d}/access.log;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    server {{
        listen {port};
        root {d}/www;
        location / {{ return 200 \"$pid\\n\"; }}
    }}
}}
",
        if daemon { "on" } else { "off" }
    );
    let path = dir.join("nginx.conf");
    fs::write(&path, config).unwrap();
    path.to_string_lossy().into_owned()
}

/// The nginx master of an instance (the main process with `daemon off`;
/// with `daemon on`, init's child left after the first process exited).
fn master_of(h: &Harness, name: &str) -> u32 {
    let row = h.instance(name).expect("listed");
    let supervisor = row["supervisor_pid"].as_u64().expect("supervisor pid") as u32;
    // The supervisor's one child is the namespace init.
    children(supervisor)
        .into_iter()
        .flat_map(children)
        .find(|&p| cmdline(p).contains("master process"))
        .expect("an nginx master below the instance's init")
}

/// Which workers answer: the ns PIDs curl sees, over many requests.
fn serving_pids(h: &Harness, aid: &str, port: u16) -> std::collections::BTreeSet<String> {
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..40 {
        let got = h.curl(aid, &format!("http://127.0.0.1:{port}/"));
        assert!(got.success(), "nginx of {aid} answers: {got}");
        seen.insert(got.stdout.trim().to_string());
    }
    seen
}

fn nginx_tree_round_trip(daemon: bool) {
    let test = format!("nginx_tree_round_trip_daemon_{daemon}");
    let Some(mut h) = Harness::new(&test, &["nginx", "curl"]) else {
        return;
    };
    let port = 19900;
    let nginx = common::which("nginx").unwrap();
    let dir = h.dir("ng");
    let config = write_config(&dir, port, daemon);
    let prefix = format!("{}/", dir.display());
    let error_log = format!("{}/error.log", dir.display());
    h.start(
        "ng",
        "na",
        &dir,
        &[],
        &[
            nginx.to_str().unwrap(),
            "-p",
            &prefix,
            "-e",
            &error_log,
            "-c",
            &config,
        ],
    );
    assert!(
        poll(READY, || h.instance("ng").is_some_and(|_| tree(master_of(
            &h, "ng"
        ))
        .len()
            == 5)),
        "nginx runs a master and 4 workers"
    );
    let master = master_of(&h, "ng");
    let mut before: Vec<_> = tree(master).into_iter().map(ns_ids).collect();
    before.sort_unstable();
    let pss_before = pss_kib(&tree(master));
    let _ = serving_pids(&h, "na", port);

    // A copy beside the original, under another AID.
    let copy = dir.join("copy.img");
    let ran = h.snapshot("ng", &copy, &["--leave-running"]);
    assert!(ran.success(), "live snapshot of nginx: {ran}");
    h.restore("ng-copy", &copy, &["--name", "ng-copy", "--aid", "nb"]);
    for aid in ["na", "nb"] {
        let got = h.curl(aid, &format!("http://127.0.0.1:{port}/"));
        assert!(got.success(), "{aid} is served by its own nginx: {got}");
    }
    h.stop("ng-copy");

    let image = dir.join("ng.img");
    let ran = h.snapshot("ng", &image, &[]);
    assert!(ran.success(), "snapshot of nginx: {ran}");
    assert!(!alive(master), "a stopping snapshot ends the instance");
    h.restore("ng", &image, &[]);
    let master = master_of(&h, "ng");
    let mut after: Vec<_> = tree(master).into_iter().map(ns_ids).collect();
    after.sort_unstable();
    assert_eq!(after, before, "same PIDs, process groups and sessions");
    let workers: std::collections::BTreeSet<String> = before
        .iter()
        .skip(1)
        .map(|(pid, _, _)| pid.to_string())
        .collect();
    assert!(
        poll(Duration::from_secs(20), || serving_pids(&h, "na", port)
            == workers),
        "all 4 restored workers serve again ({workers:?})"
    );
    let pss_after = pss_kib(&tree(master));
    println!("nginx tree PSS: {pss_before} KiB before, {pss_after} KiB after restore");
    assert!(
        pss_after * 10 <= pss_before * 12,
        "PSS {pss_before} KiB before, {pss_after} KiB after"
    );

    // A template cloned three times, each clone its own AID.
    let template = dir.join("template.img");
    let ran = h.snapshot("ng", &template, &["--template"]);
    assert!(ran.success(), "template of nginx: {ran}");
    for aid in ["c1", "c2", "c3"] {
        h.clone_template(
            &[aid.to_string()],
            &template,
            &["--aid", aid, "--name", aid],
        );
    }
    for aid in ["c1", "c2", "c3"] {
        assert_eq!(tree(master_of(&h, aid)).len(), 5, "{aid} has its 4 workers");
        let got = h.curl(aid, &format!("http://127.0.0.1:{port}/"));
        assert!(got.success(), "clone {aid} serves its own AID: {got}");
    }
}

#[test]
fn nginx_with_four_workers_in_the_foreground_comes_back_whole() {
    nginx_tree_round_trip(false);
}

#[test]
fn daemonised_nginx_with_four_workers_comes_back_whole() {
    nginx_tree_round_trip(true);
}

/// A shell forking short-lived children without pause: every live snapshot
/// stops the tree as it is at that moment, whatever was born or ended (or
/// is waiting to be reaped) since it was listed, and the instance goes on.
/// A process that exited between the listing and the freeze, or a child
/// forked after it, once failed the snapshot or was left out of it.
#[test]
fn a_tree_forking_without_pause_is_snapshotted_every_time_and_restores() {
    let Some(mut h) = Harness::new(
        "a_tree_forking_without_pause_is_snapshotted_every_time_and_restores",
        &[],
    ) else {
        return;
    };
    let dir = h.dir("forker");
    let count = dir.join("count");
    let script = format!(
        "i=0; while :; do /bin/true; i=$((i+1)); echo $i > {}; done",
        count.display()
    );
    h.start("forker", "t", &dir, &[], &["/bin/sh", "-c", &script]);
    let counted = || {
        fs::read_to_string(&count)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    assert!(poll(READY, || counted() > 100), "the shell does not loop");
    let images = h.dir("images");
    for i in 0..10 {
        let image = images.join(format!("f{i}.img"));
        let ran = h.snapshot("forker", &image, &["--leave-running"]);
        assert!(ran.success(), "snapshot {i} of a forking tree: {ran}");
        let now = counted();
        assert!(
            poll(READY, || counted() > now + 10),
            "the shell stopped looping after snapshot {i}"
        );
    }
    h.stop("forker");
    h.restore("forker", &images.join("f9.img"), &[]);
    let now = counted();
    assert!(
        poll(READY, || counted() > now + 100),
        "the restored shell does not loop on"
    );
    h.stop("forker");
}
