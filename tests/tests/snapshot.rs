//! `appshot snapshot`, `restore` and `inspect` on real programs: a restored
//! instance continues where it stopped (memory, threads, files, pipes,
//! listening sockets, PID), serves its AID on the virtual port again, and a
//! restore that cannot succeed is refused with a message naming what is
//! wrong and leaves nothing behind.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::{
    alive, ask_keeper, assert_left_nothing, info_field, keeper, keeper_copy, pid_of, pids_with_arg,
    poll, port_pairs, redis_cli, start_keeper, start_redis, Harness, Keeper, Ran, READY,
};
use serde_json::Value;

/// Polls until every counter has passed those of `than` (the worker threads
/// run); returns that answer.
fn counters_pass(h: &Harness, aid: &str, than: &Keeper) -> Keeper {
    let mut now = than.clone();
    let moved = poll(READY, || {
        now = keeper(h, aid);
        now.counters.iter().zip(than.counters).all(|(n, t)| *n > t)
    });
    assert!(
        moved,
        "AID {aid}: statekeeper counters stopped advancing: {} then {}",
        than.line, now.line
    );
    now
}

/// `appshot snapshot NAME -o IMAGE` (no --leave-running): succeeds, and the
/// instance is gone, with its translations and its application process.
fn snapshot_and_stop(h: &Harness, name: &str, image: &Path) {
    let app = pid_of(
        &h.instance(name)
            .unwrap_or_else(|| panic!("{name} listed before its snapshot")),
    );
    let ran = h.snapshot(name, image, &[]);
    assert!(ran.success(), "appshot snapshot {name}: {ran}");
    assert!(ran.stdout.contains("stopped"), "snapshot {name}: {ran}");
    assert!(
        h.instance(name).is_none(),
        "ps still lists {name} after its snapshot stopped it: {:#?}",
        h.ps()
    );
    assert!(
        !alive(app),
        "application {app} of {name} ({}) still runs after the snapshot",
        common::cmdline(app)
    );
    assert_eq!(
        h.translations(name),
        Vec::<Value>::new(),
        "{name} stopped by its snapshot still owns translations"
    );
    let mode = fs::metadata(image)
        .unwrap_or_else(|e| panic!("image {}: {e}", image.display()))
        .permissions()
        .mode();
    assert_eq!(
        mode & 0o777,
        0o600,
        "image {} holds process memory: mode must be 0600",
        image.display()
    );
}

/// A refused restore: fails, says `object` and one of `why`, and leaves
/// nothing behind ([`common::assert_left_nothing`]).
fn assert_restore_refused(
    h: &Harness,
    ran: &Ran,
    name: &str,
    object: &str,
    why: &[&str],
    marker: &str,
    processes: &BTreeSet<u32>,
) {
    assert!(!ran.success(), "restore as {name} must be refused: {ran}");
    assert!(
        ran.stderr.contains(object) && why.iter().any(|w| ran.stderr.contains(w)),
        "restore as {name}: the message must name {object} and say one of {why:?}: {ran}"
    );
    assert_left_nothing(h, "restore", &[name], marker, processes);
}

fn header_u64(image: &[u8], at: usize) -> usize {
    u64::from_le_bytes(image[at..at + 8].try_into().unwrap()) as usize
}

/// Pages section (offset, length) and manifest (offset, length) of an
/// image, from its header.
fn sections(image: &[u8]) -> ((usize, usize), (usize, usize)) {
    (
        (header_u64(image, 12), header_u64(image, 20)),
        (header_u64(image, 32), header_u64(image, 40)),
    )
}

/// The CRC32 of `data` as python3's zlib computes it (not our own code).
fn zlib_crc32(data: &Path) -> u32 {
    let path = data.to_str().expect("utf-8 path");
    let ran = common::run(
        std::process::Command::new("python3").args([
            "-c",
            "import sys, zlib; print(zlib.crc32(open(sys.argv[1], 'rb').read()))",
            path,
        ]),
        READY,
    );
    assert!(ran.success(), "python3 zlib.crc32: {ran}");
    ran.stdout.trim().parse().expect("a CRC32")
}

