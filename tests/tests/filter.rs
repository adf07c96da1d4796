//! The routes around the filter are closed for real, unmodified programs:
//! io_uring fails with ENOSYS, a syscall with an x32 number kills the
//! process, and a TCP Fast Open send (a connect in disguise) is refused
//! where the supervisor routes connects (`--routing notified`); under the
//! kernel's routing it passes the same connect hook as a connect.

mod common;

use common::Harness;

const PY_IO_URING: &str = r#"
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
params = ctypes.create_string_buffer(120)
r = libc.syscall(425, 8, params)
print("io_uring_setup", r, ctypes.get_errno())
"#;

const PY_X32_BIND: &str = r#"
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
libc.syscall(0x40000000 | 49, 0, 0, 0)
print("survived")
"#;

const PY_FASTOPEN: &str = r#"
import socket
s = socket.socket()
try:
    s.sendto(b"x", socket.MSG_FASTOPEN, ("127.0.0.1", 9))
    print("sent")
except OSError as e:
    print("errno", e.errno)
"#;

#[test]
fn escape_routes_around_the_filter_are_closed() {
    let Some(h) = Harness::new("escape_routes_around_the_filter_are_closed", &["python3"]) else {
        return;
    };
    let native = common::run(
        std::process::Command::new("python3").args(["-c", PY_IO_URING]),
        std::time::Duration::from_secs(30),
    );
    let enosys = format!("io_uring_setup -1 {}", libc::ENOSYS);
    assert_ne!(
        native.stdout.trim(),
        enosys,
        "io_uring is ENOSYS natively already: {native}"
    );
    let under = h.client("f", &["python3", "-c", PY_IO_URING]);
    assert!(under.success(), "{under}");
    assert_eq!(under.stdout.trim(), enosys, "{under}");

    let native = common::run(
        std::process::Command::new("python3").args(["-c", PY_X32_BIND]),
        std::time::Duration::from_secs(30),
    );
    assert!(
        native.stdout.contains("survived"),
        "natively an x32 number is just ENOSYS: {native}"
    );
    let under = h.client("f", &["python3", "-c", PY_X32_BIND]);
    assert!(!under.stdout.contains("survived"), "{under}");
    assert_eq!(
        under.code,
        Some(128 + libc::SIGSYS),
        "killed by the filter: {under}"
    );

    for (routing, errno) in [
        ("notified", libc::EOPNOTSUPP),
        // Nothing listens on port 9 and no instance serves it: the
        // kernel's answer, as natively.
        ("kernel", libc::ECONNREFUSED),
    ] {
        let mut cmd = h.appshot();
        cmd.args(["run", "--routing", routing, "--aid", "f", "--"])
            .args(["python3", "-c", PY_FASTOPEN]);
        let under = common::run(&mut cmd, std::time::Duration::from_secs(30));
        assert_eq!(
            under.stdout.trim(),
            format!("errno {errno}"),
            "--routing {routing}: {under}"
        );
    }
}

/// Another thread swapping sockets behind one fd number cannot make the
/// supervisor judge one socket while the kernel connects another: calls on
/// non-INET sockets are performed by the supervisor too, never continued.
#[test]
fn swapping_sockets_behind_an_fd_does_not_reach_another_aid() {
    let Some(mut h) = Harness::new(
        "swapping_sockets_behind_an_fd_does_not_reach_another_aid",
        &["python3", "gcc"],
    ) else {
        return;
    };
    let swap = h.compile("fdswap.c", "fdswap");
    let dir = h.dir("www");
    // Two instances on 9650, so AID b's gets a real port other than 9650.
    h.start(
        "held",
        "a",
        &dir,
        &[],
        &["python3", "-m", "http.server", "9650"],
    );
    h.wait_log("held", "Serving HTTP");
    h.start(
        "victim",
        "b",
        &dir,
        &[],
        &["python3", "-m", "http.server", "9650"],
    );
    h.wait_log("victim", "Serving HTTP");
    let row = h.instance("victim").expect("victim listed");
    let real = common::port_pairs(&row)
        .into_iter()
        .map(|p| p.real)
        .find(|&p| p != 9650)
        .expect("victim has a real port of its own");

    let ran = h.client("a", &[swap.to_str().unwrap(), &real.to_string(), "3000"]);
    assert!(ran.success(), "{ran}");
    assert_eq!(
        ran.stdout.trim(),
        "REFUSED 3000",
        "AID a reached AID b's real port: {ran}"
    );
}
