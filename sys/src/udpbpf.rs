//! The kernel's half of multiplexing without a supervisor: the cgroup
//! sock_addr programs of `bpf/udproutes.bpf.c` (datagrams of every
//! supervised socket; connect, getsockname and getpeername of the instances
//! listed in `routed`), attached to a registry's cgroup and pinned in bpffs
//! with their maps, so that they outlive the process that attached them
//! and every later supervisor of the registry updates the same maps.
//!
//! Loading goes through aya: a pure-Rust loader (no libbpf or libelf to
//! build), which parses the clang-built object with its BTF map
//! definitions and attaches with BPF links.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};

use aya::maps::{HashMap, Map, MapData, MapError};
use aya::pin::PinError;
use aya::programs::links::{FdLink, LinkError};
use aya::programs::{CgroupAttachMode, CgroupSockAddr, CgroupSockAddrAttachType, ProgramError};
use aya::{EbpfError, EbpfLoader};

/// Where bpffs is mounted.
pub const BPFFS: &str = "/sys/fs/bpf";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The programs linked whenever the set is attached (connect and the name
/// calls of kernel-routed instances), by the section names the loader
/// knows their hook by.
const CALL_PROGRAMS: [&str; 6] = [
    "connect4",
    "connect6",
    "getsockname4",
    "getsockname6",
    "getpeername4",
    "getpeername6",
];
/// The programs of the datagram path: every send and receive of every
/// supervised UDP socket runs them, so they are linked only while some
/// datagram route exists (linked for nothing, they cost a one-CPU UDP
/// request/response on an unmultiplexed port about 5 %).
const DATAGRAM_PROGRAMS: [(&str, CgroupSockAddrAttachType); 4] = [
    ("sendmsg4", CgroupSockAddrAttachType::UDPSendMsg4),
    ("sendmsg6", CgroupSockAddrAttachType::UDPSendMsg6),
    ("recvmsg4", CgroupSockAddrAttachType::UDPRecvMsg4),
    ("recvmsg6", CgroupSockAddrAttachType::UDPRecvMsg6),
];

/// Where a loaded program is pinned (its link, when linked, is pinned
/// under its own name); bpffs refuses names with a dot.
fn program_pin(pins: &Path, name: &str) -> PathBuf {
    pins.join(format!("prog_{name}"))
}

fn all_programs() -> impl Iterator<Item = &'static str> {
    CALL_PROGRAMS
        .into_iter()
        .chain(DATAGRAM_PROGRAMS.iter().map(|(name, _)| *name))
}

/// The maps; `routes` is pinned last, so its pin says the set is whole.
const MAPS: [&str; 7] = [
    "ports", "locals", "connects", "names", "routed", "state", "routes",
];
/// How many instances of one AID a connect spreads over (`GROUP_MAX`).
pub const GROUP_MAX: usize = 64;

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/udproutes.bpf.o"));

/// A route's key, as `struct route_key` of the program.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RouteKey {
    /// The cgroup id (the inode number) of the sender's AID directory.
    pub aid: u64,
    /// The destination in network order; IPv4 as `::ffff:a.b.c.d`, a
    /// wildcard as `::` or `::ffff:0.0.0.0`.
    pub addr: [u8; 16],
    /// The virtual port.
    pub port: u32,
    pub pad: u32,
}

// SAFETY: repr(C) of integers and a byte array, 8 + 16 + 4 + 4 bytes with
// no padding: every bit pattern is a valid value and no byte is
// uninitialised.
unsafe impl aya::Pod for RouteKey {}

/// A key of the connect and name maps, as `struct class_key`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClassKey {
    /// The cgroup id of the caller's AID directory; 0 for every AID
    /// without entries of its own (and always 0 in the name map).
    pub aid: u64,
    /// [`CLASS_EXACT`]: the address as in [`RouteKey`]; otherwise zero.
    pub addr: [u8; 16],
    pub port: u32,
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub protocol: u8,
    pub class: u8,
    pub pad: u16,
}