#[test]
fn statekeeper_continues_where_it_stopped() {
    let test = "statekeeper_continues_where_it_stopped";
    let Some(mut h) = Harness::new(test, &["gcc", "python3"]) else {
        return;
    };
    let bin = h.compile("statekeeper.c", "statekeeper");
    let data = start_keeper(&mut h, "keeper", "s", &bin);

    let first = keeper(&h, "s");
    assert_eq!(
        (first.offset, first.next.as_str(), first.pid),
        (4, "45", 2),
        "{}",
        first.line
    );
    // Running a while (at least ~300 ms of worker ticks), then the last
    // answer before the snapshot.
    let before = counters_pass(
        &h,
        "s",
        &Keeper {
            counters: first.counters.map(|c| c + 60),
            ..first.clone()
        },
    );
    assert_eq!(before.secret, first.secret, "{}", before.line);

    let images = h.dir("images");
    let image = images.join("keeper.img");
    snapshot_and_stop(&h, "keeper", &image);
    assert_eq!(
        pids_with_arg(&data),
        BTreeSet::new(),
        "processes of the snapshotted instance remain"
    );
    let names: Vec<String> = fs::read_dir(&images)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["keeper.img"], "the snapshot left temporaries");

    let info = h.inspect(&image);
    assert_eq!(info["instance"], "keeper", "{info:#}");
    assert_eq!(info["aid"], "s", "{info:#}");
    assert_eq!(info["pid"], 2, "{info:#}");
    assert_eq!(info["exe"], bin.to_str().unwrap(), "{info:#}");
    let threads = info["threads"].as_array().expect("threads");
    assert_eq!(threads.len(), 4, "main thread and 3 workers: {info:#}");
    assert_eq!(
        info["listening"],
        serde_json::json!(["0.0.0.0:9000"]),
        "the listening socket, by its virtual port: {info:#}"
    );
    let fds: Vec<&str> = info["fds"]
        .as_array()
        .expect("fds")
        .iter()
        .map(|f| f["kind"].as_str().expect("fd kind"))
        .collect();
    assert!(
        fds.iter()
            .any(|k| k.starts_with("pipe") && k.contains("read end, 10 bytes unread")),
        "a pipe with 10 unread bytes: {fds:#?}"
    );
    assert!(
        fds.contains(&format!("file {data} at offset 4").as_str()),
        "the data file at offset 4: {fds:#?}"
    );

    h.restore("keeper", &image, &[]);
    let row = h.instance("keeper").expect("keeper listed after restore");
    assert_eq!(row["aid"], "s", "{row}");
    let pairs = port_pairs(&row);
    assert_eq!(pairs.len(), 1, "{row}");
    assert_eq!(pairs[0].virtual_port, 9000, "{row}");

    let after = keeper(&h, "s");
    assert_eq!(
        after.secret, before.secret,
        "a restored statekeeper keeps its heap secret (a restart makes a new one): {} vs {}",
        before.line, after.line
    );
    assert!(
        after
            .counters
            .iter()
            .zip(before.counters)
            .all(|(a, b)| *a >= b),
        "counters went back: before the snapshot {}, after the restore {}",
        before.line,
        after.line
    );
    assert_eq!(
        (after.offset, after.next.as_str(), after.pid),
        (4, "45", 2),
        "file offset and PID survive: {}",
        after.line
    );
    counters_pass(&h, "s", &after);

    assert_eq!(
        ask_keeper(&h, "s", "pipe\n"),
        "pipe=pipe-bytes",
        "the unread pipe bytes survive"
    );
    assert_eq!(
        ask_keeper(&h, "s", "pipe\n"),
        "pipe=",
        "and are read only once"
    );
    assert_eq!(keeper(&h, "s").secret, before.secret);
}

