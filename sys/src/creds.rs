//! Taking on another task's credentials in the calling thread only.
//!
//! Linux keeps credentials per thread; glibc's `setresuid`, `setgroups` and
//! friends broadcast a change to every thread of the process, so this
//! module makes the raw syscalls instead. A supervisor thread that performs
//! one call for an application takes on its credentials here and ends
//! afterwards: nothing is ever switched back.

use std::io;

/// Who the kernel should take the calling thread for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Persona {
    /// Effective ids: what SO_PEERCRED reports and what capability
    /// checks see.
    pub euid: u32,
    pub egid: u32,
    /// Filesystem ids: what permission checks on paths use and what new
    /// files are owned by.
    pub fsuid: u32,
    pub fsgid: u32,
    pub groups: Vec<u32>,
    /// The capabilities the thread keeps in its effective set (bit N is
    /// capability N); the kernel lets it keep only those it holds.
    pub effective_caps: u64,
}

const SECBIT_NO_SETUID_FIXUP: libc::c_ulong = 1 << 2;
const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
/// `id_t` -1: "leave this id as it is" for setresuid/setresgid.
const UNCHANGED: libc::c_long = -1;

/// `struct __user_cap_header_struct`.
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

/// `struct __user_cap_data_struct`; version 3 takes two of them (low and
/// high 32 capability bits).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Makes the calling thread act as `p` until it ends.
///
/// The real and saved uid stay the supervisor's (0): no unprivileged
/// process may signal or ptrace a thread whose real and saved ids are
/// root, while the thread is briefly someone else. The effective and
/// filesystem ids, the groups and the effective capabilities become the
/// task's, so the kernel judges every check as it would for the task.
pub fn assume(p: &Persona) -> io::Result<()> {
    // Without this, an euid change away from 0 would empty the effective
    // set before the ids below could all be set.
    let bits = raw(|| {
        // SAFETY: PR_GET_SECUREBITS takes no pointers.
        unsafe { libc::prctl(libc::PR_GET_SECUREBITS) as libc::c_long }
    })?;
    raw(|| {
        // SAFETY: PR_SET_SECUREBITS takes an integer and no pointers; it
        // changes the calling thread's credentials only.
        unsafe {
            libc::prctl(
                libc::PR_SET_SECUREBITS,
                bits as libc::c_ulong | SECBIT_NO_SETUID_FIXUP,
            ) as libc::c_long
        }
    })?;
    let groups: Vec<libc::gid_t> = p.groups.clone();
    raw(|| {
        // SAFETY: the raw syscall reads `groups.len()` gids from a live
        // vector; unlike glibc's wrapper it affects this thread only.
        unsafe { libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) }
    })?;
    raw(|| {
        // SAFETY: integer arguments only; this thread only.
        unsafe {
            libc::syscall(
                libc::SYS_setresgid,
                UNCHANGED,
                libc::c_long::from(p.egid),
                UNCHANGED,
            )
        }
    })?;
    set_fs_id(libc::SYS_setfsgid, p.fsgid)?;
    raw(|| {
        // SAFETY: integer arguments only; this thread only.
        unsafe {
            libc::syscall(
                libc::SYS_setresuid,
                UNCHANGED,
                libc::c_long::from(p.euid),
                UNCHANGED,
            )
        }
    })?;
    set_fs_id(libc::SYS_setfsuid, p.fsuid)?;

    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    raw(|| {
        // SAFETY: capget writes two CapData structs, which `data` holds,
        // and reads the header.
        unsafe {
            libc::syscall(
                libc::SYS_capget,
                &mut header as *mut CapHeader,
                data.as_mut_ptr(),
            )
        }
    })?;
    data[0].effective = data[0].permitted & p.effective_caps as u32;
    data[1].effective = data[1].permitted & (p.effective_caps >> 32) as u32;
    raw(|| {
        // SAFETY: capset reads the header and two CapData structs from
        // live locals; with pid 0 it changes the calling thread only.
        unsafe {
            libc::syscall(
                libc::SYS_capset,
                &mut header as *mut CapHeader,
                data.as_ptr(),
            )
        }
    })?;
    Ok(())
}

/// setfsuid/setfsgid report no error; a second call with an id no one
/// can take (-1) returns the id in force, which tells whether the first
/// took effect.
fn set_fs_id(nr: libc::c_long, id: u32) -> io::Result<()> {
    // SAFETY: integer argument only; this thread only.
    unsafe { libc::syscall(nr, libc::c_long::from(id)) };
    // SAFETY: as above; -1 changes nothing and returns the current id.
    let now = unsafe { libc::syscall(nr, UNCHANGED) };
    if now as u32 == id {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(libc::EPERM))
    }
}

fn raw(call: impl FnOnce() -> libc::c_long) -> io::Result<libc::c_long> {
    let r = call();
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r)
}
