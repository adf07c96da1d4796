//! Operating instances day to day: exit statuses like podman's, the
//! privileges message, logs and ended instances, stopping several.

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
    for i in 0..50 {
        let name = format!("false-{i}");
        let ran = h.try_start(&name, "a", &dir, &[], &["false"]);
        assert_eq!(ran.code, Some(125), "attempt {i}: run -d -- false: {ran}");
        assert!(ran.stderr.contains("exited during start"), "{ran}");
        assert!(h.instance(&name).is_none(), "{name} listed: {:#?}", h.ps());
    }
    for i in 0..50 {
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

/// `appshot ARGS`, asserted to succeed; its stdout.
fn ok(h: &Harness, args: &[&str]) -> String {
    let ran = run(h.appshot().args(args), COMMAND_TIMEOUT);
    assert!(ran.success(), "appshot {args:?}: {ran}");
    ran.stdout
}

fn ps_all(h: &Harness) -> Vec<serde_json::Value> {
    serde_json::from_str(&ok(h, &["ps", "-a", "--json"])).expect("ps -a --json")
}

#[test]
fn a_crashed_instance_stays_listed_with_its_logs_until_rm() {
    let Some(mut h) = Harness::new(
        "a_crashed_instance_stays_listed_with_its_logs_until_rm",
        &["sh", "sleep"],
    ) else {
        return;
    };
    let dir = h.dir("cwd");
    // Crashes after its start period: `run -d` succeeded.
    h.start(
        "crash",
        "a",
        &dir,
        &[],
        &["sh", "-c", "echo bye; echo oops >&2; sleep 1; exit 42"],
    );
    assert!(
        common::poll(common::READY, || h.instance("crash").is_none()),
        "crash still runs"
    );
    let rows = ps_all(&h);
    let row = rows
        .iter()
        .find(|r| r["name"] == "crash")
        .expect("ps -a lists crash");
    assert_eq!(row["state"], "exited", "{row}");
    assert_eq!(row["exit_code"], 42, "{row}");
    assert!(row["exited_unix"].as_u64().unwrap() >= row["created_unix"].as_u64().unwrap());
    let table = ok(&h, &["ps", "-a"]);
    assert!(table.contains("exited (42)"), "{table}");
    assert!(table.lines().next().unwrap().contains("CREATED"), "{table}");
    assert!(!ok(&h, &["ps"]).contains("crash"));

    // The application's output apart from the supervisor's.
    assert_eq!(ok(&h, &["logs", "crash"]), "bye\noops\n");
    let stamped = ok(&h, &["logs", "-t", "crash"]);
    assert!(
        stamped.starts_with("20") && stamped.contains("Z bye"),
        "{stamped}"
    );
    assert_eq!(ok(&h, &["logs", "--since", "1h", "crash"]), "bye\noops\n");
    assert_eq!(
        ok(&h, &["logs", "--since", "2999-01-01T00:00:00", "crash"]),
        ""
    );
    let supervisor = std::fs::read_to_string(h.log_path("crash").join("supervisor.log")).unwrap();
    assert!(supervisor.contains("instance exited") && !supervisor.contains("bye"));

    // Started during start: a failed `run -d` is listed as well.
    let ran = h.try_start(
        "early",
        "a",
        &dir,
        &[],
        &["sh", "-c", "echo early-bye; exit 3"],
    );
    assert_eq!(ran.code, Some(125), "{ran}");
    assert!(ran.stderr.contains("early-bye"), "{ran}");
    let rows = ps_all(&h);
    let early = rows
        .iter()
        .find(|r| r["name"] == "early")
        .expect("early listed");
    assert_eq!(early["exit_code"], 3);

    // Used again, the name keeps the crash one generation back.
    h.start(
        "crash",
        "a",
        &dir,
        &[],
        &["sh", "-c", "echo again; exec sleep 60"],
    );
    let previous = h.log_path("crash").join("previous");
    let record = std::fs::read_to_string(previous.join("exit.json")).unwrap();
    assert!(record.contains("\"exit_code\": 42"), "{record}");
    assert!(std::fs::read_to_string(previous.join("app.log"))
        .unwrap()
        .contains("bye"));
    assert!(common::poll(common::READY, || ok(&h, &["logs", "crash"]) == "again\n"));
    h.stop("crash");

    assert_eq!(ok(&h, &["rm", "crash", "early"]), "crash\nearly\n");
    assert!(ps_all(&h).is_empty(), "{:#?}", ps_all(&h));
    let gone = run(h.appshot().args(["logs", "crash"]), COMMAND_TIMEOUT);
    assert_eq!(gone.code, Some(125), "{gone}");

    // A running instance is not removed.
    h.start("busy", "a", &dir, &[], &["sleep", "60"]);
    let refused = run(h.appshot().args(["rm", "busy"]), COMMAND_TIMEOUT);
    assert_eq!(refused.code, Some(125), "{refused}");
    assert!(refused.stderr.contains("stop it first"), "{refused}");
}

#[test]
fn run_rm_leaves_nothing_and_logs_follow_ends_with_the_instance() {
    let Some(mut h) = Harness::new(
        "run_rm_leaves_nothing_and_logs_follow_ends_with_the_instance",
        &["sh", "sleep"],
    ) else {
        return;
    };
    let dir = h.dir("cwd");
    h.start(
        "gone",
        "a",
        &dir,
        &["--rm"],
        &["sh", "-c", "sleep 1; echo done"],
    );
    h.start(
        "followed",
        "a",
        &dir,
        &[],
        &["sh", "-c", "echo one; sleep 1; echo two"],
    );
    // Returns by itself once `followed` has ended, with all its output.
    assert_eq!(ok(&h, &["logs", "-f", "followed"]), "one\ntwo\n");
    assert!(common::poll(common::READY, || !h.log_path("gone").exists()));
    let names: Vec<_> = ps_all(&h).iter().map(|r| r["name"].clone()).collect();
    assert_eq!(names, ["followed"]);
}

#[test]
fn the_application_log_is_rotated_at_its_size_limit() {
    let Some(mut h) = Harness::new(
        "the_application_log_is_rotated_at_its_size_limit",
        &["sh", "seq"],
    ) else {
        return;
    };
    let dir = h.dir("cwd");
    h.start(
        "chatty",
        "a",
        &dir,
        &["--log-max-size", "4000"],
        &["sh", "-c", "sleep 0.5; seq 1 1000; sleep 60"],
    );
    let logs = h.log_path("chatty");
    assert!(common::poll(common::READY, || ok(&h, &["logs", "chatty"])
        .ends_with("1000\n")));
    for f in ["app.log", "app.log.1"] {
        let len = std::fs::metadata(logs.join(f)).unwrap().len();
        assert!(len <= 4000, "{f}: {len} bytes");
    }
    // What `logs` shows is the newest part, in order, ending with the last line.
    let shown = ok(&h, &["logs", "chatty"]);
    let numbers: Vec<u32> = shown.lines().map(|l| l.parse().unwrap()).collect();
    assert!(numbers.windows(2).all(|w| w[1] == w[0] + 1), "{shown}");
}

#[test]
fn stop_takes_several_names_or_all_and_says_which_it_stopped() {
    let Some(mut h) = Harness::new(
        "stop_takes_several_names_or_all_and_says_which_it_stopped",
        &["sleep"],
    ) else {
        return;
    };
    let dir = h.dir("cwd");
    for name in ["s1", "s2", "s3", "s4"] {
        h.start(name, "a", &dir, &[], &["sleep", "60"]);
    }
    assert_eq!(ok(&h, &["stop", "-t", "2", "s1", "s2"]), "s1\ns2\n");
    let partly = run(
        h.appshot().args(["stop", "-t", "2", "s3", "nosuch"]),
        COMMAND_TIMEOUT,
    );
    assert_eq!(partly.code, Some(125), "{partly}");
    assert_eq!(partly.stdout, "s3\n", "{partly}");
    assert!(partly.stderr.contains("nosuch"), "{partly}");
    assert_eq!(ok(&h, &["stop", "--all", "-t", "2"]), "s4\n");
    assert!(h.ps().is_empty());
    let states: Vec<_> = ps_all(&h).iter().map(|r| r["exit_code"].clone()).collect();
    // SIGTERM: 128 + 15.
    assert_eq!(states, [143, 143, 143, 143]);
}

#[test]
fn clone_and_restore_take_real_ports_from_the_range_asked() {
    let test = "clone_and_restore_take_real_ports_from_the_range_asked";
    let Some(mut h) = Harness::new(test, &["gcc", "python3"]) else {
        return;
    };
    let bin = h.compile("statekeeper.c", "statekeeper");
    common::start_keeper(&mut h, "keeper-pr", "kpr", &bin);
    let image = h.dir("images").join("keeper.img");
    let taken = h.snapshot("keeper-pr", &image, &["--template", "--leave-running"]);
    assert!(taken.success(), "{taken}");
    let real_ports = |h: &Harness, name: &str| -> Vec<u64> {
        h.translations(name)
            .iter()
            .filter_map(|t| t["real_port"].as_u64())
            .collect()
    };

    // A range of one port each, outside every other test's ports.
    let flag = common::free_port(30300..=30349);
    let range = format!("{flag}-{flag}");
    h.clone_template(
        &["c-flag".to_string()],
        &image,
        &["--aid", "pr1", "--name", "c-flag", "--port-range", &range],
    );
    assert_eq!(real_ports(&h, "c-flag"), [u64::from(flag)]);

    let from_config = common::free_port(30350..=30399);
    let config = h.dir("cfg").join("app.toml");
    std::fs::write(
        &config,
        format!("port_range = \"{from_config}-{from_config}\"\n"),
    )
    .unwrap();
    h.clone_template(
        &["c-config".to_string()],
        &image,
        &[
            "--aid",
            "pr2",
            "--name",
            "c-config",
            "--config",
            config.to_str().unwrap(),
        ],
    );
    assert_eq!(real_ports(&h, "c-config"), [u64::from(from_config)]);

    // Restore: the snapshotted instance comes back on a port of its range.
    let saved = h.dir("images").join("c-flag.img");
    let taken = h.snapshot("c-flag", &saved, &[]);
    assert!(taken.success(), "{taken}");
    let restored = common::free_port(30400..=30449);
    let range = format!("{restored}-{restored}");
    h.restore("c-flag", &saved, &["--port-range", &range]);
    assert_eq!(real_ports(&h, "c-flag"), [u64::from(restored)]);
}

#[test]
fn on_failure_restarts_as_often_as_asked_then_the_instance_ends() {
    let Some(mut h) = Harness::new(
        "on_failure_restarts_as_often_as_asked_then_the_instance_ends",
        &["sh", "sleep"],
    ) else {
        return;
    };
    let dir = h.dir("cwd");
    h.start(
        "flaky",
        "a",
        &dir,
        &["--restart", "on-failure:3"],
        &["sh", "-c", "echo run; sleep 0.5; exit 3"],
    );
    let mut counted = Vec::new();
    while let Some(row) = h.instance("flaky") {
        assert!(
            ["running", "restarting", "exited"].contains(&row["state"].as_str().unwrap()),
            "{row}"
        );
        counted.extend(row["restarts"].as_u64());
    }
    let ended = || {
        ps_all(&h)
            .into_iter()
            .find(|r| r["name"] == "flaky" && r["state"] == "exited")
    };
    assert!(
        common::poll(common::READY, || ended().is_some()),
        "{:#?}",
        ps_all(&h)
    );
    let row = ended().unwrap();
    assert_eq!(row["exit_code"], 3, "{row}");
    assert_eq!(row["restarts"], 3, "{row}");
    // While it ran, `ps` counted its restarts as its supervisor published
    // them.
    assert!(
        counted.iter().any(|&n| n >= 1) && counted.windows(2).all(|w| w[0] <= w[1]),
        "restarts seen while it ran: {counted:?}"
    );
    assert_eq!(ok(&h, &["logs", "flaky"]), "run\n".repeat(4));
    assert!(ok(&h, &["ps", "-a"]).contains("exited (3)"));

    // An exit during `run -d`'s start is a failed start, never restarted.
    let ran = h.try_start("never", "a", &dir, &["--restart", "always"], &["false"]);
    assert_eq!(ran.code, Some(125), "{ran}");
    let rows = ps_all(&h);
    let never = rows.iter().find(|r| r["name"] == "never").expect("listed");
    assert_eq!(never["restarts"], 0, "{never}");
}

#[test]
fn always_restarts_a_killed_server_under_its_name_aid_and_port_until_stopped() {
    let Some(mut h) = Harness::new(
        "always_restarts_a_killed_server_under_its_name_aid_and_port_until_stopped",
        &["python3", "curl"],
    ) else {
        return;
    };
    let dir = h.dir("www");
    std::fs::write(dir.join("restarted.txt"), "r").unwrap();
    h.start(
        "web-r",
        "ra",
        &dir,
        &["--restart", "always"],
        &["python3", "-m", "http.server", "9460"],
    );
    h.wait_log("web-r", "port 9460");
    let first = common::pid_of(&h.instance("web-r").unwrap());
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let restarted = || {
        h.instance("web-r")
            .filter(|r| r["state"] == "running" && common::pid_of(r) != first)
            .is_some()
    };
    assert!(common::poll(common::READY, restarted), "{:#?}", h.ps());
    let serves = || {
        let got = h.curl("ra", "http://127.0.0.1:9460/");
        got.success() && got.stdout.contains("restarted.txt")
    };
    assert!(
        common::poll(common::READY, serves),
        "web-r does not serve again"
    );
    let owned: Vec<_> = h
        .translations("web-r")
        .iter()
        .map(|t| (t["virtual_port"].clone(), t["aid"].clone()))
        .collect();
    assert_eq!(owned, [(9460.into(), "ra".into())], "{:#?}", h.ports());
    let log = std::fs::read_to_string(h.log_path("web-r").join("supervisor.log")).unwrap();
    assert!(log.contains("application restarted"), "{log}");

    // `stop` ends it for good.
    h.stop("web-r");
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(h.instance("web-r").is_none(), "restarted after stop");
}

/// The supervisor's pid in a `ps --json` row.
fn supervisor_of(row: &serde_json::Value) -> nix::unistd::Pid {
    nix::unistd::Pid::from_raw(row["supervisor_pid"].as_u64().expect("supervisor_pid") as i32)
}

#[test]
fn ps_reads_the_state_supervisors_publish_and_lists_no_killed_one() {
    use nix::sys::signal::{kill, Signal};
    let Some(mut h) = Harness::new(
        "ps_reads_the_state_supervisors_publish_and_lists_no_killed_one",
        &["sh", "sleep"],
    ) else {
        return;
    };
    let dir = h.dir("cwd");
    h.start("calm", "a", &dir, &[], &["sleep", "100"]);
    h.start(
        "stubborn",
        "a",
        &dir,
        &[],
        &["sh", "-c", "trap '' TERM; sleep 100"],
    );

    // `ps` wakes no supervisor: one that cannot answer (stopped) is still
    // listed with the state it published (asked over its control socket,
    // it would time out and be `unresponsive`).
    let calm = h.instance("calm").expect("calm listed");
    assert_eq!(
        (&calm["state"], &calm["restarts"]),
        (&"running".into(), &0.into()),
        "{calm}"
    );
    let supervisor = supervisor_of(&calm);
    kill(supervisor, Signal::SIGSTOP).unwrap();
    let seen = h.instance("calm");
    kill(supervisor, Signal::SIGCONT).unwrap();
    let seen = seen.expect("calm listed while its supervisor is stopped");
    assert_eq!(seen["state"], "running", "{seen}");

    // Asked to stop, it is `stopping` until its supervisor is gone (it
    // ignores SIGTERM: SIGKILL after 3 s), then an ended instance.
    let mut stop = h.appshot();
    stop.args(["stop", "-t", "3", "stubborn"])
        .stdout(std::process::Stdio::null());
    let mut stop = stop.spawn().expect("appshot stop");
    assert!(
        common::poll(common::READY, || h
            .instance("stubborn")
            .is_some_and(|r| r["state"] == "stopping")),
        "{:#?}",
        h.ps()
    );
    assert!(stop.wait().unwrap().success());
    assert!(h.instance("stubborn").is_none(), "{:#?}", h.ps());
    let rows = ps_all(&h);
    let ended = rows
        .iter()
        .find(|r| r["name"] == "stubborn")
        .expect("ps -a");
    assert_eq!(
        (&ended["state"], &ended["exit_code"], &ended["signal"]),
        (&"exited".into(), &137.into(), &"SIGKILL".into()),
        "{ended}"
    );

    // A supervisor killed with SIGKILL leaves its file saying `running`;
    // the instance is not listed all the same, and its name starts anew.
    let state_file = h.run_dir().join("instances/calm/state");
    kill(supervisor, Signal::SIGKILL).unwrap();
    assert!(common::poll(common::READY, || !common::alive(
        supervisor.as_raw() as u32
    )));
    let left = std::fs::read_to_string(&state_file).expect("the killed supervisor's state file");
    assert!(left.contains("\"running\""), "{left}");
    assert!(h.instance("calm").is_none(), "{:#?}", h.ps());
    assert!(
        ps_all(&h).iter().all(|r| r["name"] != "calm"),
        "{:#?}",
        ps_all(&h)
    );
    h.start("calm", "a", &dir, &[], &["sleep", "100"]);
    let again = h.instance("calm").expect("calm listed again");
    assert_eq!(again["state"], "running", "{again}");
    assert_ne!(supervisor_of(&again), supervisor, "{again}");
}

#[test]
fn ps_ports_and_inspect_speak_one_json_vocabulary() {
    let Some(mut h) = Harness::new(
        "ps_ports_and_inspect_speak_one_json_vocabulary",
        &["python3"],
    ) else {
        return;
    };
    let dir = h.dir("www");
    h.start(
        "web-j",
        "j",
        &dir,
        &[],
        &["python3", "-m", "http.server", "9470"],
    );
    h.wait_log("web-j", "port 9470");
    let keys = |v: &serde_json::Value| -> Vec<String> {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    };
    let from_ps = h.instance("web-j").unwrap()["ports"][0].clone();
    let from_ports = h.translations("web-j")[0].clone();
    assert_eq!(from_ps, from_ports);
    assert_eq!(
        keys(&from_ports),
        [
            "address",
            "aid",
            "instance",
            "protocol",
            "real_port",
            "virtual_port"
        ]
    );
    assert_eq!(from_ports["virtual_port"], 9470);
    assert_eq!(from_ports["instance"], "web-j");

    let image = h.dir("images").join("web-j.img");
    let taken = h.snapshot(
        "web-j",
        &image,
        &["--template", "--leave-running", "--json"],
    );
    assert!(taken.success(), "{taken}");
    let stats: serde_json::Value = serde_json::from_str(&taken.stdout).expect("snapshot --json");
    assert_eq!(
        keys(&stats),
        [
            "aid",
            "frozen_ms",
            "image",
            "instance",
            "left_running",
            "pages_bytes",
            "parent",
            "precopied_bytes",
            "size_bytes",
            "template",
            "time_ms",
            "tracked"
        ]
    );
    assert_eq!(stats["parent"], serde_json::Value::Null);
    assert_eq!(stats["tracked"], false);
    assert_eq!(stats["instance"], "web-j");
    assert_eq!(stats["aid"], "j");
    assert_eq!(stats["left_running"], true);
    assert_eq!(stats["template"], true);
    assert_eq!(stats["image"], image.to_str().unwrap());
    assert!(
        stats["frozen_ms"].is_u64() && stats["time_ms"].is_u64(),
        "{stats:#}"
    );
    let info = h.inspect(&image);
    // The same numbers under the same names as inspect's.
    assert_eq!(stats["pages_bytes"], info["pages_bytes"], "{info:#}");
    assert_eq!(stats["size_bytes"], info["size_bytes"], "{info:#}");
    assert_eq!(
        stats["size_bytes"].as_u64().unwrap(),
        std::fs::metadata(&image).unwrap().len()
    );
    assert_eq!(info["template"], true, "{info:#}");
    assert!(info["created_unix"].as_u64().unwrap() > 0);
    assert!(!info["mappings"].as_array().unwrap().is_empty());
    let summary = ok(&h, &["inspect", image.to_str().unwrap()]);
    assert!(
        summary.contains("a template for `appshot clone`"),
        "{summary}"
    );
    assert!(summary.contains("(listed with --mappings)"), "{summary}");
    // The appshot that wrote it, as its --version says.
    let version = ok(&h, &["--version"]);
    assert_eq!(info["writer"], version.trim(), "{info:#}");
    assert!(version.contains("(commit "), "{version}");
    assert!(
        summary.contains(&format!("written by {}\n", version.trim())),
        "{summary}"
    );
    let full = ok(&h, &["inspect", "--mappings", image.to_str().unwrap()]);
    assert!(full.lines().count() > summary.lines().count() + 5, "{full}");

    // Without --json, the same statistics as a line; a stopping one says so.
    let stopped = h.dir("images").join("web-j-stopped.img");
    let taken = h.snapshot("web-j", &stopped, &[]);
    assert!(taken.success(), "{taken}");
    assert!(
        taken.stdout.contains("of memory, image ") && taken.stdout.contains("instance stopped"),
        "{taken}"
    );
}

#[test]
fn version_names_the_commit_and_completions_cover_the_commands() {
    let h = Harness::unprivileged("version_names_the_commit_and_completions_cover_the_commands");
    let version = ok(&h, &["--version"]);
    assert!(
        version.starts_with("appshot ") && version.contains("(commit "),
        "{version}"
    );
    for shell in ["bash", "zsh", "fish"] {
        let script = ok(&h, &["completion", shell]);
        for word in ["logs", "snapshot", "port-range", "restart"] {
            assert!(script.contains(word), "{shell} completion lacks {word}");
        }
        assert!(
            !script.contains("__init"),
            "{shell} completion offers __init"
        );
    }
}

#[test]
fn a_pidfile_names_the_supervisor_while_the_instance_runs() {
    let Some(mut h) = Harness::new(
        "a_pidfile_names_the_supervisor_while_the_instance_runs",
        &["sleep"],
    ) else {
        return;
    };
    let dir = h.dir("cwd");
    let pidfile = dir.join("web.pid");
    h.start(
        "pidded",
        "a",
        &dir,
        &["--pidfile", pidfile.to_str().unwrap()],
        &["sleep", "60"],
    );
    let written = std::fs::read_to_string(&pidfile).unwrap();
    let row = h.instance("pidded").unwrap();
    assert_eq!(written.trim(), row["supervisor_pid"].to_string());
    h.stop("pidded");
    assert!(common::poll(common::READY, || !pidfile.exists()));
}

#[test]
fn the_man_page_lists_the_commands() {
    let h = Harness::unprivileged("the_man_page_lists_the_commands");
    let page = ok(&h, &["man"]);
    assert!(
        page.starts_with(".ie") || page.contains(".TH appshot"),
        "{page}"
    );
    for command in ["logs", "snapshot", "restore", "clone"] {
        assert!(page.contains(command), "the man page lacks {command}");
    }
}

/// A process with 300 MiB of pages that hold data, so that its dump takes
/// long enough to be interrupted.
const BIG: &str = "import time\nb = bytearray(300 << 20)\nfor i in range(0, len(b), 4096):\n    b[i] = 1\nprint('big ready', flush=True)\ntime.sleep(1000)\n";

#[test]
fn ctrl_c_during_a_snapshot_abandons_it_and_says_so() {
    let Some(mut h) = Harness::new(
        "ctrl_c_during_a_snapshot_abandons_it_and_says_so",
        &["python3"],
    ) else {
        return;
    };
    let dir = h.dir("big");
    h.start("big", "a", &dir, &[], &["python3", "-c", BIG]);
    h.wait_log("big", "big ready");
    let image = h.dir("img").join("big.img");
    let mut cmd = h.appshot();
    cmd.args(["snapshot", "big", "-o"]).arg(&image);
    let child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(150));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    match out.status.code() {
        // Abandoned: no image, the instance runs on.
        Some(130) => {
            assert!(
                stderr.contains("interrupted: no image was written"),
                "{stderr}"
            );
            assert!(!image.exists(), "an abandoned snapshot left an image");
            assert!(h.instance("big").is_some(), "the instance must run on");
        }
        // Already in place when the signal came: said, and complete.
        Some(0) => {
            assert!(stderr.contains("the snapshot is complete"), "{stderr}");
            assert!(image.exists());
        }
        other => panic!("appshot snapshot after SIGINT: exit {other:?}: {stderr}"),
    }
}