#[test]
fn http_server_serves_its_aid_again_after_restore() {
    let Some(mut h) = Harness::new(
        "http_server_serves_its_aid_again_after_restore",
        &["python3", "curl"],
    ) else {
        return;
    };
    let dir = h.dir("www");
    // Unique to this test's work dir: no other server lists it.
    let marker = format!(
        "only-in-snapshot-{}.txt",
        dir.parent().unwrap().file_name().unwrap().to_string_lossy()
    );
    fs::write(dir.join(&marker), "h").unwrap();
    h.start(
        "web-h",
        "h",
        &dir,
        &[],
        &["python3", "-m", "http.server", "9000"],
    );
    h.wait_log("web-h", "port 9000");
    let url = "http://127.0.0.1:9000/";
    let got = h.curl("h", url);
    assert!(got.success() && got.stdout.contains(&marker), "{got}");

    let image = h.dir("images").join("web-h.img");
    snapshot_and_stop(&h, "web-h", &image);
    // Port 9000 is no virtual port of this registry now, so the connect may
    // pass through to whatever the host runs there: just not to web-h.
    let gone = h.curl("h", url);
    assert!(
        !gone.stdout.contains(&marker),
        "the snapshotted instance must not serve: {gone}"
    );

    h.restore("web-h", &image, &[]);
    let got = h.curl("h", url);
    assert!(got.success(), "curl under h after restore: {got}");
    assert!(
        got.stdout.contains(&marker),
        "the restored http.server lists its directory: {got}"
    );
    let other = h.curl("x", url);
    assert_eq!(other.code, Some(7), "AID x has no instance: {other}");

    let row = h.instance("web-h").expect("web-h listed after restore");
    let pairs = port_pairs(&row);
    assert_eq!(pairs.len(), 1, "{row}");
    assert_eq!(pairs[0].virtual_port, 9000, "{row}");
    assert_ne!(pairs[0].real, 0, "a real port: {row}");
    let translations = h.translations("web-h");
    assert_eq!(translations.len(), 1, "{translations:#?}");
    assert_eq!(translations[0]["aid"], "h", "{translations:#?}");
    assert_eq!(
        translations[0]["real_port"].as_u64(),
        Some(pairs[0].real as u64),
        "{translations:#?}"
    );
}

#[test]
fn redis_keeps_its_keys_and_identity_across_restore() {
    let Some(mut h) = Harness::new(
        "redis_keeps_its_keys_and_identity_across_restore",
        &["redis-server", "redis-cli"],
    ) else {
        return;
    };
    start_redis(&mut h, "redis-r", "r", &[]);
    for i in 0..20 {
        let (k, v) = (format!("key-{i}"), format!("value-{i}"));
        assert_eq!(redis_cli(&h, "r", &["SET", &k, &v]), "OK");
    }
    assert_eq!(redis_cli(&h, "r", &["RPUSH", "list", "a", "b", "c"]), "3");
    let info = redis_cli(&h, "r", &["INFO", "server"]);
    let (pid, run_id) = (info_field(&info, "process_id"), info_field(&info, "run_id"));

    let image = h.dir("images").join("redis-r.img");
    snapshot_and_stop(&h, "redis-r", &image);
    h.restore("redis-r", &image, &[]);

    for i in [0, 7, 19] {
        assert_eq!(
            redis_cli(&h, "r", &["GET", &format!("key-{i}")]),
            format!("value-{i}"),
            "key-{i} after restore"
        );
    }
    assert_eq!(redis_cli(&h, "r", &["DBSIZE"]), "21");
    assert_eq!(
        redis_cli(&h, "r", &["LRANGE", "list", "0", "-1"]),
        "a\nb\nc"
    );
    let info = redis_cli(&h, "r", &["INFO", "server"]);
    assert_eq!(
        (info_field(&info, "process_id"), info_field(&info, "run_id")),
        (pid, run_id),
        "the restored redis is the same process, not a restart"
    );
    assert_eq!(redis_cli(&h, "r", &["SET", "after", "restore"]), "OK");
    assert_eq!(redis_cli(&h, "r", &["GET", "after"]), "restore");
    assert_eq!(redis_cli(&h, "r", &["DBSIZE"]), "22");
    let row = h.instance("redis-r").expect("redis-r listed");
    assert!(
        port_pairs(&row).iter().all(|p| p.virtual_port == 6379) && !port_pairs(&row).is_empty(),
        "{row}"
    );
}

