//! The image file: a 4 KiB header, the pages section (page-aligned, so it
//! can be mapped directly), then the postcard manifest.
//!
//! ```text
//! 0      header: magic, version, section offsets/lengths, CRC32s, header CRC
//! 4096   pages   (pages_len bytes)
//! ...    manifest (postcard)
//! ```
//! Every section is checked before restore touches any process. Images are
//! written to a temporary file (mode 0600: they hold process memory) and
//! renamed into place, so an interrupted snapshot leaves the previous image
//! intact.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use appshot_sys::fd::OpenRegularError;
use tracing::debug;

use crate::error::SnapshotError;
use crate::image::model::{Manifest, ParentRef, ProcessImage};

pub const MAGIC: [u8; 8] = *b"APPSHOT\0";
/// 2: unconnected TCP sockets (bound, not only listening), templates, the
/// main stack as its own kind of mapping. 3: credentials of every thread,
/// System V IPC objects. 4: timerfd, signalfd and inotify fds, interval and
/// POSIX timers. 5: Unix sockets and fds sharing one open file description.
/// 6: every process of the tree, shared anonymous memory, fds and pages
/// inherited across fork; memfds. 7: established TCP connections, the
/// real port of TCP sockets, UDP sockets. 8: the writer (appshot version
/// and commit) in the manifest. 9: half-closed TCP connections with their
/// queues (an older image holds them without), Unix sockets saved closed.
/// 10: incremental images: an id, the parent, the layer of each page run.
pub const VERSION: u32 = 10;
pub const PAGE: u64 = 4096;
const HEADER_LEN: usize = 64;
/// A manifest larger than this is not one appshot wrote.
const MANIFEST_MAX: u64 = 256 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Header {
    version: u32,
    pages_off: u64,
    pages_len: u64,
    pages_crc: u32,
    manifest_off: u64,
    manifest_len: u64,
    manifest_crc: u32,
}

impl Header {
    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&self.version.to_le_bytes());
        b[12..20].copy_from_slice(&self.pages_off.to_le_bytes());
        b[20..28].copy_from_slice(&self.pages_len.to_le_bytes());
        b[28..32].copy_from_slice(&self.pages_crc.to_le_bytes());
        b[32..40].copy_from_slice(&self.manifest_off.to_le_bytes());
        b[40..48].copy_from_slice(&self.manifest_len.to_le_bytes());
        b[48..52].copy_from_slice(&self.manifest_crc.to_le_bytes());
        let crc = crc32fast::hash(&b[..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        b
    }

    fn decode(path: &Path, b: &[u8; HEADER_LEN]) -> Result<Header, SnapshotError> {
        let corrupt = |why: &str| SnapshotError::corrupt(path, why);
        if b[0..8] != MAGIC {
            return Err(corrupt("not an appshot image (bad magic)"));
        }
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        let version = u32_at(8);
        if version != VERSION {
            return Err(SnapshotError::Version {
                path: path.to_path_buf(),
                found: version,
                supported: VERSION,
            });
        }
        if crc32fast::hash(&b[..60]) != u32_at(60) {
            return Err(corrupt("header checksum mismatch"));
        }
        Ok(Header {
            version,
            pages_off: u64_at(12),
            pages_len: u64_at(20),
            pages_crc: u32_at(28),
            manifest_off: u64_at(32),
            manifest_len: u64_at(40),
            manifest_crc: u32_at(48),
        })
    }
}

/// When a written image counts as in place.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Durability {
    /// Complete in the page cache and renamed over the old image, as `criu
    /// dump` leaves its images: the kernel writes it back. A process killed
    /// meanwhile changes nothing; a machine that crashes before the
    /// writeback may leave a torn image, which a restore refuses by its
    /// checksums.
    #[default]
    PageCache,
    /// On disk (fsync) before it is renamed into place; the disk is asked
    /// to write as the pages come, so the fsync waits for the last of them
    /// only.
    Disk,
}

/// Writes an image: pages are streamed in with [`ImageWriter::write_pages`]
/// (each call page-aligned), then [`ImageWriter::finish`] adds the manifest
/// and moves the file into place.
pub struct ImageWriter {
    path: PathBuf,
    tmp: PathBuf,
    out: BufWriter<File>,
    durability: Durability,
    pages_len: u64,
    /// How much of the pages section the disk was asked to write so far.
    written_back: u64,
    crc: crc32fast::Hasher,
}

/// How much page data goes to the page cache before its writeback is
/// started: the disk writes while the next pages are read, so the fsync
/// that makes the image durable waits for the last step only, not for the
/// whole image after it was copied.
const WRITEBACK_STEP: u64 = 16 << 20;

