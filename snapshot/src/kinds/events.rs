//! epoll and eventfd, both saved from their fdinfo. An epoll instance is
//! recreated empty with the other fds and gets its interest list once
//! every fd (duplicates included) exists; an eventfd comes back with its
//! count.

use super::Stub;
use crate::error::SnapshotError;
use crate::image::model::{FdImage, FdKind};
use crate::proc::parse::FdInfo;

/// The epoll fd described by `info`.
pub fn save_epoll(info: FdInfo, flags: i32) -> FdKind {
    FdKind::Epoll {
        flags,
        targets: info.epoll,
    }
}

/// The eventfd `fd` of process `pid` described by `info`.
pub fn save_eventfd(pid: u32, fd: i32, info: &FdInfo, flags: i32) -> Result<FdKind, SnapshotError> {
    Ok(FdKind::EventFd {
        count: info
            .eventfd_count
            .ok_or_else(|| SnapshotError::UnsupportedFd {
                pid,
                fd,
                what: "eventfd without a count".into(),
            })?,
        flags,
        semaphore: info.eventfd_semaphore,
    })
}

/// Creates the eventfd of `f` in the stub with its count and places it.
pub fn restore_eventfd(
    stub: &Stub,
    f: &FdImage,
    count: u64,
    flags: i32,
    semaphore: bool,
) -> Result<(), SnapshotError> {
    let Stub {
        inj,
        mem,
        pid,
        data,
        ..
    } = *stub;
    let sem = if semaphore { libc::EFD_SEMAPHORE } else { 0 };
    // eventfd2 takes an unsigned int: a 64-bit count is written.
    let temp = (stub.to_high)(inj.ok(
        pid,
        "eventfd2",
        libc::SYS_eventfd2,
        &[0, (sem | libc::EFD_CLOEXEC) as u64],
    )?)?;
    if count != 0 {
        mem.write(data, &count.to_ne_bytes())?;
        inj.ok(
            pid,
            &format!("write of eventfd {} count", f.fd),
            libc::SYS_write,
            &[temp, data, 8],
        )?;
    }
    (stub.place)(temp, f, flags)?;
    inj.call(pid, libc::SYS_close, &[temp])?;
    Ok(())
}

/// Creates every epoll instance among `fds` in the stub, empty, and places
/// it.
pub fn restore_epolls(stub: &Stub, fds: &[FdImage]) -> Result<(), SnapshotError> {
    let Stub { inj, pid, .. } = *stub;
    for f in fds {
        let FdKind::Epoll { flags, .. } = &f.kind else {
            continue;
        };
        let temp = (stub.to_high)(inj.ok(
            pid,
            "epoll_create1",
            libc::SYS_epoll_create1,
            &[libc::EPOLL_CLOEXEC as u64],
        )?)?;
        (stub.place)(temp, f, *flags)?;
        inj.call(pid, libc::SYS_close, &[temp])?;
    }
    Ok(())
}

/// Fills the interest list of every epoll instance among `fds`; run once
/// every fd they name exists.
pub fn restore_interest(stub: &Stub, fds: &[FdImage]) -> Result<(), SnapshotError> {
    let Stub {
        inj,
        mem,
        pid,
        data,
        ..
    } = *stub;
    for f in fds {
        let FdKind::Epoll { targets, .. } = &f.kind else {
            continue;
        };
        for t in targets {
            let ev = libc::epoll_event {
                events: t.events,
                u64: t.data,
            };
            mem.write_value(data, &ev)?;
            inj.ok(
                pid,
                &format!("epoll_ctl add fd {}", t.fd),
                libc::SYS_epoll_ctl,
                &[f.fd as u64, libc::EPOLL_CTL_ADD as u64, t.fd as u64, data],
            )?;
        }
    }
    Ok(())
}