#[test]
fn leave_running_snapshot_restores_a_copy_beside_the_original() {
    let Some(mut h) = Harness::new(
        "leave_running_snapshot_restores_a_copy_beside_the_original",
        &["gcc", "python3"],
    ) else {
        return;
    };
    let bin = h.compile("statekeeper.c", "statekeeper");
    start_keeper(&mut h, "orig", "la", &bin);
    let before = keeper(&h, "la");
    let row = h.instance("orig").expect("orig listed");

    let image = h.dir("images").join("orig.img");
    let ran = h.snapshot("orig", &image, &["--leave-running"]);
    assert!(ran.success(), "snapshot --leave-running: {ran}");
    assert!(ran.stdout.contains("left running"), "{ran}");
    let still = h.instance("orig").expect("orig still listed");
    assert_eq!(
        (&still["pid"], &still["supervisor_pid"]),
        (&row["pid"], &row["supervisor_pid"]),
        "the same instance runs on: {still}"
    );
    let orig_now = counters_pass(&h, "la", &before);
    assert_eq!(orig_now.secret, before.secret);

    h.restore("copy", &image, &["--name", "copy", "--aid", "lb"]);
    let copy = keeper(&h, "lb");
    assert_eq!(
        copy.secret, before.secret,
        "the copy has the original's memory: {} vs {}",
        before.line, copy.line
    );
    assert_eq!((copy.offset, copy.pid), (4, 2), "{}", copy.line);
    assert!(
        copy.counters
            .iter()
            .zip(before.counters)
            .all(|(c, b)| *c >= b),
        "copy {} behind the state before the snapshot {}",
        copy.line,
        before.line
    );

    // Each AID reaches its own process: the copy's pipe is drained, the
    // original's still holds its bytes.
    assert_eq!(
        ask_keeper(&h, "lb", "pipe\n"),
        "pipe=pipe-bytes",
        "copy's pipe"
    );
    assert_eq!(
        ask_keeper(&h, "lb", "pipe\n"),
        "pipe=",
        "copy's pipe drained"
    );
    assert_eq!(
        ask_keeper(&h, "la", "pipe\n"),
        "pipe=pipe-bytes",
        "the original's pipe is its own (and survived the snapshot)"
    );
    assert_eq!(ask_keeper(&h, "la", "pipe\n"), "pipe=");
    counters_pass(&h, "la", &orig_now);
    counters_pass(&h, "lb", &copy);

    let ps = h.ps();
    assert_eq!(ps.len(), 2, "{ps:#?}");
    let reals: BTreeSet<u16> = ps
        .iter()
        .flat_map(port_pairs)
        .inspect(|p| assert_eq!(p.virtual_port, 9000, "{ps:#?}"))
        .map(|p| p.real)
        .collect();
    assert_eq!(reals.len(), 2, "distinct real ports: {ps:#?}");
    for (name, aid) in [("orig", "la"), ("copy", "lb")] {
        let t = h.translations(name);
        assert_eq!(t.len(), 1, "{name}: {t:#?}");
        assert_eq!(t[0]["aid"], aid, "{name}: {t:#?}");
    }
}

#[test]
fn damaged_images_are_refused_and_leave_nothing_behind() {
    let Some(mut h) = Harness::new(
        "damaged_images_are_refused_and_leave_nothing_behind",
        &["gcc", "python3"],
    ) else {
        return;
    };
    let bin = h.compile("statekeeper.c", "statekeeper");
    let data = start_keeper(&mut h, "damaged", "e", &bin);
    let dir = h.dir("images");
    let image = dir.join("good.img");
    snapshot_and_stop(&h, "damaged", &image);
    let good = fs::read(&image).unwrap();
    let ((pages_off, pages_len), (manifest_off, manifest_len)) = sections(&good);
    assert_eq!(pages_off, 4096, "header layout");
    assert_eq!(manifest_off, pages_off + pages_len, "header layout");
    assert_eq!(manifest_off + manifest_len, good.len(), "header layout");
    assert!(pages_len > 0 && manifest_len > 0);
    let none = BTreeSet::new();

    let mut case = 0;
    let mut refuse = |bytes: &[u8], why: &[&str], what: &str| {
        case += 1;
        let name = format!("bad-{case}");
        let path = dir.join(format!("{name}.img"));
        fs::write(&path, bytes).unwrap();
        let ran = h.try_restore(&name, &path, &["--name", &name]);
        let path = path.to_str().unwrap();
        assert!(
            !ran.success(),
            "case {case} ({what}): restore must be refused: {ran}"
        );
        assert_restore_refused(&h, &ran, &name, path, why, &data, &none);
        // The image's own name is not taken by it either.
        assert!(h.instance("damaged").is_none(), "case {case} ({what})");
    };

    for (cut, what) in [
        (40, "inside the header"),
        (2048, "inside the header page"),
        (pages_off + pages_len / 2, "inside the pages"),
        (manifest_off, "before the manifest"),
        (manifest_off + manifest_len / 2, "inside the manifest"),
        (good.len() - 1, "one byte short"),
    ] {
        refuse(&good[..cut], &["truncated"], what);
    }

    let mut flipped = good.clone();
    flipped[pages_off + pages_len / 2] ^= 0x40;
    refuse(&flipped, &["pages checksum"], "a flipped byte in the pages");
    let mut flipped = good.clone();
    flipped[manifest_off + manifest_len / 2] ^= 0x01;
    refuse(
        &flipped,
        &["manifest checksum"],
        "a flipped byte in the manifest",
    );

    // Version 99 with a valid header CRC, so the version is what refuses it.
    let mut newer = good.clone();
    newer[8..12].copy_from_slice(&99u32.to_le_bytes());
    let header = dir.join("header");
    fs::write(&header, &newer[..60]).unwrap();
    let crc = zlib_crc32(&header);
    newer[60..64].copy_from_slice(&crc.to_le_bytes());
    refuse(&newer, &["version 99"], "format version 99");

    // A text file longer than a header page.
    let text = "this is a text file, not an appshot image\n".repeat(200);
    refuse(
        text.as_bytes(),
        &["not an appshot image", "bad magic"],
        "a long text file",
    );

    // The good image itself still restores, after all of that.
    h.restore("damaged", &image, &[]);
    let k = keeper(&h, "e");
    assert_eq!((k.offset, k.pid), (4, 2), "{}", k.line);
}

