//! Replay protection for the agent: a request is served once, and only
//! while its timestamp is within the allowed clock skew of ours.

use std::collections::{BTreeSet, HashSet};

use super::message::Nonce;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error(
        "stale timestamp: {skew_ms} ms from this host's clock, more than the allowed {max_ms} ms"
    )]
    Stale { skew_ms: u64, max_ms: u64 },
    #[error("replayed nonce")]
    Replayed,
    #[error("replay window full ({0} nonces within the skew window)")]
    Full(usize),
}

/// Nonces seen within the last `max_skew_ms`. A request older than that is
/// refused as stale, so forgetting nonces past it never readmits a replay.
#[derive(Debug)]
pub struct ReplayWindow {
    max_skew_ms: u64,
    capacity: usize,
    seen: HashSet<Nonce>,
    by_time: BTreeSet<(u64, Nonce)>,
}

impl ReplayWindow {
    /// `capacity` bounds memory: past it, requests are refused (fail closed)
    /// until old nonces age out.
    pub fn new(max_skew_ms: u64, capacity: usize) -> ReplayWindow {
        ReplayWindow {
            max_skew_ms,
            capacity,
            seen: HashSet::new(),
            by_time: BTreeSet::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    /// Admits `nonce` stamped `timestamp_ms` at our time `now_ms`, once.
    pub fn admit(&mut self, nonce: Nonce, timestamp_ms: u64, now_ms: u64) -> Result<(), Rejection> {
        let skew_ms = timestamp_ms.abs_diff(now_ms);
        if skew_ms > self.max_skew_ms {
            return Err(Rejection::Stale {
                skew_ms,
                max_ms: self.max_skew_ms,
            });
        }
        self.forget_before(now_ms.saturating_sub(self.max_skew_ms));
        if self.seen.contains(&nonce) {
            return Err(Rejection::Replayed);
        }
        if self.seen.len() >= self.capacity {
            return Err(Rejection::Full(self.capacity));
        }
        self.seen.insert(nonce);
        self.by_time.insert((timestamp_ms, nonce));
        Ok(())
    }

    fn forget_before(&mut self, oldest_ms: u64) {
        while let Some(&(ts, nonce)) = self.by_time.first() {
            if ts >= oldest_ms {
                break;
            }
            self.by_time.pop_first();
            self.seen.remove(&nonce);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_000_000;

    fn n(i: u8) -> Nonce {
        [i; 16]
    }

    #[test]
    fn a_nonce_is_admitted_once() {
        let mut w = ReplayWindow::new(30_000, 100);
        assert_eq!(w.admit(n(1), NOW, NOW), Ok(()));
        assert_eq!(w.admit(n(1), NOW, NOW + 5), Err(Rejection::Replayed));
        assert_eq!(w.admit(n(2), NOW, NOW + 5), Ok(()));
    }

    #[test]
    fn timestamps_outside_the_skew_are_stale_both_ways() {
        let mut w = ReplayWindow::new(30_000, 100);
        assert!(matches!(
            w.admit(n(1), NOW - 30_001, NOW),
            Err(Rejection::Stale {
                skew_ms: 30_001,
                ..
            })
        ));
        assert!(matches!(
            w.admit(n(2), NOW + 30_001, NOW),
            Err(Rejection::Stale { .. })
        ));
        assert_eq!(w.admit(n(3), NOW - 30_000, NOW), Ok(()));
        assert!(w.admit(n(3), NOW - 30_000, NOW).is_err());
    }

    #[test]
    fn old_nonces_are_forgotten_but_their_replays_stay_refused() {
        let mut w = ReplayWindow::new(1_000, 100);
        w.admit(n(1), NOW, NOW).unwrap();
        w.admit(n(2), NOW + 1_500, NOW + 1_500).unwrap();
        assert_eq!(w.len(), 1, "n(1) aged out");
        // Its replay is now stale instead of replayed: refused all the same.
        assert!(matches!(
            w.admit(n(1), NOW, NOW + 1_500),
            Err(Rejection::Stale { .. })
        ));
    }

    #[test]
    fn a_full_window_fails_closed_until_entries_age_out() {
        let mut w = ReplayWindow::new(1_000, 2);
        w.admit(n(1), NOW, NOW).unwrap();
        w.admit(n(2), NOW, NOW).unwrap();
        assert_eq!(w.admit(n(3), NOW, NOW), Err(Rejection::Full(2)));
        assert_eq!(w.admit(n(3), NOW + 1_001, NOW + 1_001), Ok(()));
    }
}
