//! Calls the supervisor performs for an application carry the
//! application's credentials: an unprivileged application gets exactly the
//! results, errnos and files its own calls would give natively, and no
//! more. Each case runs `credprobe.py` as `nobody` twice, natively and
//! under appshot, and compares.

mod common;

use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{free_port, poll, run, script, Harness, Ran, READY};

const NOBODY: u32 = 65534;
const TIMEOUT: Duration = Duration::from_secs(30);

/// A directory anyone may enter (the harness's own are root-only), with
/// the probe script in it and two subdirectories: `locked` (root's, 0755:
/// nobody may not create anything in it) and `open` (nobody's own).
struct Place {
    _dir: tempfile::TempDir,
    root: PathBuf,
    probe: PathBuf,
}

impl Place {
    fn new() -> Place {
        let dir = tempfile::Builder::new()
            .prefix("appshot-creds-")
            .tempdir()
            .expect("temp dir");
        let root = dir.path().to_path_buf();
        fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).unwrap();
        let probe = root.join("credprobe.py");
        fs::copy(script("credprobe.py"), &probe).unwrap();
        fs::set_permissions(&probe, fs::Permissions::from_mode(0o644)).unwrap();
        fs::create_dir(root.join("locked")).unwrap();
        fs::set_permissions(root.join("locked"), fs::Permissions::from_mode(0o755)).unwrap();
        fs::create_dir(root.join("open")).unwrap();
        std::os::unix::fs::chown(root.join("open"), Some(NOBODY), Some(NOBODY)).unwrap();
        fs::set_permissions(root.join("open"), fs::Permissions::from_mode(0o700)).unwrap();
        Place {
            _dir: dir,
            root,
            probe,
        }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    /// The probe's command line as `nobody`, with no groups and (setpriv
    /// drops them with the uid) no capabilities.
    fn as_nobody<'a>(&'a self, args: &[&'a str]) -> Vec<String> {
        let mut cmd: Vec<String> = [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "/usr/bin/python3",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        cmd.push(self.probe.display().to_string());
        cmd.extend(args.iter().map(|s| s.to_string()));
        cmd
    }

    fn native(&self, args: &[&str]) -> Ran {
        let cmd = self.as_nobody(args);
        run(
            Command::new(&cmd[0])
                .args(&cmd[1..])
                .current_dir(&self.root),
            TIMEOUT,
        )
    }

    fn supervised(&self, h: &Harness, aid: &str, args: &[&str]) -> Ran {
        let cmd = self.as_nobody(args);
        let argv: Vec<&str> = cmd.iter().map(String::as_str).collect();
        h.client(aid, &argv)
    }

    /// Runs the probe both ways and asserts the same answer; returns it.
    fn same_both_ways(&self, h: &Harness, args: &[&str]) -> String {
        let native = self.native(args);
        assert!(native.success(), "native {args:?}: {native}");
        let supervised = self.supervised(h, "evil", args);
        assert!(supervised.success(), "supervised {args:?}: {supervised}");
        assert_eq!(
            supervised.stdout.trim(),
            native.stdout.trim(),
            "{args:?} under appshot differs from natively"
        );
        native.stdout.trim().to_string()
    }
}

/// A root-only (0600) Unix socket server in this test process that
/// answers each client with its SO_PEERCRED uid.
fn root_only_server(path: &Path) {
    let listener = UnixListener::bind(path).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let uid = peer_uid(&conn);
            let _ = (&conn).write_all(format!("peer-uid={uid}\n").as_bytes());
        }
    });
}

fn peer_uid(conn: &std::os::unix::net::UnixStream) -> u32 {
    nix::sys::socket::getsockopt(conn, nix::sys::socket::sockopt::PeerCredentials)
        .expect("SO_PEERCRED")
        .uid()
}

fn harness(test: &str) -> Option<Harness> {
    Harness::new(test, &["python3", "setpriv", "curl"])
}

#[test]
fn an_unprivileged_application_cannot_reach_a_root_only_unix_socket() {
    let test = "an_unprivileged_application_cannot_reach_a_root_only_unix_socket";
    let Some(h) = harness(test) else { return };
    let place = Place::new();
    let secret = place.path("secret.sock");
    root_only_server(&secret);
    let secret = secret.display().to_string();
    assert_eq!(place.same_both_ways(&h, &["connect", &secret]), "EACCES");

    // A socket it may reach: the server sees nobody, never root.
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o666)).unwrap();
    assert_eq!(
        place.same_both_ways(&h, &["connect", &secret]),
        format!("ok peer-uid={NOBODY}")
    );
}

#[test]
fn an_unprivileged_application_cannot_reach_another_instances_control_socket() {
    let test = "an_unprivileged_application_cannot_reach_another_instances_control_socket";
    let Some(mut h) = harness(test) else { return };
    let place = Place::new();
    let cwd = h.dir("good");
    h.start("good", "good", &cwd, &[], &["sleep", "600"]);
    let control = h
        .run_dir()
        .join("instances/good/control.sock")
        .display()
        .to_string();
    assert!(Path::new(&control).exists(), "{control} missing");
    // Natively nobody may not even look into the run directory.
    assert_eq!(place.same_both_ways(&h, &["connect", &control]), "EACCES");
    assert!(
        h.instance("good").is_some(),
        "the other instance must be unharmed"
    );
}