#[test]
fn a_small_text_file_is_refused_as_not_an_image() {
    let Some(mut h) = Harness::new("a_small_text_file_is_refused_as_not_an_image", &[]) else {
        return;
    };
    let path = h.dir("images").join("notes.txt");
    fs::write(&path, "hello, I am a text file\n").unwrap();
    let ran = h.try_restore("notes", &path, &["--name", "notes"]);
    assert_restore_refused(
        &h,
        &ran,
        "notes",
        path.to_str().unwrap(),
        &["not an appshot image", "bad magic"],
        path.to_str().unwrap(),
        &BTreeSet::new(),
    );
}

#[test]
fn restore_refuses_a_name_in_use_and_changed_files_and_leaves_nothing_behind() {
    let Some(mut h) = Harness::new(
        "restore_refuses_a_name_in_use_and_changed_files_and_leaves_nothing_behind",
        &["gcc", "python3"],
    ) else {
        return;
    };
    // Run from a copy, so the test can take the executable away.
    let (_, bin) = keeper_copy(&h);
    let data = start_keeper(&mut h, "held", "e", &bin);
    let image = h.dir("images").join("held.img");
    snapshot_and_stop(&h, "held", &image);
    let none = BTreeSet::new();

    // A name in use: the running instance is left exactly as it was.
    h.restore("held", &image, &[]);
    let running = h.instance("held").expect("held restored");
    let answer = keeper(&h, "e");
    let processes = pids_with_arg(&data);
    let translations = h.translations("held");
    assert!(!processes.is_empty() && !translations.is_empty());
    for flags in [&[][..], &["--name", "held", "--aid", "e2"][..]] {
        let ran = h.try_restore("held", &image, flags);
        assert!(
            !ran.success(),
            "restore {flags:?} over a running held: {ran}"
        );
        assert!(
            ran.stderr.contains("`held`") && ran.stderr.contains("already in use"),
            "restore {flags:?}: message must name held as in use: {ran}"
        );
        let now = h.instance("held").expect("held still listed");
        assert_eq!(now, running, "the running held must be untouched");
        assert_eq!(pids_with_arg(&data), processes, "processes of held");
        assert_eq!(h.translations("held"), translations, "translations of held");
        assert_eq!(keeper(&h, "e").secret, answer.secret);
        assert!(
            h.log("held").contains("instance started"),
            "held's log kept"
        );
    }
    h.stop("held");
    assert_eq!(pids_with_arg(&data), none, "held stopped");

    // A file the process had open is now a directory: the restore fails
    // after its processes exist, and must take them all down again.
    fs::remove_file(&data).unwrap();
    fs::create_dir(&data).unwrap();
    let ran = h.try_restore("late", &image, &["--name", "late"]);
    assert_restore_refused(&h, &ran, "late", &data, &["directory"], &data, &none);
    fs::remove_dir(&data).unwrap();
    fs::write(&data, "0123456789").unwrap();

    // The executable is gone.
    let exe = bin.to_str().unwrap();
    fs::remove_file(&bin).unwrap();
    let ran = h.try_restore("held", &image, &[]);
    assert_restore_refused(&h, &ran, "held", exe, &["missing"], &data, &none);

    // The executable is back, but another file.
    fs::write(&bin, b"#!/bin/sh\nexit 0\n").unwrap();
    let ran = h.try_restore("held", &image, &[]);
    assert_restore_refused(&h, &ran, "held", exe, &["changed"], &data, &none);
}