// SAFETY: repr(C) of integers and a byte array, 8 + 16 + 4 + 1 + 1 + 2
// bytes with no padding: every bit pattern is valid, no byte uninitialised.
unsafe impl aya::Pod for ClassKey {}

/// The key names this very address.
pub const CLASS_EXACT: u8 = 0;
/// Any local IPv4 address without an exact key.
pub const CLASS_OTHER4: u8 = 1;
/// Any local IPv6 address without an exact key.
pub const CLASS_OTHER6: u8 = 2;

/// What a connect to a key's destination does, as `struct conn_route`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnRoute {
    /// [`PASS`], [`REFUSE`] or [`TO`].
    pub action: u32,
    /// How many of `ports` a [`TO`] spreads over.
    pub count: u32,
    pub ports: [u16; GROUP_MAX],
}

// SAFETY: repr(C) of integers, 4 + 4 + 2 * 64 bytes with no padding: every
// bit pattern is valid, no byte uninitialised.
unsafe impl aya::Pod for ConnRoute {}

pub const PASS: u32 = 0;
pub const REFUSE: u32 = 1;
pub const TO: u32 = 2;

/// What a port is to the datagram programs, as `struct port`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Port {
    /// For a real port, the virtual port it stands for; else 0.
    pub virtual_port: u32,
    /// [`ROUTED_EXACT`] and [`ROUTED_WILDCARD`]: the kinds of routes
    /// whose virtual port this is.
    pub routed: u32,
}

/// A route for a socket bound to an address of its own.
pub const ROUTED_EXACT: u32 = 1;
/// A route for a wildcard socket (`::` or `::ffff:0.0.0.0`).
pub const ROUTED_WILDCARD: u32 = 2;

/// Entries of the `ports` array: one per port number.
pub const PORTS: usize = 1 << 16;

/// What the maps hold: routes by key, virtual ports by real port, the
/// host's addresses (network order, IPv4 mapped); the connect and name
/// classes, and whether the registry has damaged instances.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Entries {
    pub routes: BTreeMap<RouteKey, u32>,
    pub reverse: BTreeMap<u32, u32>,
    pub locals: BTreeSet<[u8; 16]>,
    pub connects: BTreeMap<ClassKey, ConnRoute>,
    pub names: BTreeMap<ClassKey, u32>,
    pub damaged: bool,
}

