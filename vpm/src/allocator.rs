//! Choice of the real port a supervised bind of a virtual port should get.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::address::overlap;
use crate::translation::{Protocol, RegistryState};

/// Real ports handed out when the virtual port itself is taken; inclusive.
/// The configuration's `port_range` and `--port-range` parse into it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortRange {
    pub start: u16,
    pub end: u16,
}

impl Default for PortRange {
    fn default() -> Self {
        PortRange {
            start: 20000,
            end: 29999,
        }
    }
}

impl FromStr for PortRange {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (start, end) = s.split_once('-').ok_or_else(|| {
            format!("port range `{s}` must look like START-END, e.g. 20000-29999")
        })?;
        let port = |p: &str| match p.trim().parse::<u16>() {
            Ok(0) | Err(_) => Err(format!(
                "port range `{s}`: `{}` is not a port number between 1 and 65535",
                p.trim()
            )),
            Ok(port) => Ok(port),
        };
        let (start, end) = (port(start)?, port(end)?);
        if start > end {
            return Err(format!(
                "port range `{s}` is empty: start {start} is above end {end}"
            ));
        }
        Ok(PortRange { start, end })
    }
}

impl PortRange {
    pub fn len(&self) -> usize {
        if self.end < self.start {
            0
        } else {
            usize::from(self.end - self.start) + 1
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl std::fmt::Display for PortRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.start, self.end)
    }
}