#[test]
fn multi_process_instance_is_not_snapshotted_and_runs_on() {
    let Some(mut h) = Harness::new(
        "multi_process_instance_is_not_snapshotted_and_runs_on",
        &["sh", "sleep", "python3", "curl"],
    ) else {
        return;
    };
    let dir = h.dir("www");
    fs::write(dir.join("served-by-a-family.txt"), "m").unwrap();
    h.start(
        "family",
        "m",
        &dir,
        &[],
        &["sh", "-c", "sleep 100 & exec python3 -m http.server 9000"],
    );
    h.wait_log("family", "port 9000");
    let row = h.instance("family").expect("family listed");
    let app = pid_of(&row);
    assert!(
        !common::children(app).is_empty(),
        "the application has a child: {row}"
    );

    let images = h.dir("images");
    let image = images.join("family.img");
    let ran = h.snapshot("family", &image, &[]);
    assert!(
        !ran.success(),
        "a multi-process snapshot must be refused: {ran}"
    );
    assert_eq!(
        fs::read_dir(&images).unwrap().count(),
        0,
        "a refused snapshot writes no image"
    );

    // Untouched: listed, not left frozen, serving.
    assert_eq!(
        h.instance("family").as_ref(),
        Some(&row),
        "ps after refusal"
    );
    let got = h.curl("m", "http://127.0.0.1:9000/");
    assert!(
        got.success() && got.stdout.contains("served-by-a-family.txt"),
        "family still serves after the refused snapshot: {got}"
    );

    assert!(
        ran.stderr.contains("`family`") && ran.stderr.contains("processes"),
        "the refusal names the instance and why: {ran}"
    );
    assert!(
        !ran.stderr.contains("did not start"),
        "the instance runs; the message must not say it did not start: {ran}"
    );
}

const PY_BIG: &str = r#"
import os, socket, sys
data = bytearray(os.urandom(1 << 20)) * 768   # 768 MiB that is not zero
s = socket.socket()
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen()
print("ready", flush=True)
while True:
    c, _ = s.accept()
    c.sendall(b"alive %d\n" % sum(data[::1 << 20]))
    c.close()
"#;

/// The inode, size and mtime of a file: an image replaced by rename gets a
/// new inode, so an unchanged triple means the file was never touched.
fn identity(path: &Path) -> (u64, u64, i64) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).expect("image exists");
    (
        m.ino(),
        m.size(),
        m.mtime_nsec() + m.mtime() * 1_000_000_000,
    )
}

#[test]
fn a_snapshot_killed_midway_leaves_the_instance_running_and_the_image_intact() {
    let test = "a_snapshot_killed_midway_leaves_the_instance_running_and_the_image_intact";
    let Some(mut h) = Harness::new(test, &["python3"]) else {
        return;
    };
    let dir = h.dir("big");
    let program = dir.join("big.py");
    std::fs::write(&program, PY_BIG).unwrap();
    let program = program.to_string_lossy().into_owned();
    h.start("big", "big", &dir, &[], &["python3", &program, "9600"]);
    h.wait_log("big", "ready");
    let ask = "import socket; s = socket.create_connection(('127.0.0.1', 9600)); print(s.recv(64).decode().strip())";
    let before = h.client("big", &["python3", "-c", ask]);
    assert!(before.stdout.starts_with("alive"), "{before}");

    let image = h.dir("images").join("big.img");
    let first = h.snapshot("big", &image, &["--leave-running"]);
    assert!(first.success(), "{first}");
    let kept = identity(&image);

    let mut cmd = h.appshot();
    cmd.args(["snapshot", "big", "--leave-running", "-o"])
        .arg(&image);
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut second = cmd.spawn().expect("appshot snapshot starts");
    let temporary = image.with_file_name(format!(".big.img.tmp.{}", second.id()));
    // The temporary appears once the process is frozen and its pages are
    // being written: the middle of the dump.
    let midway = common::poll(std::time::Duration::from_secs(30), || temporary.exists());
    second.kill().unwrap();
    let _ = second.wait();
    assert!(midway, "the second snapshot never started writing");

    let after = h.client("big", &["python3", "-c", ask]);
    assert_eq!(
        after.stdout, before.stdout,
        "the instance runs on with its memory: {after}"
    );
    assert!(h.instance("big").is_some(), "big is still listed");
    assert_eq!(identity(&image), kept, "the previous image was not touched");

    let third = h.snapshot("big", &image, &["--leave-running"]);
    assert!(third.success(), "{third}");
    assert!(
        !temporary.exists(),
        "the killed snapshot's temporary is swept"
    );
}
