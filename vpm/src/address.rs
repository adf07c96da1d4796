//! Which bound addresses accept traffic for which addresses, as the kernel
//! decides it, expressed as a rank so that callers can prefer the most
//! specific socket the way the kernel does.

use std::net::IpAddr;

/// `bound` equals `addr` (or is the loopback an unspecified destination
/// resolves to).
pub(crate) const EXACT: u8 = 2;
/// `bound` is the unspecified address of `addr`'s family.
const WILDCARD: u8 = 1;
/// `bound` is `::`, which on a dual-stack socket also accepts IPv4.
const DUAL_STACK: u8 = 0;

/// How well a socket bound to `bound` serves `addr`, or `None` if it does
/// not. IPv4-mapped IPv6 addresses reach IPv4 sockets, so they compare as
/// IPv4.
pub(crate) fn covers(bound: IpAddr, addr: IpAddr) -> Option<u8> {
    let (bound, addr) = (bound.to_canonical(), addr.to_canonical());
    if bound == addr {
        Some(EXACT)
    } else if bound.is_unspecified() && bound.is_ipv4() == addr.is_ipv4() {
        Some(WILDCARD)
    } else if bound.is_unspecified() && bound.is_ipv6() {
        Some(DUAL_STACK)
    } else {
        None
    }
}

/// Like [`covers`] for a connect destination: connecting to an unspecified
/// address reaches the host itself, so it also lands on sockets bound to
/// loopback of the same family.
pub(crate) fn serves(bound: IpAddr, dest: IpAddr) -> Option<u8> {
    let (canon_bound, canon_dest) = (bound.to_canonical(), dest.to_canonical());
    if canon_dest.is_unspecified()
        && canon_bound.is_loopback()
        && canon_bound.is_ipv4() == canon_dest.is_ipv4()
    {
        return Some(EXACT);
    }
    covers(bound, dest)
}

/// Whether sockets bound to `a` and `b` would compete for the same traffic.
pub(crate) fn overlap(a: IpAddr, b: IpAddr) -> bool {
    covers(a, b).is_some() || covers(b, a).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn mapped_ipv6_is_ipv4() {
        assert_eq!(covers(ip("::ffff:127.0.0.1"), ip("127.0.0.1")), Some(EXACT));
        assert_eq!(covers(ip("0.0.0.0"), ip("::ffff:10.0.0.1")), Some(WILDCARD));
    }

    #[test]
    fn wildcards_cover_by_family() {
        assert_eq!(covers(ip("0.0.0.0"), ip("10.1.2.3")), Some(WILDCARD));
        assert_eq!(covers(ip("0.0.0.0"), ip("::1")), None);
        assert_eq!(covers(ip("::"), ip("fe80::1")), Some(WILDCARD));
        assert_eq!(covers(ip("::"), ip("10.1.2.3")), Some(DUAL_STACK));
        assert_eq!(covers(ip("127.0.0.1"), ip("127.0.0.2")), None);
    }

    #[test]
    fn unspecified_destination_reaches_loopback_of_its_family() {
        assert_eq!(serves(ip("127.0.0.1"), ip("0.0.0.0")), Some(EXACT));
        assert_eq!(serves(ip("::1"), ip("::")), Some(EXACT));
        assert_eq!(serves(ip("::1"), ip("0.0.0.0")), None);
        assert_eq!(serves(ip("10.0.0.1"), ip("0.0.0.0")), None);
    }

    #[test]
    fn overlap_is_symmetric() {
        assert!(overlap(ip("127.0.0.1"), ip("0.0.0.0")));
        assert!(overlap(ip("::"), ip("127.0.0.1")));
        assert!(!overlap(ip("127.0.0.1"), ip("10.0.0.1")));
        assert!(!overlap(ip("0.0.0.0"), ip("::1")));
    }
}
