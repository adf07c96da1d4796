//! System V IPC objects (shared memory, semaphore sets, message queues) of
//! the calling thread's IPC namespace: read whole for a snapshot, and made
//! again with their ids, owners and contents for a restore.

use std::io;

/// `MSG_COPY`: msgrcv copies the message at an index and leaves it queued.
const MSG_COPY: libc::c_int = 0o40000;
/// Largest message msgrcv is asked for (the kernel's MSGMAX is 8192 by
/// default; a queue never holds a message larger than its byte limit).
const MSG_MAX: usize = 1 << 16;

/// Which kind of object an id names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Shm,
    Sem,
    Msg,
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ret)
}

/// The bytes of shared memory segment `id`, `len` of them.
pub fn shm_read(id: i32, len: usize) -> io::Result<Vec<u8>> {
    let mut out = vec![0u8; len];
    with_attached(id, libc::SHM_RDONLY, len, |p| {
        // SAFETY: the segment is attached at `p` for at least `len` bytes
        // (checked by `with_attached`), and `out` holds `len` bytes.
        unsafe { std::ptr::copy_nonoverlapping(p, out.as_mut_ptr(), len) };
    })?;
    Ok(out)
}

/// Writes `data` at the start of shared memory segment `id`.
pub fn shm_write(id: i32, data: &[u8]) -> io::Result<()> {
    with_attached(id, 0, data.len(), |p| {
        // SAFETY: the segment is attached writable at `p` for at least
        // `data.len()` bytes (checked by `with_attached`).
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) };
    })
}