impl ImageWriter {
    pub fn create(path: &Path, durability: Durability) -> Result<ImageWriter, SnapshotError> {
        let io = |e| SnapshotError::io(path, e);
        let prefix = temporary_prefix(path)?;
        remove_orphaned_temporaries(path, &prefix);
        let tmp = temporary_path(path)?;
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| SnapshotError::io(&tmp, e))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        out.write_all(&[0u8; PAGE as usize]).map_err(io)?;
        Ok(ImageWriter {
            path: path.to_path_buf(),
            tmp,
            out,
            durability,
            pages_len: 0,
            written_back: 0,
            crc: crc32fast::Hasher::new(),
        })
    }

    /// How much page data was appended so far: the offset the next
    /// [`write_pages`](Self::write_pages) returns.
    pub fn pages_len(&self) -> u64 {
        self.pages_len
    }

    /// Appends page data; returns its offset within the pages section.
    pub fn write_pages(&mut self, data: &[u8]) -> Result<u64, SnapshotError> {
        let mut sum = crc32fast::Hasher::new();
        sum.update(data);
        self.write_summed_pages(data, &sum)
    }

    /// [`ImageWriter::write_pages`] with the checksum of `data` computed by
    /// the caller: a dump sums each buffer on the thread that read it, so
    /// that the writing thread only writes.
    pub fn write_summed_pages(
        &mut self,
        data: &[u8],
        sum: &crc32fast::Hasher,
    ) -> Result<u64, SnapshotError> {
        debug_assert_eq!(data.len() as u64 % PAGE, 0);
        let off = self.pages_len;
        self.out
            .write_all(data)
            .map_err(|e| SnapshotError::io(&self.tmp, e))?;
        self.crc.combine(sum);
        self.pages_len += data.len() as u64;
        if self.durability == Durability::Disk
            && self.pages_len - self.written_back >= WRITEBACK_STEP
        {
            self.start_writeback()?;
        }
        Ok(off)
    }

    fn start_writeback(&mut self) -> Result<(), SnapshotError> {
        self.out
            .flush()
            .map_err(|e| SnapshotError::io(&self.tmp, e))?;
        let (from, len) = (PAGE + self.written_back, self.pages_len - self.written_back);
        // Only sooner durability is lost if the kernel will not: the
        // fsync in `finish` writes it all anyway and reports what fails.
        if let Err(e) = appshot_sys::fd::start_writeback(self.out.get_ref(), from, len) {
            debug!(path = %self.tmp.display(), error = %e, "no early writeback");
        }
        self.written_back = self.pages_len;
        Ok(())
    }

    pub fn finish(mut self, manifest: &Manifest) -> Result<u64, SnapshotError> {
        let tmp = self.tmp.clone();
        let result = (|| {
            let io = |e| SnapshotError::io(&tmp, e);
            let encoded =
                postcard::to_stdvec(manifest).map_err(|e| SnapshotError::Encode(e.to_string()))?;
            self.out.write_all(&encoded).map_err(io)?;
            let header = Header {
                version: VERSION,
                pages_off: PAGE,
                pages_len: self.pages_len,
                pages_crc: self.crc.clone().finalize(),
                manifest_off: PAGE + self.pages_len,
                manifest_len: encoded.len() as u64,
                manifest_crc: crc32fast::hash(&encoded),
            };
            let file = self.out.into_inner().map_err(|e| io(e.into_error()))?;
            file.write_all_at(&header.encode(), 0).map_err(io)?;
            if self.durability == Durability::Disk {
                file.sync_all().map_err(io)?;
            }
            std::fs::rename(&tmp, &self.path).map_err(|e| SnapshotError::io(&self.path, e))?;
            Ok(PAGE + self.pages_len + encoded.len() as u64)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }

    /// Removes the partial file (a failed dump leaves nothing behind).
    pub fn abandon(self) {
        drop(self.out);
        let _ = std::fs::remove_file(&self.tmp);
    }
}

fn temporary_prefix(path: &Path) -> Result<String, SnapshotError> {
    let name = path
        .file_name()
        .ok_or_else(|| SnapshotError::io(path, std::io::ErrorKind::InvalidInput.into()))?;
    Ok(format!(".{}.tmp.", name.to_string_lossy()))
}

/// The temporary file this process writes an image for `path` into
/// before renaming it there: `.NAME.tmp.PID` beside it.
pub fn temporary_path(path: &Path) -> Result<PathBuf, SnapshotError> {
    let prefix = temporary_prefix(path)?;
    Ok(path.with_file_name(format!("{prefix}{}", std::process::id())))
}

/// Whether `file_name` is one [`temporary_path`] gives a writer with
/// process id `pid`.
pub fn is_temporary_name(file_name: &str, pid: u32) -> bool {
    file_name
        .strip_prefix('.')
        .and_then(|n| n.strip_suffix(&format!(".tmp.{pid}")))
        .is_some_and(|image| !image.is_empty())
}

/// Removes temporaries of earlier snapshots to `path` whose writer died
/// (a snapshot killed with SIGKILL cannot clean up after itself); the
/// image itself was never touched by them.
fn remove_orphaned_temporaries(path: &Path, prefix: &str) {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(prefix))
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        let dead = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None)
            == Err(nix::errno::Errno::ESRCH);
        if dead {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Opens an image file for [`Image::from_file`]. A FIFO, directory or
/// device is refused at once: reading one would block or make no sense.
pub fn open_file(path: &Path) -> Result<File, SnapshotError> {
    appshot_sys::fd::open_regular(path).map_err(|e| match e {
        OpenRegularError::Io(e) => SnapshotError::io(path, e),
        OpenRegularError::NotRegular(what) => SnapshotError::NotRegularFile {
            path: path.to_path_buf(),
            what,
        },
    })
}

/// Images a chain may hold, the head included: a longer one is refused
/// (and `appshot merge` flattens it).
pub const MAX_CHAIN: usize = 64;

/// A checked image: header, manifest and pages section all verified, and
/// so is every image up its chain of parents.
pub struct Image {
    pub path: PathBuf,
    pub manifest: Manifest,
    pub file: File,
    /// Offset of the pages section in `file`.
    pub pages_off: u64,
    pub pages_len: u64,
    pub size: u64,
    pub pages_crc: u32,
    pub manifest_crc: u32,
    /// The parents an incremental image refers to pages in, nearest first
    /// (layer 1, 2, ...): empty for a whole image.
    pub ancestors: Vec<Image>,
}

impl Image {
    /// Opens and verifies an image and its chain of parents. Nothing is
    /// trusted until every checksum and every offset has been checked
    /// against the files' real lengths.
    pub fn open(path: &Path) -> Result<Image, SnapshotError> {
        Image::from_file(path, open_file(path)?, true)
    }

    /// Like [`Image::open`] but without reading the pages sections to
    /// check their CRCs (headers, manifests and layouts are still checked,
    /// up the whole chain), for a caller that checks them otherwise:
    /// clones of a template whose pages one `appshot clone` already
    /// verified (a clone's cost does not grow with the template's size); a
    /// lazy restore, whose page server checks each section as it reads it
    /// through in the background and kills the instance on a mismatch
    /// ([`crate::lazy`]); an eager restore, which checks them while it
    /// rebuilds the processes, before any is released
    /// ([`crate::restore::RestoreHooks::check_pages`]).
    pub fn open_pages_unchecked(path: &Path) -> Result<Image, SnapshotError> {
        Image::from_file(path, open_file(path)?, false)
    }

    /// Verifies the image `file`, opened from `path` with [`open_file`],
    /// and its parents; with `verify_pages` false, as
    /// [`Image::open_pages_unchecked`].
    pub fn from_file(path: &Path, file: File, verify_pages: bool) -> Result<Image, SnapshotError> {
        let mut image = Image::load(path, file, verify_pages)?;
        let mut next = image
            .manifest
            .parent
            .clone()
            .map(|r| (image.path.clone(), r));
        while let Some((child, r)) = next {
            if image.ancestors.len() + 1 >= MAX_CHAIN {
                return Err(SnapshotError::ChainTooLong {
                    image: path.to_path_buf(),
                    max: MAX_CHAIN,
                });
            }
            let parent = parent_path(&child, &r.path);
            let unusable = |e| SnapshotError::ParentUnusable {
                image: child.clone(),
                parent: parent.clone(),
                source: Box::new(e),
            };
            let p = open_file(&parent)
                .and_then(|f| Image::load(&parent, f, verify_pages))
                .map_err(unusable)?;
            if (p.manifest.id, p.pages_crc, p.manifest_crc) != (r.id, r.pages_crc, r.manifest_crc) {
                return Err(SnapshotError::ParentReplaced {
                    image: child,
                    parent,
                });
            }
            next = p.manifest.parent.clone().map(|r| (parent.clone(), r));
            image.ancestors.push(p);
        }
        // Runs are checked against the layers they name, each image's
        // layers counted from itself.
        let lens: Vec<u64> = std::iter::once(image.pages_len)
            .chain(image.ancestors.iter().map(|a| a.pages_len))
            .collect();
        check_manifest(&image.manifest, &lens).map_err(|why| SnapshotError::corrupt(path, &why))?;
        for (i, a) in image.ancestors.iter().enumerate() {
            check_manifest(&a.manifest, &lens[i + 1..]).map_err(|why| {
                SnapshotError::ParentUnusable {
                    image: path.to_path_buf(),
                    parent: a.path.clone(),
                    source: Box::new(SnapshotError::corrupt(&a.path, &why)),
                }
            })?;
        }
        Ok(image)
    }

    /// One image file, checked on its own: its parents are not opened and
    /// its manifest is not yet checked against them.
    fn load(path: &Path, mut file: File, verify_pages: bool) -> Result<Image, SnapshotError> {
        let io = |e| SnapshotError::io(path, e);
        let corrupt = |why: String| SnapshotError::corrupt(path, &why);
        let size = file.metadata().map_err(io)?.len();
        let mut hb = [0u8; HEADER_LEN];
        // The magic first: a small file that is no image at all must be
        // called that, not a truncated image.
        let n = file.read(&mut hb).map_err(io)?;
        if n < MAGIC.len() || hb[..MAGIC.len()] != MAGIC {
            return Err(corrupt("not an appshot image (bad magic)".into()));
        }
        if size < PAGE {
            return Err(corrupt(format!(
                "truncated: {size} bytes, shorter than the header"
            )));
        }
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        file.read_exact(&mut hb).map_err(io)?;
        let h = Header::decode(path, &hb)?;
        if h.pages_off != PAGE || h.pages_len % PAGE != 0 || h.manifest_len > MANIFEST_MAX {
            return Err(corrupt("header describes an impossible layout".into()));
        }
        let end = h
            .manifest_off
            .checked_add(h.manifest_len)
            .filter(|&e| h.manifest_off == h.pages_off + h.pages_len && e == size)
            .ok_or_else(|| {
                corrupt(format!(
                    "truncated or extended: header says {} bytes, file has {size}",
                    h.manifest_off.saturating_add(h.manifest_len)
                ))
            })?;
        debug_assert_eq!(end, size);

        let mut manifest_bytes = vec![0u8; h.manifest_len as usize];
        file.seek(SeekFrom::Start(h.manifest_off)).map_err(io)?;
        file.read_exact(&mut manifest_bytes).map_err(io)?;
        if crc32fast::hash(&manifest_bytes) != h.manifest_crc {
            return Err(corrupt("manifest checksum mismatch".into()));
        }
        let manifest: Manifest = postcard::from_bytes(&manifest_bytes)
            .map_err(|e| corrupt(format!("manifest does not decode: {e}")))?;

        let image = Image {
            path: path.to_path_buf(),
            manifest,
            file,
            pages_off: h.pages_off,
            pages_len: h.pages_len,
            size,
            pages_crc: h.pages_crc,
            manifest_crc: h.manifest_crc,
            ancestors: Vec::new(),
        };
        if verify_pages {
            image.check_own_pages()?;
        }
        Ok(image)
    }

    /// Checks this image's pages section (not its parents') against its
    /// CRC.
    fn check_own_pages(&self) -> Result<(), SnapshotError> {
        let mut crc = crc32fast::Hasher::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut at = 0;
        while at < self.pages_len {
            let n = (self.pages_len - at).min(buf.len() as u64) as usize;
            self.read_pages(at, &mut buf[..n])?;
            crc.update(&buf[..n]);
            at += n as u64;
        }
        if crc.finalize() != self.pages_crc {
            return Err(SnapshotError::corrupt(
                &self.path,
                "pages checksum mismatch",
            ));
        }
        Ok(())
    }

    /// Checks the pages sections of the image and of its whole chain
    /// against their CRCs: what [`Image::open`] does before it returns.
    pub fn verify_pages(&self) -> Result<(), SnapshotError> {
        self.check_own_pages()?;
        for a in &self.ancestors {
            a.check_own_pages()
                .map_err(|e| SnapshotError::ParentUnusable {
                    image: self.path.clone(),
                    parent: a.path.clone(),
                    source: Box::new(e),
                })?;
        }
        Ok(())
    }

    /// Image `layer` of the chain (0: this one). The layers of a checked
    /// image's runs all exist.
    pub fn layer(&self, layer: u32) -> &Image {
        match layer {
            0 => self,
            n => &self.ancestors[n as usize - 1],
        }
    }

    /// Reads `len` bytes of page data at `offset` of the pages section.
    pub fn read_pages(&self, offset: u64, buf: &mut [u8]) -> Result<(), SnapshotError> {
        self.file
            .read_exact_at(buf, self.pages_off + offset)
            .map_err(|e| SnapshotError::io(&self.path, e))
    }

    /// How a child taken on this image, to be written at `child`, names
    /// it: by a path relative to the child's directory when they share
    /// one.
    pub fn as_parent_of(&self, child: &Path) -> ParentRef {
        let path = match (self.path.parent(), child.parent(), self.path.file_name()) {
            (Some(a), Some(b), Some(name)) if a == b => name.to_string_lossy().into_owned(),
            _ => std::path::absolute(&self.path)
                .unwrap_or_else(|_| self.path.clone())
                .to_string_lossy()
                .into_owned(),
        };
        ParentRef {
            path,
            id: self.manifest.id,
            pages_crc: self.pages_crc,
            manifest_crc: self.manifest_crc,
        }
    }

    /// Writes the state this image holds, its parents' pages included,
    /// as one whole image at `out` (same id: the same state); returns its
    /// size.
    pub fn merge(&self, out: &Path, durability: Durability) -> Result<u64, SnapshotError> {
        const CHUNK: u64 = 1 << 20;
        let mut writer = ImageWriter::create(out, durability)?;
        let result = (|| {
            // The own pages section first, as it is: its runs keep their
            // offsets.
            let mut buf = vec![0u8; CHUNK as usize];
            let mut at = 0;
            while at < self.pages_len {
                let n = (self.pages_len - at).min(CHUNK) as usize;
                self.read_pages(at, &mut buf[..n])?;
                writer.write_pages(&buf[..n])?;
                at += n as u64;
            }
            let mut manifest = self.manifest.clone();
            manifest.parent = None;
            let runs = manifest
                .processes
                .iter_mut()
                .flat_map(|p| &mut p.vmas)
                .flat_map(|v| &mut v.pages)
                .filter(|r| r.layer > 0);
            for run in runs {
                let from = self.layer(run.layer);
                let mut new_offset = None;
                let (mut at, end) = (run.offset, run.offset + run.pages * PAGE);
                while at < end {
                    let n = (end - at).min(CHUNK) as usize;
                    from.read_pages(at, &mut buf[..n])?;
                    let written = writer.write_pages(&buf[..n])?;
                    new_offset.get_or_insert(written);
                    at += n as u64;
                }
                run.offset = new_offset.unwrap_or(0);
                run.layer = 0;
            }
            Ok(manifest)
        })();
        match result {
            Ok(manifest) => writer.finish(&manifest),
            Err(e) => {
                writer.abandon();
                Err(e)
            }
        }
    }
}

/// Where a parent named `rel` by the image at `child` is.
fn parent_path(child: &Path, rel: &str) -> PathBuf {
    let rel = Path::new(rel);
    if rel.is_absolute() {
        return rel.to_path_buf();
    }
    let dir = child.parent().unwrap_or(Path::new("."));
    // Absolute: a restore opens it from inside the restored process.
    std::path::absolute(dir.join(rel)).unwrap_or_else(|_| dir.join(rel))
}

/// Size of a raw siginfo.
const SIGINFO_LEN: usize = 128;
/// Fields of a `user_regs_struct`.
const REGS_LEN: usize = 27;

/// Checks what the CRCs cannot: that a manifest (which may have been
/// tampered with and checksummed again) describes nothing a restore would
/// index out of bounds, overflow on or loop over forever.
/// `lens`: the length of the pages section of each layer, this image's
/// first.
fn check_manifest(manifest: &Manifest, lens: &[u64]) -> Result<(), String> {
    let pages_len = lens[0];
    if manifest.processes.is_empty() {
        return Err("it holds no process".into());
    }
    // A restore builds processes in image order: whatever one takes from
    // another (its parent's fork, a shared fd) must be built before it.
    for (i, p) in manifest.processes.iter().enumerate() {
        let index = |pid: u32| manifest.processes.iter().position(|q| q.ns_pid == pid);
        if index(p.ns_pid) != Some(i) {
            return Err(format!("process {} appears twice", p.ns_pid));
        }
        if index(p.ns_ppid).is_some_and(|j| j >= i) {
            return Err(format!("process {} comes before its parent", p.ns_pid));
        }
        if let Some(f) = p
            .fetched
            .iter()
            .find(|f| index(f.from_pid).is_none_or(|j| j >= i))
        {
            return Err(format!(
                "fd {} of process {} comes from process {}, which is not built before it",
                f.fd, p.ns_pid, f.from_pid
            ));
        }
        check_process(p, lens)?;
    }
    for obj in &manifest.memfds {
        for run in &obj.runs {
            let inside = run.layer == 0
                && run.offset % PAGE == 0
                && run
                    .pages
                    .checked_mul(PAGE)
                    .and_then(|len| run.offset.checked_add(len))
                    .is_some_and(|end| end <= pages_len);
            if !inside {
                return Err(format!(
                    "a run of memfd {} lies outside the pages section",
                    obj.name
                ));
            }
        }
    }
    for seg in &manifest.ipc.shm {
        let inside = seg.offset % PAGE == 0
            && seg
                .offset
                .checked_add(seg.size)
                .is_some_and(|end| end <= pages_len);
        if !inside {
            return Err(format!(
                "System V segment {} ({} bytes at {}) lies outside the pages section",
                seg.perm.id, seg.size, seg.offset
            ));
        }
    }
    Ok(())
}

fn check_process(p: &ProcessImage, lens: &[u64]) -> Result<(), String> {
    use crate::image::model::{FdKind, VmaKind};
    if p.auxv.len() & 1 != 0 {
        return Err(format!("auxv has an odd length ({})", p.auxv.len()));
    }
    for (i, info) in p.shared_pending.iter().enumerate() {
        if info.len() != SIGINFO_LEN {
            return Err(format!(
                "pending signal {i} of the process has {} bytes of siginfo, not {SIGINFO_LEN}",
                info.len()
            ));
        }
    }
    for t in &p.threads {
        if t.regs.len() != REGS_LEN {
            return Err(format!(
                "thread {} has {} registers, not {REGS_LEN}",
                t.ns_tid,
                t.regs.len()
            ));
        }
        if let Some(info) = t.pending.iter().find(|i| i.len() != SIGINFO_LEN) {
            return Err(format!(
                "a pending signal of thread {} has {} bytes of siginfo, not {SIGINFO_LEN}",
                t.ns_tid,
                info.len()
            ));
        }
    }
    for vma in &p.vmas {
        if vma.start >= vma.end || vma.start % PAGE != 0 || vma.end % PAGE != 0 {
            return Err(format!(
                "mapping {:#x}-{:#x} is empty, reversed or not page-aligned",
                vma.start, vma.end
            ));
        }
        for run in &vma.pages {
            let Some(&pages_len) = lens.get(run.layer as usize) else {
                return Err(format!(
                    "page run at {:#x} is in layer {} of a chain of {}",
                    run.addr,
                    run.layer,
                    lens.len()
                ));
            };
            if run.layer > 0
                && (vma.shared
                    || !matches!(
                        vma.kind,
                        VmaKind::Anon
                            | VmaKind::Stack
                            | VmaKind::File { .. }
                            | VmaKind::Memfd { .. }
                    ))
            {
                return Err(format!(
                    "page run at {:#x} of a mapping whose pages are always the image's own is in layer {}",
                    run.addr, run.layer
                ));
            }
            let inside = run.addr % PAGE == 0
                && run.offset % PAGE == 0
                && run.pages.checked_mul(PAGE).is_some_and(|len| {
                    run.addr >= vma.start
                        && run.addr.checked_add(len).is_some_and(|e| e <= vma.end)
                        && run.offset.checked_add(len).is_some_and(|e| e <= pages_len)
                });
            if !inside {
                return Err(format!(
                    "page run at {:#x} lies outside its mapping or the pages section",
                    run.addr
                ));
            }
        }
    }
    for fd in &p.fds {
        if let FdKind::Pipe { capacity, data, .. } | FdKind::Fifo { capacity, data, .. } = &fd.kind
        {
            if data.len() as u64 > *capacity as u64 {
                return Err(format!(
                    "fd {}: {} bytes of pipe data exceed its capacity of {capacity}",
                    fd.fd,
                    data.len()
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::model::*;

    pub(crate) fn sample_manifest(pages: Vec<PageRun>) -> Manifest {
        Manifest {
            ipc: SysvIpc::default(),
            memfds: Vec::new(),
            id: 1,
            parent: None,
            created_unix: 1,
            writer: "appshot test".into(),
            instance: InstanceInfo {
                name: "web-a".into(),
                aid: "a".into(),
                command: vec!["python3".into()],
                multiplexed: vec![9000],
                template: false,
                left_running: false,
            },
            processes: vec![ProcessImage {
                ns_pid: 2,
                ns_ppid: 1,
                ns_pgid: 2,
                ns_sid: 2,
                exe: FileRef {
                    path: "/usr/bin/python3".into(),
                    size: 1,
                    mtime_ns: 2,
                    ino: 3,
                },
                cwd: "/".into(),
                umask: 0o22,
                rlimits: vec![],
                mm: MmFields::default(),
                auxv: vec![],
                vmas: vec![Vma {
                    start: 0x1000,
                    end: 0x4000,
                    prot: 3,
                    shared: false,
                    kind: VmaKind::Anon,
                    pages,
                    inherited: false,
                    cow: vec![],
                }],
                sigactions: vec![],
                shared_pending: vec![],
                threads: vec![],
                fds: vec![],
                inherited: vec![],
                fetched: vec![],
                stashed: vec![],
                itimers: vec![],
                posix_timers: vec![],
                pages_bytes: 0,
            }],
        }
    }

    fn write_sample(path: &Path) -> Manifest {
        let m = sample_manifest(vec![PageRun {
            addr: 0x1000,
            pages: 2,
            offset: 0,
            layer: 0,
        }]);
        let mut w = ImageWriter::create(path, Durability::PageCache).unwrap();
        w.write_pages(&vec![7u8; 2 * PAGE as usize]).unwrap();
        w.finish(&m).unwrap();
        m
    }

    #[test]
    fn pages_summed_by_the_caller_verify_as_pages_summed_here() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let m = sample_manifest(vec![PageRun {
            addr: 0x1000,
            pages: 3,
            offset: 0,
            layer: 0,
        }]);
        let mut w = ImageWriter::create(&path, Durability::PageCache).unwrap();
        w.write_pages(&vec![7u8; PAGE as usize]).unwrap();
        for fill in [8u8, 9] {
            let data = vec![fill; PAGE as usize];
            let mut sum = crc32fast::Hasher::new();
            sum.update(&data);
            w.write_summed_pages(&data, &sum).unwrap();
        }
        w.finish(&m).unwrap();
        Image::open(&path).unwrap().verify_pages().unwrap();
    }

    #[test]
    fn round_trip_and_private_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let m = write_sample(&path);
        let img = Image::open(&path).unwrap();
        assert_eq!(img.manifest, m);
        let mut buf = vec![0u8; PAGE as usize];
        img.read_pages(PAGE, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 7));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temporary left"
        );
    }

    #[test]
    fn a_fifo_is_refused_at_once_as_a_fifo() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::S_IRUSR).unwrap();
        match Image::open(&path) {
            Err(SnapshotError::NotRegularFile { what, .. }) => assert_eq!(what, "a FIFO"),
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("a FIFO accepted as an image"),
        }
    }

    fn expect_corrupt(path: &Path, needle: &str) {
        match Image::open(path) {
            Err(e) => assert!(e.to_string().contains(needle), "{e}"),
            Ok(_) => panic!("corrupt image accepted"),
        }
    }

    #[test]
    fn truncated_flipped_and_foreign_images_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        write_sample(&path);
        let good = std::fs::read(&path).unwrap();

        std::fs::write(&path, &good[..good.len() - 3]).unwrap();
        expect_corrupt(&path, "truncated");
        std::fs::write(&path, &good[..100]).unwrap();
        expect_corrupt(&path, "truncated");
        std::fs::write(&path, b"aid = \"a\"\n").unwrap();
        expect_corrupt(&path, "bad magic");

        let mut flipped = good.clone();
        flipped[PAGE as usize + 10] ^= 0x40;
        std::fs::write(&path, &flipped).unwrap();
        expect_corrupt(&path, "pages checksum");

        let mut flipped = good.clone();
        let last = flipped.len() - 2;
        flipped[last] ^= 1;
        std::fs::write(&path, &flipped).unwrap();
        expect_corrupt(&path, "manifest checksum");

        let mut flipped = good.clone();
        flipped[20] ^= 1;
        std::fs::write(&path, &flipped).unwrap();
        expect_corrupt(&path, "header checksum");

        let mut other = good.clone();
        other[0] = b'X';
        std::fs::write(&path, &other).unwrap();
        expect_corrupt(&path, "bad magic");

        let mut newer = good.clone();
        newer[8..12].copy_from_slice(&(VERSION + 1).to_le_bytes());
        std::fs::write(&path, &newer).unwrap();
        match Image::open(&path) {
            Err(SnapshotError::Version { found, .. }) if found == VERSION + 1 => {}
            other => panic!("expected a version error, got {:?}", other.err()),
        }
    }

    #[test]
    fn temporaries_of_dead_writers_are_swept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        // No process has PID 0x7fffffff (above pid_max).
        let orphan = dir.path().join(".img.tmp.2147483647");
        std::fs::write(&orphan, b"partial").unwrap();
        let live = dir.path().join(format!(".img.tmp.{}", std::process::id()));
        write_sample(&path);
        assert!(!orphan.exists());
        assert!(!live.exists(), "our own temporary is renamed into place");
        std::fs::write(&live, b"in flight").unwrap();
        write_sample(&path.with_file_name("other"));
        assert!(
            live.exists(),
            "a live writer's temporary (another image) is left alone"
        );
    }

    #[test]
    fn temporary_names_are_recognised_for_their_writer_only() {
        let tmp = temporary_path(Path::new("/x/img")).unwrap();
        let name = tmp.file_name().unwrap().to_str().unwrap();
        assert!(is_temporary_name(name, std::process::id()));
        assert!(!is_temporary_name(name, std::process::id() + 1));
        assert!(!is_temporary_name("img", std::process::id()));
        assert!(!is_temporary_name("..tmp.1", 1));
        assert!(!is_temporary_name("img.tmp.1", 1));
    }

    fn thread() -> ThreadImage {
        ThreadImage {
            ns_tid: 2,
            comm: "main".into(),
            regs: vec![0; REGS_LEN],
            xstate: vec![0; 64],
            sigmask: 0,
            pending: vec![vec![0; SIGINFO_LEN]],
            tid_address: 0,
            robust_list: (0, 0),
            altstack: (0, 2, 0),
            rseq: None,
            creds: Default::default(),
        }
    }

    /// Manifests that pass every checksum (the writer computes them) but
    /// describe impossible state are refused as corrupt, without a panic.
    #[test]
    fn tampered_but_checksummed_manifests_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let write = |m: &Manifest| {
            let mut w = ImageWriter::create(&path, Durability::PageCache).unwrap();
            w.write_pages(&vec![7u8; 2 * PAGE as usize]).unwrap();
            w.finish(m).unwrap();
        };
        let run = |addr, pages, offset| PageRun {
            addr,
            pages,
            offset,
            layer: 0,
        };
        let mut good = sample_manifest(vec![run(0x1000, 2, 0)]);
        good.processes[0].threads = vec![thread()];
        good.processes[0].auxv = vec![6, 4096, 0, 0];
        write(&good);
        Image::open(&path).expect("the untampered manifest is accepted");

        let mut cases: Vec<(Manifest, &str)> = Vec::new();
        let mut m = good.clone();
        m.processes[0].threads[0].regs.pop();
        cases.push((m, "registers"));
        let mut m = good.clone();
        m.processes[0].threads[0].pending[0].truncate(8);
        cases.push((m, "siginfo"));
        let mut m = good.clone();
        m.processes[0].shared_pending = vec![vec![0; 4096]];
        cases.push((m, "siginfo"));
        let mut m = good.clone();
        m.processes[0].auxv.push(1);
        cases.push((m, "auxv"));
        let mut m = good.clone();
        m.processes[0].vmas[0].end = m.processes[0].vmas[0].start;
        m.processes[0].vmas[0].pages.clear();
        cases.push((m, "empty, reversed"));
        let mut m = good.clone();
        m.processes[0].vmas[0].start = 0x1001;
        m.processes[0].vmas[0].pages.clear();
        cases.push((m, "not page-aligned"));
        let mut m = good.clone();
        m.processes[0].vmas[0].pages = vec![run(0x1000, u64::MAX / 2, 0)];
        cases.push((m, "page run"));
        let mut m = good.clone();
        m.processes[0].vmas[0].pages = vec![run(0x1000, 1, 100)];
        cases.push((m, "page run"));
        let mut m = good.clone();
        m.processes[0].vmas[0].pages[0].layer = 1;
        cases.push((m, "layer 1 of a chain of 1"));
        let mut m = good.clone();
        m.processes[0].fds = vec![FdImage {
            fd: 3,
            cloexec: false,
            kind: FdKind::Pipe {
                inode: 1,
                write_end: false,
                flags: 0,
                capacity: 4,
                data: vec![1; 5],
            },
        }];
        cases.push((m, "capacity"));
        for (m, needle) in cases {
            write(&m);
            match Image::open(&path) {
                Err(e @ SnapshotError::Corrupt { .. }) => {
                    assert!(e.to_string().contains(needle), "{needle}: {e}")
                }
                Err(e) => panic!("{needle}: not refused as corrupt: {e}"),
                Ok(_) => panic!("{needle}: tampered manifest accepted"),
            }
        }
    }

    /// A child's pages in its parent are read through the chain, merged
    /// into one whole image, and a parent missing, replaced or corrupt is
    /// refused naming it.
    #[test]
    fn chains_resolve_merge_and_refuse_a_bad_parent() {
        let dir = tempfile::tempdir().unwrap();
        let parent = dir.path().join("parent");
        let child = dir.path().join("child");
        write_sample(&parent);
        let p = Image::open(&parent).unwrap();
        let mut m = sample_manifest(vec![
            PageRun {
                addr: 0x1000,
                pages: 1,
                offset: 0,
                layer: 0,
            },
            PageRun {
                addr: 0x2000,
                pages: 1,
                offset: PAGE,
                layer: 1,
            },
        ]);
        m.id = 2;
        m.parent = Some(p.as_parent_of(&child));
        assert_eq!(m.parent.as_ref().unwrap().path, "parent");
        let mut w = ImageWriter::create(&child, Durability::PageCache).unwrap();
        w.write_pages(&vec![9u8; PAGE as usize]).unwrap();
        w.finish(&m).unwrap();

        let c = Image::open(&child).unwrap();
        assert_eq!(c.ancestors.len(), 1);
        let mut buf = vec![0u8; PAGE as usize];
        c.layer(1).read_pages(PAGE, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 7));

        let merged = dir.path().join("merged");
        c.merge(&merged, Durability::PageCache).unwrap();
        let flat = Image::open(&merged).unwrap();
        assert!(flat.ancestors.is_empty() && flat.manifest.parent.is_none());
        assert_eq!(flat.manifest.id, 2, "the same state keeps its id");
        for (run, fill) in flat.manifest.processes[0].vmas[0]
            .pages
            .iter()
            .zip([9u8, 7])
        {
            assert_eq!(run.layer, 0);
            flat.read_pages(run.offset, &mut buf).unwrap();
            assert!(buf.iter().all(|&b| b == fill), "run at {:#x}", run.addr);
        }

        let good = std::fs::read(&parent).unwrap();
        let refused = |needle: &str| match Image::open(&child) {
            Err(e) => {
                let text = format!(
                    "{e} / {}",
                    std::error::Error::source(&e)
                        .map(|s| s.to_string())
                        .unwrap_or_default()
                );
                assert!(text.contains(&parent.display().to_string()), "{text}");
                assert!(text.contains(needle), "{needle}: {text}");
            }
            Ok(_) => panic!("{needle}: a bad parent accepted"),
        };
        std::fs::remove_file(&parent).unwrap();
        refused("No such file");
        let mut flipped = good.clone();
        flipped[PAGE as usize + 5] ^= 1;
        std::fs::write(&parent, &flipped).unwrap();
        refused("pages checksum");
        write_sample(&parent);
        let mut other = Image::open(&parent).unwrap().manifest;
        other.id = 3;
        let mut w = ImageWriter::create(&parent, Durability::PageCache).unwrap();
        w.write_pages(&vec![7u8; 2 * PAGE as usize]).unwrap();
        w.finish(&other).unwrap();
        refused("replaced");
        std::fs::write(&parent, &good).unwrap();
        Image::open(&child).expect("the parent as it was");
        Image::open(&merged).expect("the merged image needs no parent");
    }

    #[test]
    fn interrupted_write_keeps_previous_image() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let m = write_sample(&path);
        let mut w = ImageWriter::create(&path, Durability::PageCache).unwrap();
        w.write_pages(&vec![1u8; PAGE as usize]).unwrap();
        w.abandon();
        assert_eq!(Image::open(&path).unwrap().manifest, m);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