impl Entries {
    /// The `ports` array these entries make: the virtual ports of the
    /// routes, and the virtual port of each real port.
    pub fn ports(&self) -> Vec<Port> {
        let mut ports = vec![Port::default(); PORTS];
        let v4_any = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0, 0, 0, 0];
        for key in self.routes.keys() {
            if let Some(p) = ports.get_mut(key.port as usize) {
                p.routed |= if key.addr == [0; 16] || key.addr == v4_any {
                    ROUTED_WILDCARD
                } else {
                    ROUTED_EXACT
                };
            }
        }
        for (&real, &virtual_port) in &self.reverse {
            if let Some(p) = ports.get_mut(real as usize) {
                p.virtual_port = virtual_port;
            }
        }
        ports
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error("mounting bpffs on {BPFFS}")]
    Mount(#[source] io::Error),
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("loading the UDP route programs")]
    Load(#[source] EbpfError),
    #[error("program {name}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("link of program {name}")]
    Link {
        name: &'static str,
        #[source]
        source: LinkError,
    },
    #[error("pinning {path}")]
    Pin {
        path: PathBuf,
        #[source]
        source: PinError,
    },
    #[error("map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("mapping the ports array")]
    MapPorts(#[source] io::Error),
    #[error("the object has no {0}")]
    Missing(&'static str),
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> BpfError + '_ {
    move |source| BpfError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Mounts bpffs on [`BPFFS`] unless it is there (systemd mounts it; a
/// bare host or a fresh mount namespace may not).
pub fn ensure_bpffs() -> Result<(), BpfError> {
    let path = CString::new(BPFFS).expect("no NUL");
    // SAFETY: statfs is plain data, all zeroes is a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a valid out-pointer.
    if unsafe { libc::statfs(path.as_ptr(), &mut st) } == 0 && st.f_type == BPF_FS_MAGIC {
        return Ok(());
    }
    let fstype = CString::new("bpf").expect("no NUL");
    // SAFETY: NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            path.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(BpfError::Mount(io::Error::last_os_error()))
    }
}

/// The maps of the programs attached for one registry.
pub struct UdpRoutes {
    pins: PathBuf,
    routes: HashMap<MapData, RouteKey, u32>,
    ports: PortTable,
    locals: HashMap<MapData, [u8; 16], u32>,
    connects: HashMap<MapData, ClassKey, ConnRoute>,
    names: HashMap<MapData, ClassKey, u32>,
    routed: HashMap<MapData, u64, u32>,
    state: aya::maps::Array<MapData, u32>,
}

impl UdpRoutes {
    /// Opens the maps pinned in `pins`, or, when there are none, loads the
    /// programs, attaches them to the cgroup `cgroup` (all its descendants
    /// run them) and pins links and maps in `pins`. `aid_level` is the
    /// depth of an AID's directory below the cgroup2 root.
    pub fn attach(pins: &Path, cgroup: &Path, aid_level: u32) -> Result<UdpRoutes, BpfError> {
        if Self::is_current(pins) {
            return Self::open(pins);
        }
        // A set a crash left half-pinned, or an older build's, is removed,
        // its links with it.
        detach(pins)?;
        // bpffs refuses names with a dot.
        let mut staging = pins.as_os_str().to_owned();
        staging.push("-staging");
        let staging = PathBuf::from(staging);
        detach(&staging)?;
        if let Some(parent) = staging.parent() {
            std::fs::create_dir_all(parent).map_err(io_at(parent))?;
        }
        std::fs::create_dir(&staging).map_err(io_at(&staging))?;
        let mut ebpf = EbpfLoader::new()
            .override_global("aid_level", &aid_level, true)
            .load(OBJECT)
            .map_err(BpfError::Load)?;
        let cgroup_fd = File::open(cgroup).map_err(io_at(cgroup))?;
        for name in all_programs() {
            let program: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .ok_or(BpfError::Missing(name))?
                .try_into()
                .map_err(|source| BpfError::Program { name, source })?;
            let program_err = |source| BpfError::Program { name, source };
            program.load().map_err(program_err)?;
            let path = program_pin(&staging, name);
            program
                .pin(&path)
                .map_err(|source| BpfError::Pin { path, source })?;
            if CALL_PROGRAMS.contains(&name) {
                link(program, name, &cgroup_fd, &staging.join(name))?;
            }
        }
        for name in MAPS {
            let map = ebpf.map(name).ok_or(BpfError::Missing(name))?;
            let path = staging.join(name);
            map.pin(&path)
                .map_err(|source| BpfError::Pin { path, source })?;
        }
        // The pins keep links and maps; the loader's handles go with it.
        drop(ebpf);
        std::fs::rename(&staging, pins).map_err(io_at(pins))?;
        Self::open(pins)
    }

    /// Opens the maps pinned in `pins`.
    pub fn open(pins: &Path) -> Result<UdpRoutes, BpfError> {
        fn pinned<K: aya::Pod, V: aya::Pod>(
            pins: &Path,
            name: &'static str,
        ) -> Result<HashMap<MapData, K, V>, BpfError> {
            let err = |source| BpfError::Map { name, source };
            let data = MapData::from_pin(pins.join(name)).map_err(err)?;
            HashMap::try_from(Map::HashMap(data)).map_err(err)
        }
        let err = |source| BpfError::Map {
            name: "state",
            source,
        };
        let state = MapData::from_pin(pins.join("state")).map_err(err)?;
        Ok(UdpRoutes {
            pins: pins.to_owned(),
            routes: pinned(pins, "routes")?,
            ports: PortTable::open(pins)?,
            locals: pinned(pins, "locals")?,
            connects: pinned(pins, "connects")?,
            names: pinned(pins, "names")?,
            routed: pinned(pins, "routed")?,
            state: aya::maps::Array::try_from(Map::Array(state)).map_err(err)?,
        })
    }

    /// Whether the pins at `pins` hold the programs of this build: a set
    /// an older build pinned lacks some, and is replaced.
    pub fn is_current(pins: &Path) -> bool {
        CALL_PROGRAMS
            .iter()
            .chain(MAPS.iter())
            .all(|name| pins.join(name).exists())
            && all_programs().all(|name| program_pin(pins, name).exists())
    }

    /// Makes the maps hold `entries` ([`UdpRoutes::sync`]) and links the
    /// datagram programs to `cgroup` while they have routes to follow:
    /// linked after the routes are in, unlinked before they go.
    pub fn sync_linked(&mut self, entries: &Entries, cgroup: &Path) -> Result<(), BpfError> {
        let datagrams = !entries.routes.is_empty();
        if !datagrams {
            self.link_datagrams(cgroup, false)?;
        }
        self.sync(entries)?;
        if datagrams {
            self.link_datagrams(cgroup, true)?;
        }
        Ok(())
    }

    fn link_datagrams(&self, cgroup: &Path, on: bool) -> Result<(), BpfError> {
        for (name, attach_type) in DATAGRAM_PROGRAMS {
            let path = self.pins.join(name);
            match (on, path.exists()) {
                (true, false) => {
                    let mut program =
                        CgroupSockAddr::from_pin(program_pin(&self.pins, name), attach_type)
                            .map_err(|source| BpfError::Program { name, source })?;
                    let cgroup_fd = File::open(cgroup).map_err(io_at(cgroup))?;
                    link(&mut program, name, &cgroup_fd, &path)?;
                }
                // The pin held the link's last reference: the program is
                // unlinked as it goes.
                (false, true) => std::fs::remove_file(&path).map_err(io_at(&path))?,
                _ => {}
            }
        }
        Ok(())
    }

    /// The instance cgroups whose calls the kernel routes.
    pub fn routed(&self) -> Result<Vec<u64>, BpfError> {
        self.routed
            .keys()
            .collect::<Result<_, _>>()
            .map_err(|source| BpfError::Map {
                name: "routed",
                source,
            })
    }

    /// Whether any instance cgroup is listed as routed, without listing
    /// them all.
    pub fn any_routed(&self) -> Result<bool, BpfError> {
        match self.routed.keys().next() {
            None => Ok(false),
            Some(Ok(_)) => Ok(true),
            Some(Err(source)) => Err(BpfError::Map {
                name: "routed",
                source,
            }),
        }
    }

    /// Sets (`Some`) or removes (`None`) connect and name entries: what a
    /// change of the registry alters, given without the maps being read.
    pub fn change(
        &mut self,
        connects: &[(ClassKey, Option<ConnRoute>)],
        names: &[(ClassKey, Option<u32>)],
    ) -> Result<(), BpfError> {
        change_map(&mut self.connects, "connects", connects)?;
        change_map(&mut self.names, "names", names)
    }

    /// Lets the kernel route the calls of the instance cgroup `id`, or
    /// stops it.
    pub fn set_routed(&mut self, id: u64, routed: bool) -> Result<(), BpfError> {
        let err = |source| BpfError::Map {
            name: "routed",
            source,
        };
        if routed {
            self.routed.insert(id, 1, 0).map_err(err)
        } else {
            match self.routed.remove(&id) {
                Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
                Err(e) => Err(err(e)),
            }
        }
    }

    /// Makes the maps hold `entries` exactly: stale keys removed, the rest
    /// written (a datagram sent meanwhile sees the old route or the new
    /// one, never none for a key in both). The ports array takes the new
    /// ports' marks before the routes change and loses the old ones' only
    /// after, so no route is hidden behind an unmarked port meanwhile.
    fn sync(&mut self, entries: &Entries) -> Result<(), BpfError> {
        let ports = entries.ports();
        for (i, want) in ports.iter().enumerate() {
            let have = self.ports.get(i);
            let both = Port {
                virtual_port: if want.virtual_port != 0 {
                    want.virtual_port
                } else {
                    have.virtual_port
                },
                routed: want.routed | have.routed,
            };
            if both != have {
                self.ports.set(i, both);
            }
        }
        sync_map(&mut self.routes, "routes", &entries.routes)?;
        for (i, want) in ports.iter().enumerate() {
            if self.ports.get(i) != *want {
                self.ports.set(i, *want);
            }
        }
        let locals: BTreeMap<[u8; 16], u32> = entries.locals.iter().map(|a| (*a, 1)).collect();
        sync_map(&mut self.locals, "locals", &locals)?;
        sync_map(&mut self.connects, "connects", &entries.connects)?;
        sync_map(&mut self.names, "names", &entries.names)?;
        self.state
            .set(0, u32::from(entries.damaged), 0)
            .map_err(|source| BpfError::Map {
                name: "state",
                source,
            })
    }
}

/// The pinned `ports` array mapped into this process, where the kernel's
/// programs read it: the supervisor writes 65,536 entries without a
/// syscall each.
struct PortTable {
    words: NonNull<AtomicU32>,
}

impl PortTable {
    const WORDS: usize = PORTS * 2;
    const LEN: usize = Self::WORDS * std::mem::size_of::<u32>();

    fn open(pins: &Path) -> Result<PortTable, BpfError> {
        let data = MapData::from_pin(pins.join("ports")).map_err(|source| BpfError::Map {
            name: "ports",
            source,
        })?;
        // SAFETY: a shared mapping of a map fd we hold, at offset 0 and of
        // the array's size (the kernel refuses a larger one); nothing else
        // in this process aliases it. It outlives the fd, which may close.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                Self::LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                data.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(BpfError::MapPorts(io::Error::last_os_error()));
        }
        let words = NonNull::new(addr.cast::<AtomicU32>())
            .ok_or_else(|| BpfError::MapPorts(io::ErrorKind::InvalidData.into()))?;
        Ok(PortTable { words })
    }

    fn words(&self) -> &[AtomicU32] {
        // SAFETY: the mapping holds WORDS aligned u32s for as long as self
        // lives; the kernel's programs read them concurrently, which
        // atomics (plain aligned loads and stores on x86_64) allow.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr(), Self::WORDS) }
    }

    fn get(&self, port: usize) -> Port {
        let w = &self.words()[port * 2..][..2];
        Port {
            virtual_port: w[0].load(Ordering::Relaxed),
            routed: w[1].load(Ordering::Relaxed),
        }
    }

    fn set(&self, port: usize, value: Port) {
        let w = &self.words()[port * 2..][..2];
        w[0].store(value.virtual_port, Ordering::Relaxed);
        w[1].store(value.routed, Ordering::Relaxed);
    }
}

impl Drop for PortTable {
    fn drop(&mut self) {
        // SAFETY: the mapping open made, of that length; no reference into
        // it outlives self.
        unsafe { libc::munmap(self.words.as_ptr().cast(), Self::LEN) };
    }
}

// SAFETY: the mapping is owned by the table alone and only reached through
// atomics, from any thread.
unsafe impl Send for PortTable {}

fn sync_map<K: aya::Pod + Ord, V: aya::Pod + PartialEq>(
    map: &mut HashMap<MapData, K, V>,
    name: &'static str,
    want: &BTreeMap<K, V>,
) -> Result<(), BpfError> {
    let err = |source| BpfError::Map { name, source };
    let have: Vec<K> = map.keys().collect::<Result<_, _>>().map_err(err)?;
    for key in have.iter().filter(|k| !want.contains_key(k)) {
        match map.remove(key) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(err(e)),
        }
    }
    for (key, value) in want {
        if map.get(key, 0).ok().as_ref() != Some(value) {
            map.insert(key, value, 0).map_err(err)?;
        }
    }
    Ok(())
}

/// Links `program` to the cgroup `cgroup_fd` and pins the link at `path`.
fn link(
    program: &mut CgroupSockAddr,
    name: &'static str,
    cgroup_fd: &File,
    path: &Path,
) -> Result<(), BpfError> {
    let program_err = |source| BpfError::Program { name, source };
    // A BPF link takes no flags (the kernel refuses any): links to one
    // cgroup always run side by side, whoever else attaches.
    let id = program
        .attach(cgroup_fd, CgroupAttachMode::Single)
        .map_err(program_err)?;
    let link: FdLink = program
        .take_link(id)
        .map_err(program_err)?
        .try_into()
        .map_err(|source| BpfError::Link { name, source })?;
    link.pin(path).map_err(|source| BpfError::Pin {
        path: path.to_owned(),
        source,
    })?;
    Ok(())
}

fn change_map<K: aya::Pod, V: aya::Pod>(
    map: &mut HashMap<MapData, K, V>,
    name: &'static str,
    changes: &[(K, Option<V>)],
) -> Result<(), BpfError> {
    let err = |source| BpfError::Map { name, source };
    for (key, value) in changes {
        match value {
            Some(v) => map.insert(key, v, 0).map_err(err)?,
            None => match map.remove(key) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(err(e)),
            },
        }
    }
    Ok(())
}

