//! The routes around the filter are closed for real, unmodified programs:
//! io_uring fails with ENOSYS, a syscall with an x32 number kills the
//! process, and a TCP Fast Open send (a connect in disguise) is refused.

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

    let under = h.client("f", &["python3", "-c", PY_FASTOPEN]);
    assert_eq!(
        under.stdout.trim(),
        format!("errno {}", libc::EOPNOTSUPP),
        "{under}"
    );
}
