//! The cluster key and the HMAC-SHA256 tag on every negotiation frame.

use std::fmt;
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::message::{split, unsigned_frame, DecodeError, Frame, Kind, Nonce, TAG_LEN};

type HmacSha256 = Hmac<Sha256>;

/// Below this a key could be guessed or is likely a placeholder typed by
/// hand; 32 bytes matches the HMAC-SHA256 block strength.
pub const MIN_KEY_LEN: usize = 32;
/// Key files are secrets, not data sets: anything larger is a wrong path.
const MAX_KEY_LEN: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cluster key file {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("cluster key file {path}: {len} bytes; at least {MIN_KEY_LEN} random bytes are needed (e.g. `head -c 32 /dev/urandom > {path}`)")]
    TooShort { path: PathBuf, len: usize },
    #[error(
        "cluster key file {path}: {len} bytes; a key is at most {MAX_KEY_LEN} bytes (wrong file?)"
    )]
    TooLong { path: PathBuf, len: usize },
}

/// The shared secret of a cluster. Its bytes are the whole file, taken
/// as they are.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterKey(Vec<u8>);

impl fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClusterKey(<{} bytes>)", self.0.len())
    }
}

impl ClusterKey {
    pub fn from_bytes(bytes: Vec<u8>, origin: &Path) -> Result<ClusterKey, KeyError> {
        let len = bytes.len();
        let path = origin.to_path_buf();
        if len < MIN_KEY_LEN {
            return Err(KeyError::TooShort { path, len });
        }
        if len > MAX_KEY_LEN {
            return Err(KeyError::TooLong { path, len });
        }
        Ok(ClusterKey(bytes))
    }

    pub fn load(path: &Path) -> Result<ClusterKey, KeyError> {
        let bytes = std::fs::read(path).map_err(|error| KeyError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        Self::from_bytes(bytes, path)
    }

    fn mac(&self) -> HmacSha256 {
        HmacSha256::new_from_slice(&self.0).expect("HMAC takes keys of any length")
    }

    /// A complete frame of `kind` carrying `body`, tagged.
    pub fn seal(&self, kind: Kind, body: &[u8]) -> Vec<u8> {
        let mut frame = unsigned_frame(kind, body);
        let mut mac = self.mac();
        mac.update(&frame);
        frame.extend_from_slice(&mac.finalize().into_bytes());
        frame
    }

    /// Splits `bytes` and checks its tag in constant time. The body is not
    /// parsed here: nothing of an unauthenticated frame is looked at.
    pub fn open<'a>(&self, bytes: &'a [u8]) -> Result<Frame<'a>, AuthError> {
        let frame = split(bytes).map_err(AuthError::Malformed)?;
        if frame.header.kind == Kind::Deny {
            return Err(AuthError::Denied);
        }
        debug_assert_eq!(frame.tag.len(), TAG_LEN);
        let mut mac = self.mac();
        mac.update(frame.signed);
        mac.verify_slice(frame.tag).map_err(|_| AuthError::BadMac)?;
        Ok(frame)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("{0}")]
    Malformed(DecodeError),
    #[error("bad MAC (the peer does not hold this cluster key)")]
    BadMac,
    #[error("the peer denied the request")]
    Denied,
}

/// A fresh random nonce from the kernel.
pub fn nonce() -> Nonce {
    let mut n = [0u8; std::mem::size_of::<Nonce>()];
    getrandom::fill(&mut n).expect("the kernel's random source is always available on Linux");
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remote::message::{deny_frame, HEADER_LEN};

    fn key(byte: u8) -> ClusterKey {
        ClusterKey::from_bytes(vec![byte; 32], Path::new("k")).unwrap()
    }

    #[test]
    fn keys_must_be_long_enough_and_say_so() {
        let err = ClusterKey::from_bytes(vec![1; 31], Path::new("/etc/appshot/cluster.key"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/etc/appshot/cluster.key") && err.contains("31 bytes"),
            "{err}"
        );
        assert!(ClusterKey::from_bytes(vec![1; 5000], Path::new("k")).is_err());
        assert!(
            !format!("{:?}", key(1)).contains("1, 1"),
            "Debug leaks the key"
        );
    }

    #[test]
    fn a_sealed_frame_opens_with_the_same_key_only() {
        let frame = key(1).seal(Kind::Request, b"hello");
        let opened = key(1).open(&frame).unwrap();
        assert_eq!(opened.body, b"hello");
        assert_eq!(opened.header.kind, Kind::Request);
        assert_eq!(key(2).open(&frame).unwrap_err(), AuthError::BadMac);
    }

    #[test]
    fn any_flipped_bit_breaks_the_tag() {
        let frame = key(1).seal(Kind::Response, b"body");
        for i in 0..frame.len() {
            let mut bad = frame.clone();
            bad[i] ^= 0x01;
            let got = key(1).open(&bad);
            assert!(got.is_err(), "flip at {i} accepted");
            if i >= HEADER_LEN {
                assert_eq!(got.unwrap_err(), AuthError::BadMac, "flip at {i}");
            }
        }
    }

    #[test]
    fn kind_is_covered_so_a_response_cannot_pose_as_a_request() {
        let mut frame = key(1).seal(Kind::Response, b"x");
        frame[5] = Kind::Request as u8;
        assert_eq!(key(1).open(&frame).unwrap_err(), AuthError::BadMac);
    }

    #[test]
    fn deny_is_recognised_without_a_tag() {
        assert_eq!(key(1).open(&deny_frame()).unwrap_err(), AuthError::Denied);
    }

    #[test]
    fn nonces_differ() {
        assert_ne!(nonce(), nonce());
    }
}