impl RegistryState {
    /// Real ports to try, in order, for a bind of `addr:virtual_port` by an
    /// instance of `aid`. The kernel is the final judge: the caller binds
    /// each in turn and keeps the first that succeeds.
    ///
    /// The virtual port itself comes first unless it is already some
    /// instance's real port or another AID claimed it on an overlapping
    /// address, so the fixed port belongs to the first group that claims it.
    /// `start_hint` spreads concurrent allocators over the range.
    pub fn bind_candidates(
        &self,
        protocol: Protocol,
        addr: IpAddr,
        virtual_port: u16,
        aid: &str,
        range: PortRange,
        start_hint: usize,
    ) -> Vec<u16> {
        let same_protocol = || self.translations.iter().filter(|t| t.protocol == protocol);
        let used: BTreeSet<u16> = same_protocol().map(|t| t.real_port).collect();
        let claimed_by_other_aid = same_protocol()
            .any(|t| t.virtual_port == virtual_port && t.aid != aid && overlap(t.addr, addr));

        let mut candidates = Vec::new();
        if !used.contains(&virtual_port) && !claimed_by_other_aid {
            candidates.push(virtual_port);
        }
        let len = range.len();
        // The virtual port is never taken from the range: either it was
        // offered above, or it belongs to someone else.
        candidates.extend(
            (0..len)
                .map(|i| range.start + ((start_hint % len + i) % len) as u16)
                .filter(|port| *port != virtual_port && !used.contains(port)),
        );
        candidates
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::translation::tests::tcp;
    use crate::Translation;

    #[test]
    fn port_range_round_trips() {
        let range: PortRange = "1-65535".parse().unwrap();
        assert_eq!(
            range,
            PortRange {
                start: 1,
                end: 65535
            }
        );
        assert_eq!(range.to_string(), "1-65535");
        assert_eq!(PortRange::default().to_string(), "20000-29999");
        assert_eq!("80-80".parse::<PortRange>().unwrap().start, 80);
    }

    #[test]
    fn port_range_rejects_nonsense() {
        for bad in ["", "abc", "300-200", "0-10", "1-70000", "-5", "5-", "1-2-3"] {
            assert!(bad.parse::<PortRange>().is_err(), "{bad:?} accepted");
        }
    }

    const RANGE: PortRange = PortRange {
        start: 40000,
        end: 40003,
    };

    fn candidates(translations: Vec<Translation>, aid: &str, hint: usize) -> Vec<u16> {
        let s = RegistryState {
            translations,
            ..RegistryState::default()
        };
        s.bind_candidates(
            Protocol::Tcp,
            "0.0.0.0".parse().unwrap(),
            9000,
            aid,
            RANGE,
            hint,
        )
    }

    #[test]
    fn range_len() {
        assert_eq!(RANGE.len(), 4);
        assert_eq!(PortRange { start: 1, end: 1 }.len(), 1);
        assert_eq!(
            PortRange {
                start: 0,
                end: 65535
            }
            .len(),
            65536
        );
        assert!(PortRange { start: 2, end: 1 }.is_empty());
    }

    #[test]
    fn fixed_port_first_on_an_empty_table() {
        assert_eq!(
            candidates(vec![], "a", 0),
            [9000, 40000, 40001, 40002, 40003]
        );
    }

    #[test]
    fn fixed_port_goes_to_the_first_aid_that_claims_it() {
        let other_aid_moved = vec![tcp("0.0.0.0", 9000, "b", 40002, "i1")];
        assert_eq!(
            candidates(other_aid_moved.clone(), "b", 0),
            [9000, 40000, 40001, 40003]
        );
        assert_eq!(candidates(other_aid_moved, "a", 0), [40000, 40001, 40003]);
    }

    #[test]
    fn fixed_port_is_free_for_another_aid_on_a_disjoint_address() {
        let s = RegistryState {
            translations: vec![tcp("10.0.0.1", 9000, "b", 40002, "i1")],
            ..RegistryState::default()
        };
        let on = |addr: &str| {
            s.bind_candidates(Protocol::Tcp, addr.parse().unwrap(), 9000, "a", RANGE, 0)
        };
        assert_eq!(on("127.0.0.1"), [9000, 40000, 40001, 40003]);
        assert_eq!(on("::"), [40000, 40001, 40003]);
    }

    #[test]
    fn used_real_ports_are_skipped() {
        let table = vec![
            tcp("0.0.0.0", 9000, "a", 9000, "i1"),
            tcp("127.0.0.1", 8000, "a", 40001, "i1"),
        ];
        assert_eq!(candidates(table, "a", 0), [40000, 40002, 40003]);
    }

    #[test]
    fn other_protocols_do_not_interfere() {
        let mut udp = tcp("0.0.0.0", 9000, "b", 9000, "i1");
        udp.protocol = Protocol::Udp;
        assert_eq!(
            candidates(vec![udp], "a", 0),
            [9000, 40000, 40001, 40002, 40003]
        );
    }

    #[test]
    fn range_wraps_around_from_the_hint() {
        assert_eq!(
            candidates(vec![], "a", 2),
            [9000, 40002, 40003, 40000, 40001]
        );
        assert_eq!(
            candidates(vec![], "a", 7),
            [9000, 40003, 40000, 40001, 40002]
        );
    }

    #[test]
    fn virtual_port_inside_the_range_is_offered_once() {
        let s = RegistryState::default();
        let got = s.bind_candidates(
            Protocol::Tcp,
            "0.0.0.0".parse().unwrap(),
            40001,
            "a",
            RANGE,
            0,
        );
        assert_eq!(got, [40001, 40000, 40002, 40003]);
    }

    #[test]
    fn exhaustion_yields_nothing() {
        let table = vec![
            tcp("0.0.0.0", 9000, "b", 9000, "i0"),
            tcp("0.0.0.0", 9000, "b", 40000, "i1"),
            tcp("0.0.0.0", 9000, "b", 40001, "i2"),
            tcp("0.0.0.0", 9000, "b", 40002, "i3"),
            tcp("0.0.0.0", 9000, "b", 40003, "i4"),
        ];
        assert!(candidates(table, "a", 3).is_empty());
        assert!(candidates(vec![], "a", 0).len() > 1);
        let empty_range = PortRange { start: 2, end: 1 };
        let s = RegistryState::default();
        let got = s.bind_candidates(
            Protocol::Tcp,
            "0.0.0.0".parse().unwrap(),
            9000,
            "a",
            empty_range,
            5,
        );
        assert_eq!(got, [9000]);
    }
}
