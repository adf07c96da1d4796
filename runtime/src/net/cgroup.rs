//! A cgroup v2 directory per instance, under one directory per AID of its
//! registry: `CGROUP2/appshot/TAG/AID/INSTANCE` (TAG tells registries on
//! one host apart, as in the nftables chain names). Nothing is limited there (no controller
//! is enabled); the cgroup is how the kernel knows, for each socket, which
//! AID created it: a socket belongs to the cgroup of the task that made it,
//! and nftables matches that (`socket cgroupv2 level 3`), so datagrams are
//! routed by AID in the kernel without asking the supervisor (`udproutes`).
//!
//! The instance's init moves itself in before it starts anything, so every
//! process and socket of the instance is in it; the supervisor stays out.
//! AID directories stay when their last instance goes: nftables resolves a
//! path to the directory's id when a rule is loaded, and rules of other
//! instances may name it.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use tracing::warn;

/// The directory below the cgroup2 root that holds appshot's cgroups.
const TOP: &str = "appshot";
/// Where nftables looks up `socket cgroupv2` paths.
const NFT_BASE: &str = "/sys/fs/cgroup";

/// Where cgroup2 is mounted, if it is, below `/sys/fs/cgroup` (pure v2, or
/// `/sys/fs/cgroup/unified` on hybrid hosts), since nftables names cgroups
/// relative to that.
pub fn root() -> Option<&'static Path> {
    static ROOT: OnceLock<Option<PathBuf>> = OnceLock::new();
    ROOT.get_or_init(|| {
        let mounts = procfs::process::Process::myself().ok()?.mountinfo().ok()?;
        mounts
            .into_iter()
            .filter(|m| m.fs_type == "cgroup2" && m.mount_point.starts_with(NFT_BASE))
            .map(|m| m.mount_point)
            .min_by_key(|p| p.components().count())
    })
    .as_deref()
}

/// The depth of a registry's directory below the cgroup2 root.
pub const SCOPE_LEVEL: u8 = 2;
/// The depth of an AID's directory below the cgroup2 root.
pub const AID_LEVEL: u8 = 3;

/// The directory of the registry tagged `tag`.
pub fn scope_dir(root: &Path, tag: &str) -> PathBuf {
    root.join(TOP).join(tag)
}

/// The AID's directory.
pub fn aid_dir(root: &Path, tag: &str, aid: &str) -> PathBuf {
    scope_dir(root, tag).join(aid)
}

/// The AID's directory as nftables names it (`socket cgroupv2 level 3`).
pub fn nft_path(root: &Path, tag: &str, aid: &str) -> String {
    nft_relative(&aid_dir(root, tag, aid))
}

/// The registry's directory as nftables names it (`socket cgroupv2 level 2`).
pub fn nft_scope(root: &Path, tag: &str) -> String {
    nft_relative(&scope_dir(root, tag))
}

fn nft_relative(dir: &Path) -> String {
    dir.strip_prefix(NFT_BASE)
        .unwrap_or(dir)
        .to_string_lossy()
        .into_owned()
}

/// Creates the AID's directory (and those above) if missing.
pub fn ensure_aid_dir(root: &Path, tag: &str, aid: &str) -> std::io::Result<PathBuf> {
    let dir = aid_dir(root, tag, aid);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// An instance's cgroup, removed when dropped (once its processes are
/// gone; the kernel refuses to remove a cgroup that still has some).
#[derive(Debug)]
pub struct InstanceCgroup {
    dir: PathBuf,
}

impl InstanceCgroup {
    /// Creates `CGROUP2/appshot/TAG/AID/NAME`, or takes the empty one a
    /// dead predecessor of the same name left.
    pub fn create(
        root: &Path,
        tag: &str,
        aid: &str,
        name: &str,
    ) -> std::io::Result<InstanceCgroup> {
        let dir = ensure_aid_dir(root, tag, aid)?.join(name);
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        Ok(InstanceCgroup { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for InstanceCgroup {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir(&self.dir) {
            warn!(cgroup = %self.dir.display(), "removing the instance's cgroup: {e}");
        }
    }
}

/// Moves process `pid` into the cgroup `dir`.
pub fn place(dir: &Path, pid: u32) -> std::io::Result<()> {
    std::fs::write(dir.join("cgroup.procs"), pid.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nft_names_are_relative_to_sys_fs_cgroup() {
        let hybrid = Path::new("/sys/fs/cgroup/unified");
        assert_eq!(nft_path(hybrid, "1a2b", "web"), "unified/appshot/1a2b/web");
        assert_eq!(nft_scope(hybrid, "1a2b"), "unified/appshot/1a2b");
        let pure = Path::new("/sys/fs/cgroup");
        assert_eq!(nft_path(pure, "1a2b", "web"), "appshot/1a2b/web");
    }
}
