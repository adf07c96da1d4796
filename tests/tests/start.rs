//! `appshot run --detach` reports a start that did not happen as a failure,
//! like the foreground `appshot run` does.

mod common;

use common::Harness;

#[test]
fn detached_start_under_a_name_in_use_fails_and_leaves_the_instance_alone() {
    let Some(mut h) = Harness::new(
        "detached_start_under_a_name_in_use_fails_and_leaves_the_instance_alone",
        &["sh", "sleep"],
    ) else {
        return;
    };
    let dir = h.dir("cwd");
    h.start(
        "dup",
        "a",
        &dir,
        &[],
        &["sh", "-c", "echo output-of-the-first; exec sleep 60"],
    );
    h.wait_log("dup", "output-of-the-first");
    let first = h.instance("dup").expect("dup listed");

    let again = h.try_start("dup", "b", &dir, &[], &["sleep", "60"]);
    assert!(
        !again.success(),
        "a second `run -d --name dup` must fail while dup runs: {again}"
    );
    assert!(again.stderr.contains("already in use"), "{again}");

    let now = h.instance("dup").expect("the first dup still runs");
    assert_eq!(now["pid"], first["pid"], "{now}");
    assert_eq!(now["aid"], "a", "{now}");
    // The log belongs to the running instance; a refused start must not
    // truncate it.
    let log = h.log("dup");
    assert!(
        log.contains("output-of-the-first") && log.contains("instance started"),
        "log of the running dup was clobbered:\n{log}"
    );
}

#[test]
fn detached_start_of_a_missing_program_fails() {
    let Some(mut h) = Harness::new("detached_start_of_a_missing_program_fails", &[]) else {
        return;
    };
    let dir = h.dir("cwd");
    let program = "/nonexistent/appshot-test-program";

    let foreground = h.client("a", &[program]);
    assert_eq!(foreground.code, Some(127), "{foreground}");
    assert!(foreground.stderr.contains(program), "{foreground}");

    // Such an instance is registered for a moment before it ends; repeated,
    // so a `run -d` that happens to look in that moment is caught too.
    for i in 0..10 {
        let name = format!("missing-{i}");
        let detached = h.try_start(&name, "a", &dir, &[], &[program]);
        assert!(
            !detached.success(),
            "attempt {i}: `run -d` of a program that cannot be executed must fail, \
             as in the foreground: {detached}"
        );
        assert!(detached.stderr.contains(program), "{detached}");
    }
}
