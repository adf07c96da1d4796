//! signalfd: its signal mask (fdinfo `sigmask`); the signals it reads are
//! the process's pending ones, saved with the threads.

use super::field;
use crate::error::SnapshotError;
use crate::image::model::FdKind;
use crate::ptrace::{Injector, Memory};

pub fn save(pid: u32, fd: i32, info: &str, flags: i32) -> Result<FdKind, SnapshotError> {
    let mask = field(info, "sigmask")
        .and_then(|m| u64::from_str_radix(m, 16).ok())
        .ok_or_else(|| SnapshotError::UnsupportedFd {
            pid,
            fd,
            what: "signalfd without a readable sigmask".into(),
        })?;
    Ok(FdKind::SignalFd { mask, flags })
}

/// Creates the signalfd in process `pid` (close-on-exec, its other flags
/// are the caller's) and returns its fd there.
pub fn restore(
    inj: &Injector,
    mem: &Memory,
    pid: u32,
    data: u64,
    fd: i32,
    mask: u64,
) -> Result<u64, SnapshotError> {
    mem.write(data, &mask.to_ne_bytes())?;
    inj.ok(
        pid,
        &format!("signalfd4 for fd {fd}"),
        libc::SYS_signalfd4,
        &[u64::MAX, data, 8, libc::SFD_CLOEXEC as u64],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signalfd_mask() {
        let info = "pos:\t0\nflags:\t04002\nmnt_id:\t17\nino:\t1038\nsigmask:\t0000000000004200\n";
        assert_eq!(
            save(1, 3, info, 0o4002).unwrap(),
            FdKind::SignalFd {
                mask: 1 << (libc::SIGUSR1 - 1) | 1 << (libc::SIGTERM - 1),
                flags: 0o4002
            }
        );
        assert!(save(1, 3, "pos:\t0\n", 0).is_err());
    }
}
