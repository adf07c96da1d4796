//! Operating instances day to day: exit statuses like podman's, the
//! privileges message.

mod common;

use std::os::unix::process::CommandExt;

use common::{run, Harness, COMMAND_TIMEOUT};

#[test]
fn detached_run_answers_by_whether_the_instance_runs() {
    let Some(mut h) = Harness::new(
        "detached_run_answers_by_whether_the_instance_runs",
        &["false", "sleep"],
    ) else {
        return;
    };
    let dir = h.dir("cwd");
    for i in 0..20 {
        let name = format!("false-{i}");
        let ran = h.try_start(&name, "a", &dir, &[], &["false"]);
        assert_eq!(ran.code, Some(125), "attempt {i}: run -d -- false: {ran}");
        assert!(ran.stderr.contains("exited during start"), "{ran}");
        assert!(h.instance(&name).is_none(), "{name} listed: {:#?}", h.ps());
    }
    for i in 0..20 {
        let name = format!("sleep-{i}");
        let ran = h.try_start(&name, "a", &dir, &[], &["sleep", "100"]);
        assert_eq!(ran.code, Some(0), "attempt {i}: run -d -- sleep 100: {ran}");
        assert_eq!(ran.stdout.trim(), name);
        assert!(h.instance(&name).is_some(), "{name} not listed");
        h.stop(&name);
    }
}

#[test]
fn commands_not_found_or_not_executable_exit_127_and_126() {
    let Some(mut h) = Harness::new(
        "commands_not_found_or_not_executable_exit_127_and_126",
        &["sh"],
    ) else {
        return;
    };
    let dir = h.dir("cwd");
    let missing = "/nonexistent/appshot-test-program";
    let plain = dir.join("plain-file");
    std::fs::write(&plain, "not a program\n").unwrap();
    let plain = plain.to_str().unwrap();
    for (program, code) in [
        (missing, 127),
        ("appshot-no-such-command", 127),
        (plain, 126),
    ] {
        let foreground = h.client("a", &[program]);
        assert_eq!(foreground.code, Some(code), "{program}: {foreground}");
        assert!(foreground.stderr.contains(program), "{foreground}");
        let detached = h.try_start("x", "a", &dir, &[], &[program]);
        assert_eq!(detached.code, Some(code), "{program} -d: {detached}");
        assert!(detached.stderr.contains(program), "{detached}");
    }
    // Otherwise the application's own status.
    let ran = h.client("a", &["sh", "-c", "exit 42"]);
    assert_eq!(ran.code, Some(42), "{ran}");
}

#[test]
fn unprivileged_run_names_the_privileges_it_needs() {
    // Root to drop to nobody.
    let Some(h) = Harness::new("unprivileged_run_names_the_privileges_it_needs", &[]) else {
        return;
    };
    let mut cmd = h.appshot();
    cmd.args(["run", "--", "true"])
        .current_dir("/")
        .uid(65534)
        .gid(65534);
    let ran = run(&mut cmd, COMMAND_TIMEOUT);
    assert_eq!(ran.code, Some(125), "{ran}");
    assert!(
        ran.stderr.contains("needs root") && ran.stderr.contains("CAP_SYS_ADMIN"),
        "{ran}"
    );
}
