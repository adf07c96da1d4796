//! Pre-copy (`snapshot --leave-running`, and `--pre-copy` for a stopping
//! snapshot): memory copied while the instance writes it, and only what it
//! wrote meanwhile copied again once frozen. A restore holds every page as
//! it was at the freeze (checked page by page against the version table of
//! `tests/programs/pagewriter.c`); the write tracking leaves the instance
//! when the snapshot ends or is killed, and a killed one leaves the
//! previous image as it was.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::pagewriter::{ask, real_port, snapshot_json, start_writer, tracking_left, writes_on};
use common::{pid_of, poll, Harness};

const PORT: u16 = 19411;

#[test]
fn a_leave_running_snapshot_of_a_writing_process_restores_every_page_as_frozen() {
    let test = "a_leave_running_snapshot_of_a_writing_process_restores_every_page_as_frozen";
    let Some(mut h) = Harness::new(test, &["gcc"]) else {
        return;
    };
    let real = start_writer(&mut h, "pw", PORT, 64, None, &[]);
    let before = writes_on(real, 0);
    let app = pid_of(&h.instance("pw").unwrap());
    let image = h.dir("images").join("pw.img");
    let taken = snapshot_json(&h, "pw", &image, &["--leave-running"]);
    // The memory was copied while the process ran: at least its 64 MiB.
    let precopied = taken["precopied_bytes"].as_u64().unwrap();
    assert!(precopied >= 64 << 20, "pre-copied {precopied}: {taken}");
    assert_eq!(taken["left_running"], true);

    // The original runs on, writing, with nothing of the tracking left.
    let after = writes_on(real, before);
    assert_eq!(tracking_left(app), Vec::<String>::new(), "in pid {app}");

    // The restored copy holds every page of the version its table gives.
    h.stop("pw");
    h.restore("pw", &image, &[]);
    let restored = real_port(&h, "pw");
    let (writes, intact, line) = ask(restored);
    assert!(
        intact,
        "restored memory differs from its version table: {line}"
    );
    assert!(
        writes >= before,
        "restored at {writes} writes, before the snapshot {before} (after {after})"
    );
    writes_on(restored, writes);
}

#[test]
fn a_pre_copy_stopping_snapshot_restores_every_page_as_frozen() {
    let test = "a_pre_copy_stopping_snapshot_restores_every_page_as_frozen";
    let Some(mut h) = Harness::new(test, &["gcc"]) else {
        return;
    };
    let real = start_writer(&mut h, "pws", PORT + 1, 64, None, &[]);
    let before = writes_on(real, 0);
    let image = h.dir("images").join("pws.img");
    let taken = snapshot_json(&h, "pws", &image, &["--pre-copy"]);
    let precopied = taken["precopied_bytes"].as_u64().unwrap();
    assert!(precopied >= 64 << 20, "pre-copied {precopied}: {taken}");
    assert_eq!(taken["left_running"], false);
    assert!(h.instance("pws").is_none(), "stopped by the snapshot");

    h.restore("pws", &image, &[]);
    let restored = real_port(&h, "pws");
    let (writes, intact, line) = ask(restored);
    assert!(
        intact,
        "restored memory differs from its version table: {line}"
    );
    assert!(writes >= before, "restored at {writes}, before {before}");
    writes_on(restored, writes);
    let app = pid_of(&h.instance("pws").unwrap());
    assert_eq!(tracking_left(app), Vec::<String>::new(), "in pid {app}");
}

