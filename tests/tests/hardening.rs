//! The supervisor under pressure and what it exposes: many threads, too few
//! file descriptors, tasks that exec, the application's open-files limit,
//! the config's environment, and the permissions of the run directory.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{free_port, pid_of, poll, run, Harness, Ran, READY};

const TIMEOUT: Duration = Duration::from_secs(60);

/// Makes `cmd` start with RLIMIT_NOFILE (soft, hard), as `prlimit` would.
fn with_nofile(cmd: &mut Command, soft: u64, hard: u64) -> &mut Command {
    appshot_sys::spawn::limit_nofile_before_exec(cmd, soft, hard);
    cmd
}

fn hard_nofile() -> u64 {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .unwrap()
        .1
}

/// `appshot run --aid a FLAGS -- manythreads ARGS` in the foreground under
/// RLIMIT_NOFILE (soft, hard).
fn many_threads(h: &Harness, nofile: (u64, u64), flags: &[&str], args: &[&str]) -> Ran {
    let program = h.compile("manythreads.c", "manythreads");
    let mut cmd = h.appshot();
    cmd.args(["run", "--aid", "a"])
        .args(flags)
        .arg("--")
        .arg(&program)
        .args(args);
    run(with_nofile(&mut cmd, nofile.0, nofile.1), TIMEOUT)
}

#[test]
fn every_thread_of_a_many_threaded_application_gets_its_calls_answered() {
    let test = "every_thread_of_a_many_threaded_application_gets_its_calls_answered";
    let Some(h) = Harness::new(test, &["gcc"]) else {
        return;
    };
    // 900 live threads, each one notified call, under a limit of 1024
    // open files the supervisor cannot raise: a supervisor keeping
    // descriptors per thread ran out of them and left the rest blocked.
    let ran = many_threads(&h, (1024, 1024), &[], &["900"]);
    assert!(ran.success(), "{ran}");
    assert!(ran.stdout.contains("answered=900 of=900 ok=900 "), "{ran}");
}

#[test]
fn a_supervisor_out_of_file_descriptors_still_answers_every_call() {
    let test = "a_supervisor_out_of_file_descriptors_still_answers_every_call";
    let Some(h) = Harness::new(test, &["gcc"]) else {
        return;
    };
    // 100 threads bind the multiplexed port at once with one real port to
    // hand out: their binds wait in the supervisor, each holding a
    // duplicate of its socket, until a supervisor limited to 128 open
    // files has none left. Every call must still be answered, if only with
    // an error; none may stay blocked.
    let (virt, _spare, flags) = common::one_spare_port(9700..=9749, 30200..=30249, 1000);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let ran = many_threads(&h, (128, 128), &flags, &["100", "bind", &virt]);
    assert!(ran.success(), "a call was left unanswered: {ran}");
    assert!(ran.stdout.contains("answered=100 of=100 "), "{ran}");
}

#[test]
fn a_task_that_execs_is_read_in_its_new_address_space() {
    let test = "a_task_that_execs_is_read_in_its_new_address_space";
    let Some(h) = Harness::new(test, &["gcc"]) else {
        return;
    };
    // A vfork child is notified while it shares its parent's address
    // space, then execs and binds from an address that holds another port
    // in its new one; the parent keeps the old one alive meanwhile. A
    // supervisor reading through a handle opened on the old address space
    // bound the parent's port.
    let program = h.compile("vforkexec.c", "vforkexec");
    let parents = free_port(9750..=9774).to_string();
    let own = free_port(9775..=9799).to_string();
    let program = program.to_str().unwrap();
    let ran = h.client("v", &[program, &parents, &own]);
    assert!(ran.success(), "{ran}");
    assert_eq!(ran.stdout.trim(), format!("bound {own}"), "{ran}");
}

/// The `Max open files` soft and hard limits in `/proc/PID/limits`.
fn nofile_of(pid: u32) -> (String, String) {
    let limits = fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap_or_else(|| panic!("{limits}"));
    let mut fields = line["Max open files".len()..].split_whitespace();
    (
        fields.next().unwrap().to_string(),
        fields.next().unwrap().to_string(),
    )
}

#[test]
fn the_application_keeps_the_open_files_limit_it_was_started_with() {
    let test = "the_application_keeps_the_open_files_limit_it_was_started_with";
    let Some(h) = Harness::new(test, &["sh", "sleep"]) else {
        return;
    };
    let hard = hard_nofile().min(4096);
    let soft = hard.min(1000) - 7;
    let script = "ulimit -n; ulimit -Hn; sleep 3";
    let outside = run(
        with_nofile(Command::new("sh").args(["-c", script]), soft, hard),
        TIMEOUT,
    );
    assert!(outside.success(), "{outside}");
    assert_eq!(outside.stdout, format!("{soft}\n{hard}\n"));

    let mut cmd = h.appshot();
    cmd.args(["run", "--aid", "a", "--", "sh", "-c", script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = with_nofile(&mut cmd, soft, hard).spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let inside: Vec<String> = (0..2).map(|_| lines.next().unwrap().unwrap()).collect();
    // The foreground `appshot run` is the supervisor; it raised its own.
    let supervisor = nofile_of(child.id());
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    assert_eq!(
        inside.join("\n") + "\n",
        outside.stdout,
        "ulimit -n / -Hn inside appshot differ from outside"
    );
    assert_eq!(supervisor, (hard.to_string(), hard.to_string()));
}

fn env_map(bytes: &str) -> BTreeMap<String, String> {
    bytes
        .split('\0')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k.to_string(), v.to_string())
        })
        .collect()
}

