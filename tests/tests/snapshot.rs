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
    alive, ask_keeper, assert_left_nothing, info_field, keeper, keeper_copy, mkfifo, pid_of,
    pids_with_arg, poll, port_pairs, redis_cli, refused_as_fifo, start_keeper, start_redis,
    Harness, Keeper, Ran, SignalState, READY,
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
    snapshot_and_stop_with(h, name, image, &[]);
}

/// [`snapshot_and_stop`] with more flags.
fn snapshot_and_stop_with(h: &Harness, name: &str, image: &Path, flags: &[&str]) {
    let app = pid_of(
        &h.instance(name)
            .unwrap_or_else(|| panic!("{name} listed before its snapshot")),
    );
    let ran = h.snapshot(name, image, flags);
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

    // Durable first: the same image, fsynced before redis is stopped.
    let image = h.dir("images").join("redis-r.img");
    snapshot_and_stop_with(&h, "redis-r", &image, &["--sync"]);
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

/// Writes, every 50 ms, the pids listed in `/proc` and `/proc/1/cmdline` to
/// `report` in its cwd (renamed into place: never read half-written).
const PROC_REPORTER: &str = "
import os, time
while True:
    pids = ' '.join(p for p in os.listdir('/proc') if p.isdigit())
    init = open('/proc/1/cmdline', 'rb').read().replace(b'\\0', b' ').decode()
    with open('report.tmp', 'w') as f:
        f.write(pids + '|' + init)
    os.replace('report.tmp', 'report')
    time.sleep(0.05)
";

#[test]
fn a_restored_instance_sees_its_own_proc() {
    let Some(mut h) = Harness::new("a_restored_instance_sees_its_own_proc", &["python3"]) else {
        return;
    };
    let dir = h.dir("proc");
    let report = dir.join("report");
    h.start("procs", "pr", &dir, &[], &["python3", "-c", PROC_REPORTER]);
    assert!(poll(READY, || report.exists()), "{}", h.log("procs"));
    let image = h.dir("images").join("procs.img");
    snapshot_and_stop(&h, "procs", &image);
    fs::remove_file(&report).unwrap();

    h.restore("procs", &image, &[]);
    assert!(poll(READY, || report.exists()), "{}", h.log("procs"));
    // The first report may be the one the original wrote just before it
    // was frozen between writing it and renaming it into place, a rename
    // the restored process then finishes: the next one is all its own.
    fs::remove_file(&report).unwrap();
    assert!(poll(READY, || report.exists()), "{}", h.log("procs"));
    let text = fs::read_to_string(&report).unwrap();
    let (pids, init) = text.split_once('|').expect("pids|init");
    assert!(
        init.contains("__init") && init.contains("--restore-pid"),
        "PID 1 of a restored instance is its restoring init: {init:?}"
    );
    let pids: BTreeSet<u32> = pids.split(' ').map(|p| p.parse().unwrap()).collect();
    let app = pid_of(&h.instance("procs").expect("procs listed"));
    assert!(
        !pids.contains(&std::process::id()) && !pids.contains(&app),
        "host pids (the test's, the application's) visible inside: {pids:?}"
    );
    assert!(pids.iter().all(|&p| p < 10), "{pids:?}");
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
fn a_fifo_as_image_is_refused_at_once_by_inspect_restore_and_clone() {
    let h =
        Harness::unprivileged("a_fifo_as_image_is_refused_at_once_by_inspect_restore_and_clone");
    let fifo = h.dir("images").join("fifo.img");
    mkfifo(&fifo);
    refused_as_fifo(h.appshot().arg("inspect").arg(&fifo), &fifo);
    refused_as_fifo(h.appshot().arg("restore").arg(&fifo), &fifo);
    refused_as_fifo(
        h.appshot().arg("clone").arg(&fifo).args(["--aid", "f"]),
        &fifo,
    );
    assert!(h.ps().is_empty(), "no instance may be registered");
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
fn a_process_with_a_child_comes_back_with_its_child() {
    let Some(mut h) = Harness::new(
        "a_process_with_a_child_comes_back_with_its_child",
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
    let app = pid_of(&h.instance("family").expect("family listed"));
    let child_cmd = |app: u32| -> Vec<String> {
        common::children(app)
            .into_iter()
            .map(|pid| common::cmdline(pid).trim_end().to_string())
            .collect()
    };
    assert_eq!(child_cmd(app), ["sleep 100"], "the application's child");

    let image = h.dir("images").join("family.img");
    let ran = h.snapshot("family", &image, &[]);
    assert!(
        ran.success(),
        "a process with a child is snapshotted: {ran}"
    );
    h.restore("family", &image, &[]);
    let app = pid_of(&h.instance("family").expect("family listed again"));
    assert_eq!(
        child_cmd(app),
        ["sleep 100"],
        "the child is back, below the same parent"
    );
    let got = h.curl("m", "http://127.0.0.1:9000/");
    assert!(
        got.success() && got.stdout.contains("served-by-a-family.txt"),
        "the restored parent serves: {got}"
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
    let images = image.parent().expect("images dir");
    let temporaries = || {
        std::fs::read_dir(images)
            .unwrap()
            .filter(|e| {
                let name = e.as_ref().unwrap().file_name();
                name.to_string_lossy().starts_with(".big.img.tmp.")
            })
            .count()
    };
    // The temporary appears once the process is frozen and its pages are
    // being written: the middle of the dump.
    let midway = common::poll(std::time::Duration::from_secs(30), || temporaries() > 0);
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
    assert_eq!(temporaries(), 0, "the killed snapshot's temporary is swept");
}

/// A small C program for the restore fixes: raises RLIMIT_NOFILE and holds
/// an O_PATH fd at 3000, an eventfd whose count needs more than 32 bits, an
/// SA_ONSTACK handler without an alternate stack (raised every tick), a
/// SIGRTMIN handler, and grows its stack by 2 MiB once a file `grow`
/// appears in its cwd. Prints `tick N usr1 U rt R` every 10 ticks.
const FIXES_C: &str = r#"
#define _GNU_SOURCE
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/resource.h>
#include <unistd.h>

static volatile sig_atomic_t usr1, rt;
static void on_usr1(int s) { (void)s; usr1++; }
static void on_rt(int s) { (void)s; rt++; }

static __attribute__((noinline)) int grow(void) {
    size_t n = 2u << 20;
    volatile char *buf = __builtin_alloca(n);
    for (size_t i = n; i > 0; i -= 4096) buf[i - 1] = 1;
    return buf[n - 1];
}

int main(void) {
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    rl.rlim_cur = 4096;
    if (rl.rlim_max < 4096) rl.rlim_max = 4096;
    if (setrlimit(RLIMIT_NOFILE, &rl) != 0) { perror("setrlimit"); return 1; }
    int p = open(".", O_PATH | O_DIRECTORY);
    if (p < 0 || dup2(p, 3000) != 3000) { perror("O_PATH fd 3000"); return 1; }
    close(p);
    int e = eventfd(0, EFD_NONBLOCK);
    uint64_t big = 0x100000005ULL;
    if (e < 0 || write(e, &big, 8) != 8) { perror("eventfd"); return 1; }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr1;
    sa.sa_flags = SA_ONSTACK | SA_RESTART;
    sigaction(SIGUSR1, &sa, 0);
    sa.sa_handler = on_rt;
    sigaction(SIGRTMIN, &sa, 0);
    printf("ready eventfd %d\n", e);
    fflush(stdout);
    int grown = 0;
    for (unsigned long tick = 1;; tick++) {
        raise(SIGUSR1);
        if (!grown && access("grow", F_OK) == 0) {
            grow();
            grown = 1;
            printf("grew\n");
            fflush(stdout);
        }
        if (tick % 10 == 0) {
            printf("tick %lu usr1 %d rt %d\n", tick, (int)usr1, (int)rt);
            fflush(stdout);
        }
        usleep(5000);
    }
}
"#;

/// Compiles [`FIXES_C`] into the test's work dir.
fn compile_fixes(h: &Harness) -> std::path::PathBuf {
    let dir = h.dir("fixes-src");
    let src = dir.join("fixes.c");
    fs::write(&src, FIXES_C).unwrap();
    let out = dir.join("fixes");
    let ran = common::run(
        std::process::Command::new("gcc")
            .args(["-O2", "-o"])
            .arg(&out)
            .arg(&src),
        READY,
    );
    assert!(ran.success(), "gcc fixes.c: {ran}");
    out
}

/// The number of `tick` lines in `log`.
fn ticks(log: &str) -> usize {
    log.lines().filter(|l| l.starts_with("tick ")).count()
}

/// Waits until `name` logged `more` ticks beyond `from` (its SIGUSR1
/// handler ran each time, or the process would have died).
fn wait_ticks(h: &Harness, name: &str, from: usize, more: usize) {
    let mut log = String::new();
    let ok = poll(READY, || {
        log = h.log(name);
        ticks(&log) >= from + more
    });
    assert!(ok, "{name} stopped ticking after {from} ticks:\n{log}");
}

#[test]
fn restore_under_a_low_fd_limit_keeps_fds_limits_eventfd_and_signal_stack() {
    let test = "restore_under_a_low_fd_limit_keeps_fds_limits_eventfd_and_signal_stack";
    let Some(mut h) = Harness::new(test, &["gcc", "sh"]) else {
        return;
    };
    let bin = compile_fixes(&h);
    let cwd = h.dir("fx");
    let bin = bin.to_str().unwrap();
    h.start("fx", "fx", &cwd, &[], &[bin]);
    h.wait_log("fx", "tick ");
    let image = h.dir("images").join("fx.img");
    snapshot_and_stop(&h, "fx", &image);
    let before = ticks(&h.log("fx"));

    // The restoring supervisor (and so the stub) runs under a soft limit
    // of 1024 fds; the process held fd 3000 under its own, raised limit.
    let base = h.appshot();
    let mut cmd = std::process::Command::new("sh");
    cmd.args(["-c", "ulimit -Sn 1024 && exec \"$0\" \"$@\""])
        .arg(base.get_program())
        .arg("restore")
        .arg(&image)
        .arg("--detach");
    if let Some(dir) = base.get_current_dir() {
        cmd.current_dir(dir);
    }
    for (k, v) in base.get_envs() {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    let ran = common::run(&mut cmd, std::time::Duration::from_secs(60));
    assert!(ran.success(), "restore under ulimit -n 1024: {ran}");
    let row = h.instance("fx").expect("fx listed after restore");
    let app = pid_of(&row);

    let fd3000 = fs::read_link(format!("/proc/{app}/fd/3000"))
        .unwrap_or_else(|e| panic!("restored fd 3000: {e}"));
    assert_eq!(fd3000, cwd, "the O_PATH fd 3000");
    let info = fs::read_to_string(format!("/proc/{app}/fdinfo/3000")).unwrap();
    assert!(
        info.contains("flags:\t01"),
        "O_PATH (010000000) kept: {info}"
    );
    let limits = fs::read_to_string(format!("/proc/{app}/limits")).unwrap();
    let nofile = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("NOFILE line");
    assert_eq!(
        nofile.split_whitespace().nth(3),
        Some("4096"),
        "the saved soft limit: {nofile}"
    );
    let efd = fs::read_dir(format!("/proc/{app}/fd"))
        .unwrap()
        .flatten()
        .find(|e| {
            fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy() == "anon_inode:[eventfd]")
        })
        .expect("the eventfd is restored");
    let info = fs::read_to_string(format!(
        "/proc/{app}/fdinfo/{}",
        efd.file_name().to_string_lossy()
    ))
    .unwrap();
    let count = info
        .lines()
        .find_map(|l| l.strip_prefix("eventfd-count:"))
        .map(str::trim);
    assert_eq!(
        count,
        Some("100000005"),
        "64-bit eventfd count survives: {info}"
    );

    // The SA_ONSTACK handler runs every tick: the stub's inherited
    // alternate stack must not be used.
    wait_ticks(&h, "fx", before, 5);
    assert!(alive(app), "restored fx died");
}

#[test]
fn snapshots_under_a_storm_of_real_time_signals_leave_the_instance_intact() {
    let test = "snapshots_under_a_storm_of_real_time_signals_leave_the_instance_intact";
    let Some(mut h) = Harness::new(test, &["gcc"]) else {
        return;
    };
    let bin = compile_fixes(&h);
    let cwd = h.dir("storm");
    h.start("storm", "st", &cwd, &[], &[bin.to_str().unwrap()]);
    h.wait_log("storm", "tick ");
    let app = pid_of(&h.instance("storm").expect("storm listed"));
    let app_fd = appshot_sys::pidfd::open_process(app).expect("pidfd of the app");

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sender = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            // About one signal per ptrace round trip: every injected
            // syscall is likely to be interrupted by one.
            let mut sent = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = appshot_sys::pidfd::send_signal(&app_fd, libc::SIGRTMIN());
                sent += 1;
                std::thread::sleep(std::time::Duration::from_micros(20));
            }
            sent
        })
    };
    let images = h.dir("images");
    let mut failures = Vec::new();
    for i in 0..8 {
        let image = images.join(format!("storm-{i}.img"));
        let ran = h.snapshot("storm", &image, &["--leave-running"]);
        if !ran.success() {
            failures.push(format!("snapshot {i}: {ran}"));
        }
        assert!(alive(app), "storm died during snapshot {i}: {ran}");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent = sender.join().unwrap();
    assert!(sent > 0);
    assert!(failures.is_empty(), "{failures:#?}");
    let before = ticks(&h.log("storm"));
    wait_ticks(&h, "storm", before, 3);
    assert!(alive(app), "storm died after the snapshots");
    let last = h.log("storm");
    let rt: u64 = last
        .lines()
        .rev()
        .find_map(|l| l.split_whitespace().nth(5)?.parse().ok())
        .expect("a tick line");
    assert!(rt > 0, "the SIGRTMIN handler ran: {last}");
}

#[test]
fn a_snapshot_of_a_clone_keeps_a_stack_that_grows() {
    let test = "a_snapshot_of_a_clone_keeps_a_stack_that_grows";
    let Some(mut h) = Harness::new(test, &["gcc"]) else {
        return;
    };
    let bin = compile_fixes(&h);
    let cwd = h.dir("gd");
    h.start("tpl", "gd", &cwd, &[], &[bin.to_str().unwrap()]);
    h.wait_log("tpl", "tick ");
    let images = h.dir("images");
    let tpl = images.join("tpl.img");
    let ran = h.snapshot("tpl", &tpl, &["--template"]);
    assert!(ran.success(), "snapshot --template: {ran}");
    h.clone_template(&["c1".to_string()], &tpl, &["--aid", "gd1", "--name", "c1"]);
    wait_ticks(&h, "c1", 0, 2);
    let of_clone = images.join("c1.img");
    snapshot_and_stop(&h, "c1", &of_clone);
    let info = h.inspect(&of_clone);
    assert!(
        info["mappings"]
            .as_array()
            .expect("mappings")
            .iter()
            .any(|m| m["kind"] == "[stack]"),
        "the clone's stack is saved as a stack: {info:#}"
    );
    h.restore("c1", &of_clone, &[]);
    let app = pid_of(&h.instance("c1").expect("c1 restored"));
    fs::write(cwd.join("grow"), "").unwrap();
    h.wait_log("c1", "grew");
    let before = ticks(&h.log("c1"));
    wait_ticks(&h, "c1", before, 2);
    assert!(alive(app), "c1 died growing its stack");
}

#[test]
fn a_process_single_stepping_itself_keeps_its_signal_actions_and_limits() {
    // Its saved flags have the trap flag on: code the dump injects must
    // not trap after its first instruction and be taken as done (every
    // handler then read back as SIG_DFL, every limit as 0).
    let test = "a_process_single_stepping_itself_keeps_its_signal_actions_and_limits";
    let Some(mut h) = Harness::new(test, &["gcc"]) else {
        return;
    };
    let bin = h.compile("sigkeeper.c", "sigkeeper");
    let cwd = h.dir("step");
    h.start("step", "st", &cwd, &[], &[bin.to_str().unwrap(), "step"]);
    let ready = h.wait_log("step", "ready traps=");
    assert!(
        !ready.contains("ready traps=0\n"),
        "sigkeeper steps itself: {ready}"
    );
    let before = pid_of(&h.instance("step").expect("step listed"));
    let kept = SignalState::of(before);

    let image = h.dir("images").join("step.img");
    let ran = h.snapshot("step", &image, &[]);
    assert!(ran.success(), "snapshot of a stepping process: {ran}");
    h.restore("step", &image, &[]);
    let after = pid_of(&h.instance("step").expect("step listed after restore"));
    // Its own handler, still stepped through after the restore.
    kept.assert_kept(&h, "step", after);
}