#[test]
fn a_pre_copy_killed_midway_leaves_the_instance_untracked_and_the_image_intact() {
    let test = "a_pre_copy_killed_midway_leaves_the_instance_untracked_and_the_image_intact";
    let Some(mut h) = Harness::new(test, &["gcc"]) else {
        return;
    };
    // Large enough that the first pass takes a while.
    let real = start_writer(&mut h, "pwk", PORT + 2, 512, None, &[]);
    let app = pid_of(&h.instance("pwk").unwrap());
    let images = h.dir("images");
    let image = images.join("pwk.img");
    let first = h.snapshot("pwk", &image, &["--leave-running"]);
    assert!(first.success(), "{first}");
    let identity = |p: &Path| {
        let m = std::fs::metadata(p).expect("image exists");
        (m.ino(), m.size(), m.mtime(), m.mtime_nsec())
    };
    let kept = identity(&image);
    let temporaries = || {
        std::fs::read_dir(&images)
            .unwrap()
            .filter(|e| {
                let name = e.as_ref().unwrap().file_name();
                name.to_string_lossy().starts_with(".pwk.img.tmp.")
            })
            .count()
    };

    for flags in [&["--leave-running"][..], &["--pre-copy"][..]] {
        let mut cli = h.appshot();
        cli.args(["snapshot", "pwk", "-o"])
            .arg(&image)
            .args(flags)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut cli = cli.spawn().expect("appshot snapshot starts");
        // Killed once the instance is tracked and the temporary written:
        // in the middle of the pre-copy (512 MiB take a while).
        let started = poll(Duration::from_secs(30), || {
            temporaries() > 0 && !tracking_left(app).is_empty()
        });
        cli.kill().unwrap();
        let _ = cli.wait();
        assert!(started, "{flags:?}: the pre-copy never started");

        // The supervisor notices and removes the tracking.
        let mut left = Vec::new();
        let gone = poll(Duration::from_secs(10), || {
            left = tracking_left(app);
            left.is_empty()
        });
        assert!(
            gone,
            "{flags:?}: write tracking left in pid {app}: {left:?}"
        );
        assert!(h.instance("pwk").is_some(), "{flags:?}: pwk runs on");
        let now = writes_on(real, 0);
        writes_on(real, now);
        assert_eq!(identity(&image), kept, "{flags:?}: the image was touched");
        // The supervisor removes the temporary of the abandoned dump.
        assert!(
            poll(Duration::from_secs(10), || temporaries() == 0),
            "{flags:?}: temporary left"
        );
    }

    // And a full snapshot still works afterwards.
    let last = h.snapshot("pwk", &image, &["--leave-running"]);
    assert!(last.success(), "{last}");
    assert_eq!(tracking_left(app), Vec::<String>::new());
}

/// A process that is not root gets its userfaultfd too: it asks for
/// user-mode faults only, all an unprivileged process may ask for when
/// `vm.unprivileged_userfaultfd` is 0.
#[test]
fn a_process_of_an_unprivileged_user_is_pre_copied_and_restored_as_frozen() {
    let test = "a_process_of_an_unprivileged_user_is_pre_copied_and_restored_as_frozen";
    let Some(mut h) = Harness::new(test, &["gcc"]) else {
        return;
    };
    let real = start_writer(&mut h, "pwu", PORT + 3, 16, Some("nobody"), &[]);
    let app = pid_of(&h.instance("pwu").unwrap());
    let status = std::fs::read_to_string(format!("/proc/{app}/status")).unwrap();
    assert!(
        status.lines().any(|l| l.starts_with("Uid:\t65534\t")),
        "{status}"
    );
    let before = writes_on(real, 0);
    let image = h.dir("images").join("pwu.img");
    let taken = snapshot_json(&h, "pwu", &image, &["--leave-running"]);
    let precopied = taken["precopied_bytes"].as_u64().unwrap();
    assert!(precopied >= 16 << 20, "pre-copied {precopied}: {taken}");
    assert_eq!(tracking_left(app), Vec::<String>::new(), "in pid {app}");
    h.stop("pwu");
    h.restore("pwu", &image, &[]);
    let (writes, intact, line) = ask(real_port(&h, "pwu"));
    assert!(
        intact,
        "restored memory differs from its version table: {line}"
    );
    assert!(writes >= before, "restored at {writes}, before {before}");
}

/// A region mapped anew (MAP_FIXED) while it is pre-copied is no longer
/// covered by the write tracking (its scan fails with EPERM): that piece
/// is copied again while frozen, the rest stays tracked, and the snapshot
/// neither fails nor restores a page of the old mapping.
#[test]
fn a_process_remapping_its_memory_during_pre_copy_restores_every_page_as_frozen() {
    let test = "a_process_remapping_its_memory_during_pre_copy_restores_every_page_as_frozen";
    let Some(mut h) = Harness::new(test, &["gcc"]) else {
        return;
    };
    start_writer(&mut h, "pwc", PORT + 4, 16, None, &["churn"]);
    let image = h.dir("images").join("pwc.img");
    for flags in [&["--leave-running"][..], &["--pre-copy"][..]] {
        // The restored instance after the first round.
        let real = real_port(&h, "pwc");
        let before = writes_on(real, 0);
        let taken = snapshot_json(&h, "pwc", &image, flags);
        // At least the 256 MiB written once beside the region.
        let precopied = taken["precopied_bytes"].as_u64().unwrap();
        assert!(precopied >= 256 << 20, "pre-copied {precopied}: {taken}");
        if flags == ["--leave-running"] {
            writes_on(real, before);
            h.stop("pwc");
        }
        h.restore("pwc", &image, &[]);
        let (writes, intact, line) = ask(real_port(&h, "pwc"));
        assert!(
            intact,
            "{flags:?}: restored memory differs from its table: {line}"
        );
        assert!(
            writes >= before,
            "{flags:?}: restored at {writes}, before {before}"
        );
        writes_on(real_port(&h, "pwc"), writes);
    }
}
