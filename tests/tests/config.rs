//! Malformed application configs are refused before anything runs, with an
//! error that points at the file, line and field.

mod common;

use std::fs;
use std::time::Duration;

use common::{mkfifo, refused_as_fifo, run, Harness};

/// Runs `appshot run --config` on `text` and returns (config path, stderr),
/// asserting the run failed and its command never started.
fn refused(h: &Harness, file: &str, text: &str) -> (String, String) {
    let dir = h.dir("configs");
    let config = dir.join(file);
    fs::write(&config, text).unwrap();
    let marker = dir.join(format!("{file}.ran"));
    let ran = run(
        h.appshot()
            .args(["run", "--config"])
            .arg(&config)
            .args(["--", "touch"])
            .arg(&marker),
        Duration::from_secs(30),
    );
    assert!(!ran.success(), "{file} must be refused: {ran}");
    assert!(!marker.exists(), "{file}: the command ran anyway");
    (config.to_string_lossy().into_owned(), ran.stderr)
}

#[test]
fn malformed_configs_name_file_line_and_field() {
    // Parsing needs no privileges, so this runs everywhere.
    let h = Harness::unprivileged("malformed_configs_name_file_line_and_field");

    let (path, err) = refused(
        &h,
        "bad-port.toml",
        "aid = \"cfg\"\n[[ports]]\nport = \"abc\"\n",
    );
    assert!(
        err.contains(&format!("{path}:3:")),
        "error should point at {path} line 3: {err}"
    );
    assert!(
        err.contains("ports[0].port"),
        "error should name the field: {err}"
    );

    let (path, err) = refused(
        &h,
        "unknown-field.toml",
        "aid = \"cfg\"\nname = \"cfg-1\"\n\ncolour = \"red\"\n",
    );
    assert!(
        err.contains(&format!("{path}:4:")),
        "error should point at {path} line 4: {err}"
    );
    assert!(err.contains("colour"), "error should name the field: {err}");

    let (path, err) = refused(
        &h,
        "unknown-port-field.toml",
        "aid = \"cfg\"\n\n[[ports]]\nport = 9000\nprotocl = \"tcp\"\n",
    );
    assert!(err.contains(&format!("{path}:5:")), "{err}");
    assert!(err.contains("ports[0].protocl"), "{err}");

    assert!(h.ps().is_empty(), "no instance may be registered");
}

#[test]
fn a_fifo_as_config_is_refused_at_once() {
    let h = Harness::unprivileged("a_fifo_as_config_is_refused_at_once");
    let fifo = h.dir("configs").join("app.toml");
    mkfifo(&fifo);
    refused_as_fifo(
        h.appshot()
            .args(["run", "--config"])
            .arg(&fifo)
            .args(["--", "true"]),
        &fifo,
    );
}

#[test]
fn config_check_validates_files_and_directories_without_running_anything() {
    let h = Harness::unprivileged(
        "config_check_validates_files_and_directories_without_running_anything",
    );
    let dir = h.dir("apps.d");
    fs::write(
        dir.join("good.toml"),
        "aid = \"shop\"\nport_range = \"20000-20099\"\n",
    )
    .unwrap();
    fs::write(
        dir.join("bad.toml"),
        "aid = \"shop\"\n\n[[ports]]\nport = \"abc\"\n",
    )
    .unwrap();
    fs::write(dir.join("notes.txt"), "not a config").unwrap();
    let good = dir.join("good.toml");

    let ok = run(
        h.appshot().args(["config", "check"]).arg(&good),
        Duration::from_secs(30),
    );
    assert!(ok.success(), "{ok}");
    assert_eq!(ok.stdout, format!("{}: ok\n", good.display()));

    let all = run(
        h.appshot().args(["config", "check"]).arg(&dir),
        Duration::from_secs(30),
    );
    assert_eq!(all.code, Some(125), "{all}");
    assert!(all.stdout.contains("good.toml: ok"), "{all}");
    assert!(!all.stdout.contains("notes.txt"), "{all}");
    let bad = dir.join("bad.toml");
    assert!(
        all.stderr.contains(&format!("{}:4:", bad.display()))
            && all.stderr.contains("ports[0].port"),
        "the bad file's line and field: {all}"
    );
}