/// `systemd-analyze verify` of `unit` written as `file` into a directory
/// of its own: what it says about that file (nothing when it is fine).
fn verify_unit(h: &Harness, file: &str, unit: &str) -> common::Ran {
    let dir = h.dir("units");
    let path = dir.join(file);
    std::fs::write(&path, unit).expect("writing the unit");
    run(
        std::process::Command::new("systemd-analyze")
            .arg("verify")
            .arg(&path),
        COMMAND_TIMEOUT,
    )
}

#[test]
fn generated_systemd_units_pass_systemd_analyze_verify() {
    let test = "generated_systemd_units_pass_systemd_analyze_verify";
    let Some(mut h) = Harness::new(test, &["sleep", "systemd-analyze"]) else {
        return;
    };
    let dir = h.dir("cwd");
    let config = dir.join("svc.toml");
    std::fs::write(&config, "aid = \"shop\"\n[[ports]]\nport = 9000\n").expect("config");
    let config = config.to_str().expect("utf-8 path");
    h.start(
        "svc",
        "shop",
        &dir,
        &["--config", config, "--port-range", "21000-21999"],
        &["sleep", "100"],
    );
    let unit = ok(&h, &["generate", "systemd", "svc"]);
    let exec = unit
        .lines()
        .find(|l| l.starts_with("ExecStart="))
        .expect("ExecStart");
    assert!(
        exec.ends_with(&format!(
            " run --name svc --aid shop --config {config} --port 9000 --port-range 21000-21999 -- sleep 100"
        )),
        "{unit}"
    );
    for line in [
        "Type=simple",
        "SuccessExitStatus=143",
        "RestartPreventExitStatus=125 126 127",
        "Restart=on-failure",
        "KillSignal=SIGTERM",
        "TimeoutStopSec=10",
    ] {
        assert!(unit.lines().any(|l| l == line), "{line} missing:\n{unit}");
    }
    let verified = verify_unit(&h, "appshot-svc.service", &unit);
    assert!(
        verified.success(),
        "systemd-analyze verify:\n{unit}\n{verified}"
    );
    assert!(
        !verified.stderr.contains("appshot-svc.service"),
        "systemd-analyze verify complains:\n{unit}\n{verified}"
    );

    let agent = ok(
        &h,
        &[
            "generate",
            "systemd",
            "--agent",
            "--listen",
            "127.0.0.1:7946",
        ],
    );
    assert!(
        agent.contains(" vpm agent --listen 127.0.0.1:7946\n"),
        "{agent}"
    );
    let verified = verify_unit(&h, "appshot-agent.service", &agent);
    assert!(
        verified.success(),
        "systemd-analyze verify:\n{agent}\n{verified}"
    );
    assert!(
        !verified.stderr.contains("appshot-agent.service"),
        "systemd-analyze verify complains:\n{agent}\n{verified}"
    );

    let unknown = run(
        h.appshot().args(["generate", "systemd", "nosuch"]),
        COMMAND_TIMEOUT,
    );
    assert_eq!(unknown.code, Some(125), "{unknown}");
    assert!(unknown.stderr.contains("nosuch"), "{unknown}");
    h.stop("svc");
}