fn with_attached(
    id: i32,
    flags: libc::c_int,
    len: usize,
    f: impl FnOnce(*mut u8),
) -> io::Result<()> {
    let size = shm_stat(id)?.shm_segsz;
    if len > size {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: shmat maps the segment at an address the kernel chooses; the
    // pointer is checked before use and detached below.
    let p = unsafe { libc::shmat(id, std::ptr::null(), flags) };
    if p as isize == -1 {
        return Err(io::Error::last_os_error());
    }
    f(p.cast());
    // SAFETY: `p` is the address shmat returned above.
    check(unsafe { libc::shmdt(p) })?;
    Ok(())
}

fn shm_stat(id: i32) -> io::Result<libc::shmid_ds> {
    // SAFETY: shmid_ds is plain data; IPC_STAT fills it.
    let mut ds: libc::shmid_ds = unsafe { std::mem::zeroed() };
    // SAFETY: IPC_STAT writes one shmid_ds into `ds`.
    check(unsafe { libc::shmctl(id, libc::IPC_STAT, &mut ds) })?;
    Ok(ds)
}

/// Creates an object of `kind` with `key` (IPC_EXCL: it must not exist);
/// `size` is the segment size or the number of semaphores.
pub fn create(kind: Kind, key: i32, size: usize, mode: u32) -> io::Result<i32> {
    let flags = libc::IPC_CREAT | libc::IPC_EXCL | (mode & 0o777) as libc::c_int;
    check(match kind {
        // SAFETY: integer arguments only.
        Kind::Shm => unsafe { libc::shmget(key, size, flags) },
        // SAFETY: integer arguments only.
        Kind::Sem => unsafe { libc::semget(key, size as libc::c_int, flags) },
        // SAFETY: integer arguments only.
        Kind::Msg => unsafe { libc::msgget(key, flags) },
    })
}

/// Gives object `id` its owner and mode (its creator stays whoever
/// created it).
pub fn set_owner(kind: Kind, id: i32, uid: u32, gid: u32, mode: u32) -> io::Result<()> {
    macro_rules! set {
        ($ds:ty, $ctl:expr, $perm:ident) => {{
            // SAFETY: the ds struct is plain data, for which all zeroes
            // is a valid value.
            let mut ds: $ds = unsafe { std::mem::zeroed() };
            // SAFETY: IPC_STAT fills the one ds struct it is given.
            check(unsafe { $ctl(id, libc::IPC_STAT, &mut ds) })?;
            ds.$perm.uid = uid;
            ds.$perm.gid = gid;
            ds.$perm.mode = (mode & 0o777) as _;
            // SAFETY: as above.
            check(unsafe { $ctl(id, libc::IPC_SET, &mut ds) })?;
        }};
    }
    match kind {
        Kind::Shm => set!(libc::shmid_ds, libc::shmctl, shm_perm),
        Kind::Msg => set!(libc::msqid_ds, libc::msgctl, msg_perm),
        Kind::Sem => {
            // SAFETY: semid_ds is plain data, for which all zeroes is a
            // valid value.
            let mut ds: libc::semid_ds = unsafe { std::mem::zeroed() };
            // SAFETY: semctl's fourth argument is the union semun, whose
            // `buf` member is this pointer; IPC_STAT fills it.
            check(unsafe { libc::semctl(id, 0, libc::IPC_STAT, &mut ds as *mut libc::semid_ds) })?;
            ds.sem_perm.uid = uid;
            ds.sem_perm.gid = gid;
            ds.sem_perm.mode = (mode & 0o777) as _;
            // SAFETY: as above.
            check(unsafe { libc::semctl(id, 0, libc::IPC_SET, &mut ds as *mut libc::semid_ds) })?;
        }
    }
    Ok(())
}

/// The values of the `n` semaphores of set `id`.
pub fn sem_values(id: i32, n: usize) -> io::Result<Vec<u16>> {
    let mut values = vec![0u16; n];
    // SAFETY: GETALL writes one unsigned short per semaphore of the set,
    // `n` of them, into the array semun's `array` member points to.
    check(unsafe { libc::semctl(id, 0, libc::GETALL, values.as_mut_ptr()) })?;
    Ok(values)
}

/// Sets every semaphore of set `id` (as many as `values` holds).
pub fn set_sem_values(id: i32, values: &[u16]) -> io::Result<()> {
    // SAFETY: SETALL reads one unsigned short per semaphore of the set
    // from the array semun's `array` member points to; the caller passes
    // as many as the set has.
    check(unsafe { libc::semctl(id, 0, libc::SETALL, values.as_ptr()) })?;
    Ok(())
}

/// `struct msgbuf` with room for the largest message.
#[repr(C)]
struct MsgBuf {
    mtype: libc::c_long,
    mtext: [u8; MSG_MAX],
}

/// The messages queued in `id`, in order, left queued: (type, bytes).
pub fn msg_peek_all(id: i32, count: usize) -> io::Result<Vec<(i64, Vec<u8>)>> {
    let mut buf = Box::new(MsgBuf {
        mtype: 0,
        mtext: [0; MSG_MAX],
    });
    let mut out = Vec::with_capacity(count);
    for index in 0..count {
        // SAFETY: msgrcv writes at most MSG_MAX bytes of text after the
        // type into `buf`, which has room for both.
        let n = unsafe {
            libc::msgrcv(
                id,
                (&mut *buf as *mut MsgBuf).cast(),
                MSG_MAX,
                index as libc::c_long,
                MSG_COPY | libc::IPC_NOWAIT,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        out.push((buf.mtype, buf.mtext[..n as usize].to_vec()));
    }
    Ok(out)
}

/// Queues one message at the end of `id`.
pub fn msg_send(id: i32, mtype: i64, data: &[u8]) -> io::Result<()> {
    if data.len() > MSG_MAX {
        return Err(io::Error::from_raw_os_error(libc::E2BIG));
    }
    let mut buf = Box::new(MsgBuf {
        mtype: mtype as libc::c_long,
        mtext: [0; MSG_MAX],
    });
    buf.mtext[..data.len()].copy_from_slice(data);
    // SAFETY: msgsnd reads the type and `data.len()` bytes of text from
    // `buf`, which holds them.
    check(unsafe {
        libc::msgsnd(
            id,
            (&*buf as *const MsgBuf).cast(),
            data.len(),
            libc::IPC_NOWAIT,
        )
    })?;
    Ok(())
}