#[test]
fn a_host_wide_config_applies_to_its_executable_and_one_claim_per_program() {
    let test = "a_host_wide_config_applies_to_its_executable_and_one_claim_per_program";
    let Some(mut h) = Harness::new(test, &["sleep"]) else {
        return;
    };
    let apps = h.dir("apps.d");
    let sleep = common::which("sleep").unwrap();
    fs::write(
        apps.join("sleep.toml"),
        format!(
            "executable = \"{}\"\naid = \"from-apps-d\"\nport_range = \"30500-30509\"\n",
            sleep.display()
        ),
    )
    .unwrap();
    fs::write(
        apps.join("other.toml"),
        "executable = \"/usr/bin/no-such-program\"\naid = \"x\"\n",
    )
    .unwrap();
    let dir = h.dir("cwd");
    let mut cmd = h.appshot();
    cmd.env("APPSHOT_APPS_DIR", &apps)
        .args(["run", "-d", "--name", "slept", "--", "sleep", "60"])
        .current_dir(&dir);
    let ran = run(&mut cmd, Duration::from_secs(60));
    assert!(ran.success(), "{ran}");
    let row = h.instance("slept").expect("slept listed");
    assert_eq!(row["aid"], "from-apps-d", "{row}");
    h.stop("slept");

    let check = run(
        h.appshot().args(["config", "check"]).arg(&apps),
        Duration::from_secs(30),
    );
    assert!(check.success(), "{check}");

    // A second claim on the same program: refused by name, by check and run.
    let again = apps.join("sleep-again.toml");
    fs::write(
        &again,
        format!("executable = \"{}\"\naid = \"y\"\n", sleep.display()),
    )
    .unwrap();
    let check = run(
        h.appshot().args(["config", "check"]).arg(&apps),
        Duration::from_secs(30),
    );
    assert_eq!(check.code, Some(125), "{check}");
    assert!(
        check.stderr.contains("sleep.toml") && check.stderr.contains("sleep-again.toml"),
        "{check}"
    );
    let mut cmd = h.appshot();
    cmd.env("APPSHOT_APPS_DIR", &apps)
        .args(["run", "-d", "--name", "refused", "--", "sleep", "60"])
        .current_dir(&dir);
    let ran = run(&mut cmd, Duration::from_secs(60));
    assert_eq!(ran.code, Some(125), "{ran}");
    assert!(ran.stderr.contains("claimed by two"), "{ran}");
}

#[test]
fn redis_server_run_without_config_gets_its_apps_d_aid_and_ports() {
    let test = "redis_server_run_without_config_gets_its_apps_d_aid_and_ports";
    let Some(mut h) = Harness::new(test, &["redis-server", "redis-cli"]) else {
        return;
    };
    let apps = h.dir("apps.d");
    // /usr/bin/redis-server on Debian (a link, resolved as the command is).
    let redis = common::which("redis-server").unwrap();
    fs::write(
        apps.join("redis.toml"),
        format!(
            "executable = \"{}\"\naid = \"cache\"\nport_range = \"30600-30609\"\n\n[[ports]]\nport = 6379\n",
            redis.display()
        ),
    )
    .unwrap();
    let dir = h.dir("cwd");
    let mut cmd = h.appshot();
    cmd.env("APPSHOT_APPS_DIR", &apps)
        .args(["run", "-d", "--name", "cache-1", "--"])
        .args([
            "redis-server",
            "--port",
            "6379",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .current_dir(&dir);
    let ran = run(&mut cmd, Duration::from_secs(60));
    assert!(ran.success(), "{ran}");
    h.wait_log("cache-1", "Ready to accept connections");
    let row = h.instance("cache-1").expect("cache-1 listed");
    assert_eq!(row["aid"], "cache", "{row}");
    let ports = row["ports"].as_array().expect("ports");
    assert!(!ports.is_empty(), "{row}");
    for p in ports {
        assert_eq!(p["virtual_port"], 6379, "{row}");
        // The port itself while the host's is free, else one of the range.
        let real = p["real_port"].as_u64().unwrap();
        assert!(
            real == 6379 || (30600..=30609).contains(&real),
            "real port {real} neither 6379 nor in 30600-30609: {row}"
        );
    }
    assert_eq!(
        h.translations("cache-1"),
        ports.clone(),
        "ports --json agrees"
    );
    assert_eq!(common::redis_cli(&h, "cache", &["PING"]), "PONG");
    h.stop("cache-1");
}
