//! System V IPC (shared memory, semaphore sets, message queues), saved and
//! restored side by side.
//!
//! The objects live in an IPC namespace, not in a process: every instance
//! has one of its own (its namespace init unshares it), so ids that the
//! application holds as plain numbers can be made again exactly — a
//! namespace's `*_next_id` sysctl hands out the next id asked for. Both
//! sides work from a thread that has joined the instance's namespace.
//! A segment's attachments in the process are mappings of their own
//! (`VmaKind::SysvShm`), attached again by the restored process.

use std::fs::File;
use std::os::unix::fs::MetadataExt;

use appshot_sys::sysv::{self, Kind};
use nix::sched::{setns, CloneFlags};

use crate::error::{RestoreError, SnapshotError};
use crate::image::model::{IpcPerm, SysvIpc, SysvMsg, SysvSem, SysvShm};
use crate::image::{Image, ImageWriter, PAGE};

/// Objects read in the namespace, shm bytes not yet in the image.
pub struct Saved {
    ipc: SysvIpc,
    shm_bytes: Vec<Vec<u8>>,
}

/// Reads every object of the IPC namespace of process `pid`. A process in
/// the supervisor's own namespace (an instance started before instances
/// had their own) has none of its own to save.
pub fn save(pid: u32) -> Result<Saved, SnapshotError> {
    let ns = ipc_ns(pid)?;
    if !own_namespace(pid)? {
        return Ok(Saved {
            ipc: SysvIpc::default(),
            shm_bytes: Vec::new(),
        });
    }
    in_namespace(pid, ns, move || {
        let io = |what: &str, e: std::io::Error| SnapshotError::process(pid, what.to_string(), e);
        let mut ipc = SysvIpc::default();
        let mut shm_bytes = Vec::new();
        for row in table("shm").map_err(|e| io("reading /proc/sysvipc/shm", e))? {
            let perm = row.perm(7, 8);
            let size = row.num(3);
            let bytes = sysv::shm_read(perm.id, size as usize)
                .map_err(|e| io(&format!("reading shm segment {}", perm.id), e))?;
            shm_bytes.push(bytes);
            ipc.shm.push(SysvShm {
                perm,
                size,
                offset: 0,
            });
        }
        for row in table("sem").map_err(|e| io("reading /proc/sysvipc/sem", e))? {
            let perm = row.perm(4, 5);
            let values = sysv::sem_values(perm.id, row.num(3) as usize)
                .map_err(|e| io(&format!("reading semaphore set {}", perm.id), e))?;
            ipc.sem.push(SysvSem { perm, values });
        }
        for row in table("msg").map_err(|e| io("reading /proc/sysvipc/msg", e))? {
            let perm = row.perm(7, 8);
            let messages = sysv::msg_peek_all(perm.id, row.num(4) as usize)
                .map_err(|e| io(&format!("reading message queue {}", perm.id), e))?;
            ipc.msg.push(SysvMsg { perm, messages });
        }
        Ok(Saved { ipc, shm_bytes })
    })
}

impl Saved {
    /// A segment can be attached again only whole, as `shmat` attaches it.
    pub fn check_attached(&self, pid: u32, id: i32, len: u64) -> Result<(), SnapshotError> {
        let seg = self.ipc.shm.iter().find(|s| s.perm.id == id);
        match seg {
            Some(s) if s.size.div_ceil(PAGE) * PAGE == len => Ok(()),
            Some(s) => Err(SnapshotError::Unsupported {
                pid,
                what: format!(
                    "System V shm segment {id} ({} bytes) is attached only in part ({len} bytes)",
                    s.size
                ),
            }),
            None => Err(SnapshotError::Unsupported {
                pid,
                what: format!(
                    "System V shm segment {id} is attached but not in the instance's own IPC namespace"
                ),
            }),
        }
    }

    /// Puts the segments' bytes into the image's pages section.
    pub fn write(self, writer: &mut ImageWriter) -> Result<SysvIpc, SnapshotError> {
        let mut ipc = self.ipc;
        for (seg, mut bytes) in ipc.shm.iter_mut().zip(self.shm_bytes) {
            bytes.resize(bytes.len().div_ceil(PAGE as usize) * PAGE as usize, 0);
            seg.offset = writer.write_pages(&bytes)?;
        }
        Ok(ipc)
    }
}

