//! `appshot snapshot` killed at any moment: the supervisor, not the CLI,
//! traces the instance, so the instance runs on with its memory intact,
//! the previous image stays as it was, and no temporary outlives the next
//! appshot command. And control sockets refuse supervised applications,
//! which are root like any operator.

mod common;

use std::hash::{DefaultHasher, Hasher};
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::{alive, pid_of, poll, port_pairs, Harness, READY};

/// The port the big-memory program listens on.
const PORT: u16 = 19401;

/// One answer of bigmem (`tests/programs/bigmem.c`) on real port `real`.
fn ask(real: u16) -> String {
    common::answer_of(real, "bigmem")
}

/// Starts bigmem as `name` (AID `name`) on `port`; returns its real port.
fn start_bigmem(h: &mut Harness, name: &str, port: u16) -> u16 {
    let bin = h.compile("bigmem.c", "bigmem");
    let dir = h.dir(name);
    let port_s = port.to_string();
    h.start(
        name,
        name,
        &dir,
        &["--port", &port_s],
        &[bin.to_str().unwrap(), &port_s],
    );
    h.wait_log(name, "ready");
    let row = h.instance(name).expect("bigmem listed");
    let pairs = port_pairs(&row);
    assert_eq!(pairs.len(), 1, "one translation: {row}");
    pairs[0].real
}

/// The inode, size and mtime of a file: an image replaced by rename gets a
/// new inode, so an unchanged triple means the file was never touched.
fn identity(path: &Path) -> (u64, u64, i64) {
    let m = std::fs::metadata(path).expect("image exists");
    (
        m.ino(),
        m.size(),
        m.mtime_nsec() + m.mtime() * 1_000_000_000,
    )
}

fn content_hash(path: &Path) -> u64 {
    let mut f = std::fs::File::open(path).expect("image opens");
    let mut hasher = DefaultHasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).expect("image reads");
        if n == 0 {
            return hasher.finish();
        }
        hasher.write(&buf[..n]);
    }
}

/// Every file in `dir` but `image`: temporaries, wherever they come from.
fn others(dir: &Path, image: &str) -> Vec<String> {
    std::fs::read_dir(dir)
        .expect("images dir")
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != image)
        .collect()
}

fn spawn_snapshot(h: &Harness, name: &str, image: &Path) -> Child {
    let mut cmd = h.appshot();
    cmd.args(["snapshot", name, "--leave-running", "-o"])
        .arg(image)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd.spawn().expect("appshot snapshot starts")
}

#[test]
fn snapshots_killed_at_forty_moments_leave_instance_memory_and_image_intact() {
    let test = "snapshots_killed_at_forty_moments_leave_instance_memory_and_image_intact";
    let Some(mut h) = Harness::new(test, &["gcc"]) else {
        return;
    };
    let real = start_bigmem(&mut h, "big", PORT);
    let before = ask(real);
    assert!(before.ends_with("intact=1"), "{before}");

    let images = h.dir("images");
    let image = images.join("big.img");
    let started = Instant::now();
    let first = h.snapshot("big", &image, &["--leave-running"]);
    let dump_time = started.elapsed();
    assert!(first.success(), "the first snapshot: {first}");
    assert_eq!(ask(real), before);
    let mut kept = identity(&image);
    let mut kept_hash = content_hash(&image);

    // 20 moments over the first 10 ms, 20 over the whole dump.
    let moments: Vec<Duration> = (0..20)
        .map(|k| Duration::from_micros(k * 500))
        .chain((0..20).map(|k| Duration::from_millis(10) + dump_time.mul_f64(k as f64 / 20.0)))
        .collect();
    let (mut midway, mut completed) = (0, 0);
    let begun = Instant::now();
    for (i, at) in moments.iter().enumerate() {
        let mut cli = spawn_snapshot(&h, "big", &image);
        std::thread::sleep(*at);
        if !others(&images, "big.img").is_empty() {
            midway += 1;
        }
        cli.kill().unwrap();
        let _ = cli.wait();

        let after = ask(real);
        assert_eq!(
            after, before,
            "kill {i} at {at:?}: the instance answers with its memory as it was"
        );
        // The next appshot command removes what a dead writer left. A
        // --leave-running instance runs on before its image is written
        // out, synced and renamed: the supervisor may still be at that
        // when the instance answers, and then finishes or removes it.
        assert!(
            h.instance("big").is_some(),
            "kill {i} at {at:?}: big listed"
        );
        let mut left = Vec::new();
        poll(Duration::from_secs(30), || {
            left = others(&images, "big.img");
            left.is_empty()
        });
        assert!(
            left.is_empty(),
            "kill {i} at {at:?}: temporaries remain after the next command: {left:?}"
        );
        if identity(&image) != kept {
            // Killed after the new image was in place: a complete image.
            h.inspect(&image);
            completed += 1;
            kept = identity(&image);
            kept_hash = content_hash(&image);
        }
    }
    assert!(
        midway >= 5,
        "only {midway} kills landed while a temporary was being written: the test misses the dump"
    );
    assert_eq!(content_hash(&image), kept_hash, "the image is intact");
    common::uncaptured(&format!(
        "{test}: dump {dump_time:?}; 40 kills in {:?}, {midway} mid-write, {completed} after the rename",
        begun.elapsed()
    ));
}

