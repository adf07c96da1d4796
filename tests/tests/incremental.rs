//! Incremental snapshots (`snapshot --parent PARENT`): after a snapshot
//! left running with `--track`, the supervisor keeps the instance's write
//! tracking, and a snapshot on that image saves only the pages written
//! since, referring to the rest in it. A restore follows the chain and
//! holds every page as it was at the last freeze (checked page by page
//! against the version table of `tests/programs/pagewriter.c`); a parent
//! missing, corrupt or replaced is refused naming it before any process
//! starts; `appshot merge` makes one whole image of a chain. A snapshot
//! killed midway leaves the instance running without its tracking, and
//! the parent as it was.

mod common;

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::pagewriter::{ask, real_port, snapshot_json, start_writer, tracking_left, writes_on};
use common::{
    forkshare_count, pid_of, poll, redis_cli, run, start_forkshare, start_redis, Harness, READY,
};

const PORT: u16 = 19431;

fn refused(h: &Harness, name: &str, image: &Path, flags: &[&str], needles: &[&str]) {
    let ran = h.snapshot(name, image, flags);
    assert!(!ran.success(), "{flags:?} accepted: {ran}");
    for needle in needles {
        assert!(
            ran.stderr.contains(needle),
            "{flags:?}: no {needle:?} in {ran}"
        );
    }
    assert!(!image.exists(), "{flags:?}: an image was written");
}

/// Like [`refused`], for an `image` that exists and stays as it was.
fn refused_keeping(h: &Harness, name: &str, image: &Path, flags: &[&str], needles: &[&str]) {
    let before = std::fs::read(image).unwrap();
    let ran = h.snapshot(name, image, flags);
    assert!(!ran.success(), "{flags:?} accepted: {ran}");
    for needle in needles {
        assert!(
            ran.stderr.contains(needle),
            "{flags:?}: no {needle:?} in {ran}"
        );
    }
    assert!(
        std::fs::read(image).unwrap() == before,
        "{flags:?}: the image changed"
    );
}

/// `appshot restore` of `image` is refused, naming `needles`, and starts
/// no instance.
fn restore_refused(h: &mut Harness, name: &str, image: &Path, needles: &[&str]) {
    let ran = h.try_restore(name, image, &[]);
    assert!(!ran.success(), "restored: {ran}");
    for needle in needles {
        assert!(ran.stderr.contains(needle), "no {needle:?} in {ran}");
    }
    assert!(h.instance(name).is_none(), "an instance started: {ran}");
}