fn ppid(pid: u32) -> u32 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_comm = stat.rsplit_once(") ").unwrap().1;
    after_comm.split(' ').nth(1).unwrap().parse().unwrap()
}

#[test]
fn the_configured_environment_reaches_the_application_alone_and_no_command_line() {
    let test = "the_configured_environment_reaches_the_application_alone_and_no_command_line";
    let Some(mut h) = Harness::new(test, &["env", "sleep"]) else {
        return;
    };
    let secret = "hunter2-4f1d";
    let vars = [
        ("APP_SECRET", secret),
        ("APP_EQ", "a=b c"),
        ("PATH", "/usr/bin:/bin"),
    ];
    let config = h.dir("cfg").join("app.toml");
    let write_config = |name: &str, command: &str| {
        let mut text = format!("name = \"{name}\"\naid = \"a\"\ncommand = {command}\n[env]\n");
        for (k, v) in vars {
            text.push_str(&format!("{k} = \"{v}\"\n"));
        }
        fs::write(&config, text).unwrap();
    };

    // The application's environment is its starter's with the config's
    // variables over it: nothing of appshot's added.
    write_config("env-fg", r#"["env", "-0"]"#);
    let inside = run(h.appshot().arg("run").arg("--config").arg(&config), TIMEOUT);
    assert!(inside.success(), "{inside}");
    let base = h.appshot();
    let mut expected = Command::new("env");
    expected.arg("-0");
    for (k, v) in base.get_envs() {
        match v {
            Some(v) => expected.env(k, v),
            None => expected.env_remove(k),
        };
    }
    expected.envs(vars);
    let outside = run(&mut expected, TIMEOUT);
    assert!(outside.success(), "{outside}");
    assert_eq!(env_map(&inside.stdout), env_map(&outside.stdout));

    // Nobody sees the values on a command line.
    write_config("env-bg", r#"["sleep", "60"]"#);
    h.start_config("env-bg", &config);
    let app = pid_of(&h.instance("env-bg").expect("env-bg listed"));
    let init = ppid(app);
    assert!(common::cmdline(init).contains("__init"));
    for pid in [app, init] {
        let cmdline = common::cmdline(pid);
        assert!(!cmdline.contains(secret), "{pid}: {cmdline}");
    }
    let environ = fs::read(format!("/proc/{app}/environ")).unwrap();
    let environ = env_map(&String::from_utf8_lossy(&environ));
    assert_eq!(environ.get("APP_SECRET").map(String::as_str), Some(secret));
    assert!(
        !environ
            .keys()
            .any(|k| k == "APPSHOT_APP_ENV" || k == "APPSHOT_LAUNCH"),
        "{environ:?}"
    );
    h.stop("env-bg");
}

#[test]
fn the_run_directory_is_private() {
    let test = "the_run_directory_is_private";
    let Some(mut h) = Harness::new(test, &["sleep"]) else {
        return;
    };
    let log = h.log_path("x");
    let run_dir = log.parent().and_then(Path::parent).unwrap().to_path_buf();
    // As an older appshot (or a umask of 022) left it.
    fs::set_permissions(&run_dir, fs::Permissions::from_mode(0o755)).unwrap();
    let dir = h.dir("cwd");
    h.start("private", "a", &dir, &[], &["sleep", "60"]);
    assert!(poll(READY, || run_dir.join("registry.db").exists()));
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    for (path, want) in [
        (run_dir.clone(), 0o700),
        (run_dir.join("instances"), 0o700),
        (run_dir.join("logs"), 0o700),
        (run_dir.join("registry.lock"), 0o600),
        (run_dir.join("registry.db"), 0o600),
        (run_dir.join("registry.db-wal"), 0o600),
    ] {
        assert_eq!(mode(&path), want, "{}", path.display());
    }
    h.stop("private");
}

/// The numeric entries of a `/proc` listing, one name a line.
fn pids_listed(listing: &str) -> BTreeSet<u32> {
    listing
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

#[test]
fn an_instance_sees_its_own_processes_in_proc_and_no_others() {
    let test = "an_instance_sees_its_own_processes_in_proc_and_no_others";
    let Some(h) = Harness::new(test, &["sh", "cat", "ls"]) else {
        return;
    };
    let ran = run(
        h.appshot().args([
            "run",
            "--aid",
            "p",
            "--",
            "sh",
            "-c",
            "cat /proc/1/cmdline; echo; echo ---; ls /proc",
        ]),
        TIMEOUT,
    );
    assert!(ran.success(), "{ran}");
    let (init, listing) = ran.stdout.split_once("---").expect("both parts printed");
    assert!(
        init.contains("__init"),
        "PID 1 inside is the instance's init, not the host's: {init:?}"
    );
    let pids = pids_listed(listing);
    assert!(pids.contains(&1), "{pids:?}");
    assert!(
        !pids.contains(&std::process::id()),
        "the test's own pid {} is visible inside: {pids:?}",
        std::process::id()
    );
    // init, sh and what sh ran: nothing of the host.
    assert!(pids.iter().all(|&p| p < 10), "{pids:?}");
}