#[test]
fn ps_says_frozen_while_a_snapshot_holds_the_instance() {
    let test = "ps_says_frozen_while_a_snapshot_holds_the_instance";
    let Some(mut h) = Harness::new(test, &["gcc"]) else {
        return;
    };
    start_bigmem(&mut h, "frozen", PORT + 2);
    let image = h.dir("images").join("frozen.img");
    // A stopping snapshot with --sync keeps the instance frozen through its
    // whole dump and the image's writeback; a live one is frozen for only a
    // few milliseconds, which `ps` polling can miss.
    let mut cli = h
        .appshot()
        .args(["snapshot", "frozen", "--sync", "-o"])
        .arg(&image)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("appshot snapshot starts");
    let mut states = Vec::new();
    while cli.try_wait().unwrap().is_none() {
        if let Some(row) = h.instance("frozen") {
            states.push(row["state"].as_str().unwrap_or("").to_string());
        }
    }
    assert!(cli.wait().unwrap().success(), "the snapshot fails");
    assert!(
        states.iter().any(|s| s == "frozen"),
        "ps never said `frozen` during the dump: {states:?}"
    );
    assert!(
        poll(READY, || h.instance("frozen").is_none()),
        "the stopped instance is still listed"
    );

    // Restored, it is listed `restoring` until its processes are released.
    let mut restore = h
        .appshot()
        .args(["restore", "--detach"])
        .arg(&image)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("appshot restore starts");
    let mut states = Vec::new();
    while restore.try_wait().unwrap().is_none() {
        if let Some(row) = h.instance("frozen") {
            states.push(row["state"].as_str().unwrap_or("").to_string());
        }
    }
    assert!(restore.wait().unwrap().success(), "the restore fails");
    assert!(
        states.iter().any(|s| s == "restoring"),
        "ps never said `restoring` during the restore: {states:?}"
    );
    assert_eq!(h.instance("frozen").unwrap()["state"], "running");
    h.stop("frozen");
}

#[test]
fn a_dead_writers_temporary_is_swept_by_the_next_command() {
    let test = "a_dead_writers_temporary_is_swept_by_the_next_command";
    let Some(mut h) = Harness::new(test, &["gcc"]) else {
        return;
    };
    start_bigmem(&mut h, "victim", PORT + 1);
    let images = h.dir("images");
    let image = images.join("victim.img");
    let mut cli = spawn_snapshot(&h, "victim", &image);
    // Whoever writes the image names its temporary after itself.
    let mut writer = None;
    poll(Duration::from_secs(30), || {
        writer = others(&images, "victim.img")
            .iter()
            .find_map(|n| n.strip_prefix(".victim.img.tmp.")?.parse::<u32>().ok());
        writer.is_some()
    });
    let writer = writer.expect("a temporary appears while the image is written");
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(writer as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
    assert!(poll(READY, || !alive(writer)), "writer {writer} still runs");
    let _ = cli.kill();
    let _ = cli.wait();
    assert!(
        !others(&images, "victim.img").is_empty(),
        "the killed writer left its temporary"
    );
    h.ps();
    let left = others(&images, "victim.img");
    assert!(
        left.is_empty(),
        "`appshot ps` leaves the dead writer's temporaries: {left:?}"
    );
}

/// A supervised client (root, like its supervisor) that sends a stop
/// request to another instance's control socket and prints the answer.
const EVIL: &str = "import socket, sys\n\
s = socket.socket(socket.AF_UNIX)\n\
s.settimeout(10)\n\
s.connect(sys.argv[1])\n\
s.sendall(b'{\"op\":\"stop\",\"grace_secs\":0}\\n')\n\
print('answer:', s.recv(4096).decode())\n";

#[test]
fn a_supervised_client_cannot_stop_another_instance() {
    let test = "a_supervised_client_cannot_stop_another_instance";
    let Some(mut h) = Harness::new(test, &["python3"]) else {
        return;
    };
    let dir = h.dir("good");
    h.start(
        "good",
        "good",
        &dir,
        &[],
        &[
            "python3",
            "-c",
            "import time; print('up', flush=True); time.sleep(600)",
        ],
    );
    h.wait_log("good", "up");
    let app = pid_of(&h.instance("good").expect("good listed"));
    let socket = h.control_socket("good");
    let ran = h.client("evil", &["python3", "-c", EVIL, socket.to_str().unwrap()]);
    assert!(
        !ran.stdout.contains("\"ok\":true"),
        "the supervised client's stop was accepted: {ran}"
    );
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        alive(app) && h.instance("good").is_some(),
        "good was stopped by another instance's application: {ran}"
    );
    let log = h.wait_log("good", "peer refused");
    assert!(log.contains("pid"), "the refusal names the pid: {log}");
    // An operator's request still works.
    h.stop("good");
    assert!(!alive(app), "good stops on request from the CLI");
}