#[test]
fn unix_socket_files_belong_to_the_application_and_follow_its_umask() {
    let test = "unix_socket_files_belong_to_the_application_and_follow_its_umask";
    let Some(h) = harness(test) else { return };
    let place = Place::new();

    let locked = place.path("locked/s.sock").display().to_string();
    assert_eq!(
        place.same_both_ways(&h, &["bind", &locked, "077"]),
        "EACCES"
    );
    assert!(!Path::new(&locked).exists());

    for (mask, mode) in [("077", "700"), ("022", "755")] {
        let open = place.path("open/s.sock");
        let want = format!("ok uid={NOBODY} gid={NOBODY} mode={mode} chmod=ok");
        let native = place.native(&["bind", &open.display().to_string(), mask]);
        assert_eq!(native.stdout.trim(), want, "natively: {native}");
        fs::remove_file(&open).unwrap();
        let supervised = place.supervised(&h, "evil", &["bind", &open.display().to_string(), mask]);
        assert_eq!(
            supervised.stdout.trim(),
            want,
            "under appshot: {supervised}"
        );
        let meta = fs::metadata(&open).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (NOBODY, NOBODY));
        fs::remove_file(&open).unwrap();
    }
}

#[test]
fn an_af_unspec_bind_is_judged_and_multiplexed_like_any_bind() {
    let test = "an_af_unspec_bind_is_judged_and_multiplexed_like_any_bind";
    let Some(mut h) = harness(test) else { return };
    let place = Place::new();
    // Port 80 needs CAP_NET_BIND_SERVICE, which nobody lacks.
    assert_eq!(place.same_both_ways(&h, &["unspec", "80"]), "EACCES");

    // On a multiplexed port the squatter gets a translation under its own
    // AID like any bind, so another AID's client is refused.
    let port = free_port(19080..=19099).to_string();
    let cmd = place.as_nobody(&["unspec", &port, "serve"]);
    let argv: Vec<&str> = cmd.iter().map(String::as_str).collect();
    let cwd = place.root.clone();
    h.start("squatter", "evil", &cwd, &[], &argv);
    assert!(
        poll(READY, || !h.translations("squatter").is_empty()),
        "the AF_UNSPEC bind of {port} has no translation: {:?}",
        h.ports()
    );
    let url = format!("http://127.0.0.1:{port}/");
    let good = h.curl("good", &url);
    assert_eq!(good.code, Some(7), "AID good must be refused: {good}");
    let evil = h.client("evil", &["python3", "-c", &connect_and_read(&port)]);
    assert_eq!(evil.stdout.trim(), "squatter", "{evil}");
}

fn connect_and_read(port: &str) -> String {
    format!(
        "import socket; s = socket.create_connection(('127.0.0.1', {port}), 5); \
         print(s.makefile().readline().strip())"
    )
}

#[test]
fn memcached_dropping_privileges_then_creating_its_unix_socket_serves() {
    let test = "memcached_dropping_privileges_then_creating_its_unix_socket_serves";
    let Some(mut h) = Harness::new(test, &["memcached", "python3", "setpriv"]) else {
        return;
    };
    let place = Place::new();
    let sock = place.path("open/mc.sock");
    let sock_arg = sock.display().to_string();
    // memcached starts as root, becomes nobody, and only then creates its
    // socket with mode 0700 (`-a`): the file must be nobody's, or nobody's
    // own clients could not use it.
    let cwd = place.root.clone();
    h.start(
        "mc",
        "mc",
        &cwd,
        &[],
        &["memcached", "-u", "nobody", "-s", &sock_arg, "-a", "0700"],
    );
    assert!(poll(READY, || sock.exists()), "{}", h.log("mc"));
    let meta = fs::metadata(&sock).unwrap();
    assert_eq!(
        (meta.uid(), meta.mode() & 0o777),
        (NOBODY, 0o700),
        "memcached's socket is not nobody's 0700"
    );
    // nobody's client is served, natively and under appshot.
    let set_get = format!(
        "import socket; s = socket.socket(socket.AF_UNIX); s.connect({sock_arg:?}); \
         s.sendall(b'set k 0 0 5\\r\\nhello\\r\\nget k\\r\\n'); f = s.makefile('rb'); \
         print(f.readline().strip().decode(), f.readline().strip().decode(), f.readline().strip().decode())"
    );
    let want = "STORED VALUE k 0 5 hello";
    let native = run(
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .args(["/usr/bin/python3", "-c", &set_get])
            .stdin(Stdio::null()),
        TIMEOUT,
    );
    assert_eq!(native.stdout.trim(), want, "{native}");
    let supervised = h.client(
        "mc",
        &[
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "/usr/bin/python3",
            "-c",
            &set_get,
        ],
    );
    assert_eq!(supervised.stdout.trim(), want, "{supervised}");
    // Another unprivileged user may not use it, under appshot either.
    let other = h.client(
        "mc",
        &[
            "setpriv",
            "--reuid=65533",
            "--regid=65533",
            "--clear-groups",
            "/usr/bin/python3",
            "-c",
            &set_get,
        ],
    );
    assert!(
        other.stderr.contains("PermissionError"),
        "uid 65533 reached nobody's 0700 socket: {other}"
    );
}