/// Makes the image's objects again, with their ids, in the IPC namespace of
/// `pid` (a restore's stub, before it attaches any segment).
pub fn restore(pid: u32, image: &Image) -> Result<(), SnapshotError> {
    let ipc = image.manifest.ipc.clone();
    if ipc == SysvIpc::default() {
        return Ok(());
    }
    let ns = ipc_ns(pid)?;
    if !own_namespace(pid)? {
        return Err(RestoreError::HostIpcNamespace.into());
    }
    let mut shm_bytes = Vec::with_capacity(ipc.shm.len());
    for seg in &ipc.shm {
        let mut buf = vec![0u8; seg.size as usize];
        image.read_pages(seg.offset, &mut buf)?;
        shm_bytes.push(buf);
    }
    in_namespace(pid, ns, move || {
        for (seg, bytes) in ipc.shm.iter().zip(&shm_bytes) {
            let id = make(pid, Kind::Shm, &seg.perm, seg.size as usize)?;
            sysv::shm_write(id, bytes).map_err(|e| failed(pid, "filling shm segment", id, e))?;
        }
        for set in &ipc.sem {
            let id = make(pid, Kind::Sem, &set.perm, set.values.len())?;
            sysv::set_sem_values(id, &set.values)
                .map_err(|e| failed(pid, "setting semaphore set", id, e))?;
        }
        for queue in &ipc.msg {
            let id = make(pid, Kind::Msg, &queue.perm, 0)?;
            for (mtype, text) in &queue.messages {
                sysv::msg_send(id, *mtype, text)
                    .map_err(|e| failed(pid, "queueing a message in", id, e))?;
            }
        }
        Ok(())
    })
}

/// Creates one object with the saved id: the namespace's next-id sysctl
/// names it, and the kernel resets it once used.
fn make(pid: u32, kind: Kind, perm: &IpcPerm, size: usize) -> Result<i32, SnapshotError> {
    let sysctl = match kind {
        Kind::Shm => "shm_next_id",
        Kind::Sem => "sem_next_id",
        Kind::Msg => "msg_next_id",
    };
    let path = format!("/proc/sys/kernel/{sysctl}");
    std::fs::write(&path, perm.id.to_string())
        .map_err(|e| SnapshotError::process(pid, format!("writing {path}"), e))?;
    let id = sysv::create(kind, perm.key, size, perm.mode)
        .map_err(|e| failed(pid, "creating", perm.id, e))?;
    if id != perm.id {
        return Err(RestoreError::SysV {
            kind: kind_name(kind),
            id: perm.id,
            what: format!("came back as id {id}"),
        }
        .into());
    }
    sysv::set_owner(kind, id, perm.uid, perm.gid, perm.mode)
        .map_err(|e| failed(pid, "setting the owner of", id, e))?;
    Ok(id)
}

/// How an error names the kind of an object.
fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Shm => "Shm",
        Kind::Sem => "Sem",
        Kind::Msg => "Msg",
    }
}

fn failed(pid: u32, what: &str, id: i32, e: std::io::Error) -> SnapshotError {
    SnapshotError::process(pid, format!("{what} System V object {id}"), e)
}

fn ipc_ns(pid: u32) -> Result<File, SnapshotError> {
    let path = format!("/proc/{pid}/ns/ipc");
    File::open(&path).map_err(|e| SnapshotError::process(pid, format!("opening {path}"), e))
}

fn own_namespace(pid: u32) -> Result<bool, SnapshotError> {
    let inode = |path: String| {
        std::fs::metadata(&path)
            .map(|m| m.ino())
            .map_err(|e| SnapshotError::process(pid, format!("reading {path}"), e))
    };
    Ok(inode(format!("/proc/{pid}/ns/ipc"))? != inode("/proc/self/ns/ipc".into())?)
}

/// Runs `f` in a thread that has joined the IPC namespace `ns`; the thread
/// ends with it, so no supervisor thread stays in an instance's namespace.
fn in_namespace<T: Send + 'static>(
    pid: u32,
    ns: File,
    f: impl FnOnce() -> Result<T, SnapshotError> + Send + 'static,
) -> Result<T, SnapshotError> {
    std::thread::spawn(move || {
        setns(&ns, CloneFlags::CLONE_NEWIPC)
            .map_err(|e| SnapshotError::process(pid, "joining its IPC namespace", e))?;
        f()
    })
    .join()
    .map_err(|_| RestoreError::SysVThreadPanicked)?
}

/// One row of a `/proc/sysvipc` table: whitespace-separated fields, the
/// mode in octal, everything else in decimal.
struct Row(Vec<String>);

impl Row {
    fn num(&self, i: usize) -> u64 {
        self.0.get(i).and_then(|f| f.parse().ok()).unwrap_or(0)
    }

    /// Key, id and mode are the first three columns of every table; uid
    /// and gid sit where the table puts them.
    fn perm(&self, uid: usize, gid: usize) -> IpcPerm {
        IpcPerm {
            key: self.0.first().and_then(|f| f.parse().ok()).unwrap_or(0),
            id: self.num(1) as i32,
            mode: self
                .0
                .get(2)
                .and_then(|f| u32::from_str_radix(f, 8).ok())
                .unwrap_or(0o600),
            uid: self.num(uid) as u32,
            gid: self.num(gid) as u32,
        }
    }
}

/// The rows of `/proc/sysvipc/NAME` as the calling thread's namespace
/// shows them (the header line skipped).
fn table(name: &str) -> std::io::Result<Vec<Row>> {
    let text = std::fs::read_to_string(format!("/proc/sysvipc/{name}"))?;
    Ok(text
        .lines()
        .skip(1)
        .map(|l| Row(l.split_whitespace().map(String::from).collect()))
        .filter(|r| r.0.len() > 3)
        .collect())
}
