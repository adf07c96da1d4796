//! Credentials of a thread, saved and restored side by side.
//!
//! Saved from `/proc/TID/status`, plus the securebits, which only the
//! thread itself can tell. Restored in each thread by injected syscalls
//! once everything that needs root is rebuilt, in the order the kernel
//! allows: with SECBIT_NO_SETUID_FIXUP set first, changing the ids keeps
//! the capabilities needed for the rest (dropping bounding bits, setting
//! the final securebits), and capset then sets the saved sets exactly.

use appshot_sys::abi::{self, CapData, CapHeader};

use crate::error::SnapshotError;
use crate::image::model::{CapSets, Credentials};
use crate::ptrace::{Injector, Memory};

const SECBIT_NO_SETUID_FIXUP: u64 = 1 << 2;
const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// What the kernel shows of thread `tid` (host TID); `securebits` comes
/// from the thread itself.
pub fn save(tid: u32, inj: &Injector) -> Result<Credentials, SnapshotError> {
    let status = status(tid)?;
    let securebits = inj.ok(
        tid,
        "PR_GET_SECUREBITS",
        libc::SYS_prctl,
        &[libc::PR_GET_SECUREBITS as u64],
    )? as u32;
    Ok(Credentials {
        uids: [status.ruid, status.euid, status.suid, status.fuid],
        gids: [status.rgid, status.egid, status.sgid, status.fgid],
        groups: status.groups.iter().map(|&g| g as u32).collect(),
        caps: CapSets {
            inheritable: status.capinh,
            permitted: status.capprm,
            effective: status.capeff,
            bounding: status.capbnd.unwrap_or(u64::MAX),
            ambient: status.capamb.unwrap_or(0),
        },
        securebits,
        no_new_privs: status.nonewprivs.unwrap_or(0) != 0,
    })
}

/// Makes thread `tid` (still root, as every restored thread starts) what
/// `c` says, using `data` in its memory as scratch space. A thread that
/// has them already (an application that runs as root, as its stub or
/// holder did) is left as it is: one injected call to read its
/// securebits instead of nine to set everything to what it is.
pub fn restore(
    inj: &Injector,
    mem: &Memory,
    tid: u32,
    data: u64,
    c: &Credentials,
) -> Result<(), SnapshotError> {
    if save(tid, inj)? == *c {
        return Ok(());
    }
    let prctl = |what: &str, args: &[u64]| inj.ok(tid, what, libc::SYS_prctl, args);
    prctl(
        "PR_SET_SECUREBITS (no setuid fix-up)",
        &[libc::PR_SET_SECUREBITS as u64, SECBIT_NO_SETUID_FIXUP],
    )?;
    mem.write(data, abi::bytes_of_slice(&c.groups))?;
    inj.ok(
        tid,
        "setgroups",
        libc::SYS_setgroups,
        &[c.groups.len() as u64, data],
    )?;
    let [r, e, s, fs] = c.gids.map(u64::from);
    inj.ok(tid, "setresgid", libc::SYS_setresgid, &[r, e, s])?;
    inj.call(tid, libc::SYS_setfsgid, &[fs])?;
    let [r, e, s, fs] = c.uids.map(u64::from);
    inj.ok(tid, "setresuid", libc::SYS_setresuid, &[r, e, s])?;
    inj.call(tid, libc::SYS_setfsuid, &[fs])?;
    for cap in 0..=last_cap() {
        if c.caps.bounding & (1 << cap) == 0 {
            prctl(
                &format!("PR_CAPBSET_DROP {cap}"),
                &[libc::PR_CAPBSET_DROP as u64, cap],
            )?;
        }
    }
    prctl(
        "PR_SET_SECUREBITS",
        &[libc::PR_SET_SECUREBITS as u64, u64::from(c.securebits)],
    )?;
    let header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let half = |shift: u32| CapData {
        effective: (c.caps.effective >> shift) as u32,
        permitted: (c.caps.permitted >> shift) as u32,
        inheritable: (c.caps.inheritable >> shift) as u32,
    };
    let sets = [half(0), half(32)];
    let sets_at = data + std::mem::size_of::<CapHeader>() as u64;
    mem.write_value(data, &header)?;
    mem.write_value(sets_at, &sets)?;
    inj.ok(tid, "capset", libc::SYS_capset, &[data, sets_at])?;
    for cap in 0..=last_cap() {
        if c.caps.ambient & (1 << cap) != 0 {
            prctl(
                &format!("PR_CAP_AMBIENT_RAISE {cap}"),
                &[
                    libc::PR_CAP_AMBIENT as u64,
                    libc::PR_CAP_AMBIENT_RAISE as u64,
                    cap,
                    0,
                    0,
                ],
            )?;
        }
    }
    if c.no_new_privs {
        prctl(
            "PR_SET_NO_NEW_PRIVS",
            &[libc::PR_SET_NO_NEW_PRIVS as u64, 1, 0, 0, 0],
        )?;
    }
    // setfsuid/setfsgid report no error: check what the kernel shows.
    check(tid, c)
}

fn check(tid: u32, c: &Credentials) -> Result<(), SnapshotError> {
    let got = status(tid)?;
    let now = (
        [got.ruid, got.euid, got.suid, got.fuid],
        [got.rgid, got.egid, got.sgid, got.fgid],
        got.capeff,
    );
    if now != (c.uids, c.gids, c.caps.effective) {
        return Err(SnapshotError::process(
            tid,
            format!(
                "restoring credentials: uids/gids/effective caps are {now:?}, not {:?}",
                (c.uids, c.gids, c.caps.effective)
            ),
            std::io::ErrorKind::PermissionDenied,
        ));
    }
    Ok(())
}

fn status(tid: u32) -> Result<procfs::process::Status, SnapshotError> {
    procfs::process::Process::new(tid as i32)
        .and_then(|p| p.status())
        .map_err(|error| SnapshotError::Status { pid: tid, error })
}

/// The highest capability number this kernel knows.
fn last_cap() -> u64 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
}