#[test]
fn an_incremental_chain_saves_written_pages_only_restores_every_page_and_merges() {
    let test = "an_incremental_chain_saves_written_pages_only_restores_every_page_and_merges";
    let Some(mut h) = Harness::new(test, &["gcc"]) else {
        return;
    };
    // About 200 pages a second of 65,536.
    let real = start_writer(&mut h, "inc", PORT, 256, None, &["slow"]);
    let app = pid_of(&h.instance("inc").unwrap());
    let images = h.dir("images");
    let [a, b, c, merged] = ["a.img", "b.img", "c.img", "merged.img"].map(|n| images.join(n));
    let path = |p: &Path| p.to_str().unwrap().to_string();

    // Without --track the tracking ends with the snapshot: nothing to be
    // incremental on.
    snapshot_json(&h, "inc", &a, &["--leave-running"]);
    assert_eq!(tracking_left(app), Vec::<String>::new());
    refused(
        &h,
        "inc",
        &b,
        &["--leave-running", "--parent", &path(&a)],
        &["no write tracking", &path(&a)],
    );

    let full = snapshot_json(&h, "inc", &a, &["--leave-running", "--track"]);
    assert_eq!(full["tracked"], true, "{full}");
    assert!(!tracking_left(app).is_empty(), "no tracking kept in {app}");
    let after_a = writes_on(real, 0);
    writes_on(real, after_a + 100);
    let child = snapshot_json(&h, "inc", &b, &["--leave-running", "--parent", &path(&a)]);
    assert_eq!(child["parent"], path(&a), "{child}");
    let (full_size, child_size) = (
        full["size_bytes"].as_u64().unwrap(),
        child["size_bytes"].as_u64().unwrap(),
    );
    assert!(
        child_size * 20 < full_size,
        "the child is {child_size} bytes, the full image {full_size}: {child}"
    );
    assert_eq!(
        child["pages_bytes"], full["pages_bytes"],
        "the child holds the same memory, mostly by reference"
    );

    // A child written over its own parent is refused.
    refused_keeping(
        &h,
        "inc",
        &b,
        &["--leave-running", "--parent", &path(&b)],
        &["its own parent", &path(&b)],
    );

    // The tracking follows the last snapshot: its parent is no longer one
    // (refused, the tracking kept).
    refused(
        &h,
        "inc",
        &c,
        &["--leave-running", "--parent", &path(&a)],
        &["is not the state", &path(&a)],
    );
    assert!(
        !tracking_left(app).is_empty(),
        "a refusal ended the tracking"
    );

    // A third link, stopping the instance.
    let after_b = writes_on(real, 0);
    let before_c = writes_on(real, after_b + 100);
    let last = snapshot_json(&h, "inc", &c, &["--parent", &path(&b)]);
    assert_eq!(last["left_running"], false);
    assert!(h.instance("inc").is_none(), "stopped by the snapshot");

    let shown = h.inspect(&c);
    let parents: Vec<&str> = shown["parents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["path"].as_str().unwrap())
        .collect();
    assert_eq!(parents, [path(&b), path(&a)], "{shown}");
    assert!(
        shown["own_pages_bytes"].as_u64().unwrap() * 20 < shown["pages_bytes"].as_u64().unwrap(),
        "{shown}"
    );

    h.restore("inc", &c, &[]);
    let (writes, intact, line) = ask(real_port(&h, "inc"));
    assert!(
        intact,
        "restored memory differs from its version table: {line}"
    );
    assert!(
        writes >= before_c,
        "restored at {writes}, before C {before_c}"
    );
    writes_on(real_port(&h, "inc"), writes);
    h.stop("inc");

    let mut merge = h.appshot();
    merge.arg("merge").arg(&c).arg("-o").arg(&merged);
    let ran = run(&mut merge, Duration::from_secs(60));
    assert!(ran.success(), "merge: {ran}");
    let flat = h.inspect(&merged);
    assert_eq!(flat["parents"].as_array().unwrap().len(), 0, "{flat}");
    assert_eq!(flat["id"], shown["id"], "the same state keeps its id");

    // A missing parent, named.
    let away = images.join("b.away");
    std::fs::rename(&b, &away).unwrap();
    restore_refused(&mut h, "inc", &c, &[&path(&b)]);
    // Replaced: another image at its path.
    std::fs::copy(&merged, &b).unwrap();
    restore_refused(&mut h, "inc", &c, &[&path(&b), "replaced"]);
    std::fs::rename(&away, &b).unwrap();
    // Corrupt: one byte of the grandparent's pages flipped, and back.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&a)
        .unwrap();
    let flip = |f: &std::fs::File| {
        let mut byte = [0u8];
        f.read_exact_at(&mut byte, 4096 + 12345).unwrap();
        f.write_all_at(&[byte[0] ^ 0x10], 4096 + 12345).unwrap();
    };
    flip(&file);
    restore_refused(&mut h, "inc", &c, &[&path(&a), "checksum"]);
    flip(&file);

    // The merged image needs none of them.
    for p in [&a, &b, &c] {
        std::fs::remove_file(p).unwrap();
    }
    h.restore("inc", &merged, &[]);
    let (writes, intact, line) = ask(real_port(&h, "inc"));
    assert!(intact, "merged image restored differs: {line}");
    assert!(
        writes >= before_c,
        "restored at {writes}, before C {before_c}"
    );
}

#[test]
fn an_incremental_snapshot_killed_midway_leaves_the_instance_untracked_and_the_parent_intact() {
    let test =
        "an_incremental_snapshot_killed_midway_leaves_the_instance_untracked_and_the_parent_intact";
    let Some(mut h) = Harness::new(test, &["gcc"]) else {
        return;
    };
    let real = start_writer(&mut h, "inck", PORT + 1, 512, None, &[]);
    let app = pid_of(&h.instance("inck").unwrap());
    let images = h.dir("images");
    let (a, b) = (images.join("a.img"), images.join("b.img"));
    snapshot_json(&h, "inck", &a, &["--leave-running", "--track"]);
    let identity = |p: &Path| {
        let m = std::fs::metadata(p).expect("image exists");
        (m.ino(), m.size(), m.mtime(), m.mtime_nsec(), m.ctime_nsec())
    };
    let kept = identity(&a);
    // A good part of the 131,072 pages written, so that the incremental
    // snapshot has much to copy.
    let now = writes_on(real, 0);
    assert!(
        poll(Duration::from_secs(60), || ask(real).0 > now + 40_000),
        "the writer does not write"
    );

    let temporaries = || {
        std::fs::read_dir(&images)
            .unwrap()
            .filter(|e| {
                let name = e.as_ref().unwrap().file_name();
                name.to_string_lossy().starts_with(".b.img.tmp.")
            })
            .count()
    };
    let mut cli = h.appshot();
    cli.args(["snapshot", "inck", "-o"])
        .arg(&b)
        .args(["--leave-running", "--parent"])
        .arg(&a)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut cli = cli.spawn().expect("appshot snapshot starts");
    let started = poll(Duration::from_secs(30), || temporaries() > 0);
    cli.kill().unwrap();
    let _ = cli.wait();
    assert!(started, "the incremental snapshot never started");

    let mut left = Vec::new();
    let gone = poll(Duration::from_secs(10), || {
        left = tracking_left(app);
        left.is_empty()
    });
    assert!(gone, "write tracking left in pid {app}: {left:?}");
    assert!(h.instance("inck").is_some(), "inck runs on");
    let now = writes_on(real, 0);
    writes_on(real, now);
    assert!(!b.exists(), "the killed snapshot's image is in place");
    assert!(
        poll(Duration::from_secs(10), || temporaries() == 0),
        "temporary left"
    );
    assert_eq!(identity(&a), kept, "the parent image was touched");

    // The tracking is gone: the next incremental snapshot is refused, and
    // a full one works.
    let path = a.to_str().unwrap();
    refused(
        &h,
        "inck",
        &b,
        &["--leave-running", "--parent", path],
        &["no write tracking"],
    );
    snapshot_json(&h, "inck", &b, &["--leave-running"]);
    h.stop("inck");
    h.restore("inck", &a, &[]);
    let (_, intact, line) = ask(real_port(&h, "inck"));
    assert!(intact, "the parent restored differs: {line}");
}

/// A region mapped anew (MAP_FIXED) after the parent was taken is no
/// longer covered by the tracking: the child saves it whole instead of
/// referring to the parent's pages of the old mapping, twice in a row.
#[test]
fn a_process_remapping_its_memory_between_snapshots_restores_every_page_from_the_chain() {
    let test =
        "a_process_remapping_its_memory_between_snapshots_restores_every_page_from_the_chain";
    let Some(mut h) = Harness::new(test, &["gcc"]) else {
        return;
    };
    let real = start_writer(&mut h, "incc", PORT + 2, 16, None, &["churn"]);
    let images = h.dir("images");
    let [a, b, c] = ["a.img", "b.img", "c.img"].map(|n| images.join(n));
    snapshot_json(&h, "incc", &a, &["--leave-running", "--track"]);
    // Remapped about every 512 writes.
    let now = writes_on(real, 0);
    writes_on(real, now + 5_000);
    let flags = ["--leave-running", "--parent", a.to_str().unwrap()];
    snapshot_json(&h, "incc", &b, &flags);
    let now = writes_on(real, 0);
    let before = writes_on(real, now + 5_000);
    snapshot_json(&h, "incc", &c, &["--parent", b.to_str().unwrap()]);
    h.restore("incc", &c, &[]);
    let (writes, intact, line) = ask(real_port(&h, "incc"));
    assert!(intact, "restored memory differs from its table: {line}");
    assert!(writes >= before, "restored at {writes}, before {before}");
    writes_on(real_port(&h, "incc"), writes);
}

/// An unmodified redis-server: its dataset (`DEBUG DIGEST`, a checksum of
/// every key and value) comes back from a chain whose last image saved
/// only what the writes after the parent touched.
#[test]
fn redis_comes_back_from_an_incremental_chain_with_every_key() {
    let test = "redis_comes_back_from_an_incremental_chain_with_every_key";
    let Some(mut h) = Harness::new(test, &["redis-server", "redis-cli"]) else {
        return;
    };
    start_redis(&mut h, "redis-i", "ri", &["--enable-debug-command", "yes"]);
    let cli = |args: &[&str]| redis_cli(&h, "ri", args);
    assert_eq!(cli(&["DEBUG", "POPULATE", "200000", "key", "256"]), "OK");
    let images = h.dir("images");
    let (a, b) = (images.join("a.img"), images.join("b.img"));
    let full = snapshot_json(&h, "redis-i", &a, &["--leave-running", "--track"]);
    for i in 0..50 {
        assert_eq!(
            cli(&["SET", &format!("key:{}", i * 997), &format!("new-{i}")]),
            "OK"
        );
    }
    assert_eq!(cli(&["DEL", "key:5"]), "1");
    let digest = cli(&["DEBUG", "DIGEST"]);
    let child = snapshot_json(&h, "redis-i", &b, &["--parent", a.to_str().unwrap()]);
    let (full_size, child_size) = (
        full["size_bytes"].as_u64().unwrap(),
        child["size_bytes"].as_u64().unwrap(),
    );
    assert!(
        child_size * 5 < full_size,
        "the child is {child_size} bytes, the full image {full_size}"
    );
    h.restore("redis-i", &b, &[]);
    let cli = |args: &[&str]| redis_cli(&h, "ri", args);
    assert_eq!(cli(&["DEBUG", "DIGEST"]), digest, "the dataset differs");
    assert_eq!(cli(&["DBSIZE"]), "199999");
    assert_eq!(cli(&["GET", "key:997"]), "new-1");
    assert_eq!(cli(&["SET", "after", "restore"]), "OK");
}

/// A parent and its child (`tests/programs/forkshare.c`: a pipe, a shared
/// page, 8 MiB still shared copy-on-write since the fork): an incremental
/// snapshot refers to both processes' unchanged pages in the parent image
/// and keeps the child's shared ones unsaved, and the tree restored from
/// the chain goes on as before.
#[test]
fn a_process_tree_comes_back_from_an_incremental_chain() {
    let test = "a_process_tree_comes_back_from_an_incremental_chain";
    let Some(mut h) = Harness::new(test, &["gcc"]) else {
        return;
    };
    let (dir, log) = start_forkshare(&mut h, "fs", "t", 5);
    let (a, b) = (dir.join("a.img"), dir.join("b.img"));
    snapshot_json(&h, "fs", &a, &["--leave-running", "--track"]);
    let now = forkshare_count(&log);
    assert!(
        poll(READY, || forkshare_count(&log) >= now + 5),
        "the child stopped"
    );
    snapshot_json(&h, "fs", &b, &["--parent", a.to_str().unwrap()]);
    let at_snapshot = forkshare_count(&log);
    let info = h.inspect(&b);
    let procs = info["processes"].as_array().expect("processes listed");
    assert_eq!(procs.len(), 2, "{info}");
    assert!(
        procs[1]["cow_bytes"].as_u64().unwrap() >= 8 << 20,
        "the child's 8 MiB shared with its parent are not saved: {info}"
    );
    assert!(
        info["own_pages_bytes"].as_u64().unwrap() < 2 << 20,
        "the unchanged pages are in the parent image: {info}"
    );

    h.restore("fs", &b, &[]);
    assert!(
        poll(READY, || forkshare_count(&log) >= at_snapshot + 10),
        "the child goes on reading what its parent writes: {:?}",
        std::fs::read_to_string(&log)
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        !text.contains("MISMATCH") && !text.contains("EOF"),
        "pipe and shared page agree after restore:\n{text}"
    );
}
