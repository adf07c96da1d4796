//! A 64-bit counter in a file shared by mapping it, so that a reader can
//! tell whether it moved with a memory load instead of a syscall.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

const LEN: usize = std::mem::size_of::<AtomicU64>();

/// The first eight bytes of a file, mapped shared and read and written
/// atomically. The file must not shrink below them while mapped (a load
/// would then fault): keep it where only its owner can write.
#[derive(Debug)]
pub struct SharedCounter {
    word: NonNull<AtomicU64>,
}

// SAFETY: the mapping is only reached through `AtomicU64` operations, which
// are safe from any thread, and it lives until `drop`.
unsafe impl Send for SharedCounter {}
// SAFETY: as above; `&SharedCounter` allows atomic operations only.
unsafe impl Sync for SharedCounter {}

impl SharedCounter {
    /// Maps the counter of `file`, which must be open for reading and
    /// writing; a file shorter than the counter is refused (`EINVAL`)
    /// rather than grown, so that a reader never changes it.
    pub fn map(file: &File) -> io::Result<SharedCounter> {
        if file.metadata()?.len() < LEN as u64 {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        // SAFETY: a new shared mapping of a descriptor we hold; the kernel
        // chooses the address, so nothing of ours is replaced.
        let at = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if at == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let word = NonNull::new(at.cast::<AtomicU64>())
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        Ok(SharedCounter { word })
    }

    fn word(&self) -> &AtomicU64 {
        // SAFETY: `word` is a page-aligned (so suitably aligned) mapping of
        // at least eight bytes, valid until `drop`; other processes change
        // it only through atomic operations as well.
        unsafe { self.word.as_ref() }
    }

    /// The counter now; a load that sees a [`bump`](Self::bump) also sees
    /// everything its bumper did before it.
    pub fn load(&self) -> u64 {
        self.word().load(Ordering::Acquire)
    }

    pub fn bump(&self) {
        self.word().fetch_add(1, Ordering::Release);
    }
}

impl Drop for SharedCounter {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, of `LEN` bytes; no reference
        // into it outlives `self`.
        unsafe {
            libc::munmap(self.word.as_ptr().cast(), LEN);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bump_through_one_mapping_is_seen_through_another() {
        let file = tempfile::tempfile().unwrap();
        file.set_len(LEN as u64).unwrap();
        let (a, b) = (
            SharedCounter::map(&file).unwrap(),
            SharedCounter::map(&file).unwrap(),
        );
        assert_eq!(b.load(), 0);
        a.bump();
        a.bump();
        assert_eq!(b.load(), 2);
    }

    #[test]
    fn a_file_too_short_is_refused() {
        let file = tempfile::tempfile().unwrap();
        let err = SharedCounter::map(&file).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
    }
}