/// Removes the pins in `pins` and the directory: the programs detach when
/// their last link goes.
pub fn detach(pins: &Path) -> Result<(), BpfError> {
    let entries = match std::fs::read_dir(pins) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_at(pins)(e)),
    };
    for entry in entries {
        let path = entry.map_err(io_at(pins))?.path();
        std::fs::remove_file(&path).map_err(io_at(&path))?;
    }
    std::fs::remove_dir(pins).map_err(io_at(pins))
}

/// The pin directories below `dir` whose names start with `prefix`.
pub fn pin_dirs(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().as_bytes().starts_with(prefix.as_bytes()))
        .map(|e| e.path())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_mark_virtual_ports_of_routes_and_name_real_ports() {
        let v4_any = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0, 0, 0, 0];
        let v4_own = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 2];
        let key = |aid: u64, addr: [u8; 16], port: u32| RouteKey {
            aid,
            addr,
            port,
            pad: 0,
        };
        let entries = Entries {
            routes: BTreeMap::from([
                (key(7, v4_any, 5353), 20001),
                (key(8, [0; 16], 5353), 20002),
                (key(7, v4_own, 53), 20003),
                (key(7, v4_own, 54), 20004),
                (key(8, v4_any, 54), 20005),
            ]),
            reverse: BTreeMap::from([(20001, 5353), (20002, 5353)]),
            ..Entries::default()
        };
        let ports = entries.ports();
        assert_eq!(ports.len(), PORTS);
        let routed = |routed| Port {
            virtual_port: 0,
            routed,
        };
        assert_eq!(ports[5353], routed(ROUTED_WILDCARD));
        assert_eq!(ports[53], routed(ROUTED_EXACT));
        assert_eq!(ports[54], routed(ROUTED_EXACT | ROUTED_WILDCARD));
        for real in [20001, 20002] {
            assert_eq!(
                ports[real],
                Port {
                    virtual_port: 5353,
                    routed: 0
                }
            );
        }
        let marked = ports.iter().filter(|p| **p != Port::default()).count();
        assert_eq!(marked, 5);
        assert!(Entries::default()
            .ports()
            .iter()
            .all(|p| *p == Port::default()));
    }
}
