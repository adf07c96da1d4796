//! Values of the cross-host settings: source addresses and networks of
//! source rules, and the peers whose agents negotiate.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An address or network, `10.9.0.0/24`, `10.9.0.7` (= /32), `fd00::/64`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    pub fn is_ipv4(&self) -> bool {
        self.addr.is_ipv4()
    }

    fn max_prefix(addr: IpAddr) -> u8 {
        if addr.is_ipv4() {
            32
        } else {
            128
        }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                mask(u128::from(u32::from(net)), self.prefix, 32)
                    == mask(u128::from(u32::from(ip)), self.prefix, 32)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                mask(u128::from(net), self.prefix, 128) == mask(u128::from(ip), self.prefix, 128)
            }
            _ => false,
        }
    }

    /// Whether every address of `other` is in `self`.
    pub fn covers(&self, other: &Cidr) -> bool {
        self.prefix <= other.prefix && self.contains(other.addr)
    }

    /// Whether some address is in both.
    pub fn overlaps(&self, other: &Cidr) -> bool {
        self.covers(other) || other.covers(self)
    }
}

fn mask(bits: u128, prefix: u8, width: u8) -> u128 {
    if prefix == 0 {
        0
    } else {
        bits >> (width - prefix)
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr_text, prefix_text) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr_text.trim().parse().map_err(|_| {
            format!("`{s}` is not an IP address or network (e.g. 10.9.0.0/24, 10.9.0.7, fd00::/64)")
        })?;
        if let IpAddr::V6(v6) = addr {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return Err(format!(
                    "`{s}` is an IPv4-mapped IPv6 address; write the IPv4 form ({v4})"
                ));
            }
        }
        let max = Cidr::max_prefix(addr);
        let prefix = match prefix_text {
            None => max,
            Some(p) => match p.trim().parse::<u8>() {
                Ok(p) if p <= max => p,
                _ => {
                    return Err(format!(
                        "`{s}`: prefix length `{p}` is not a number from 0 to {max}"
                    ))
                }
            },
        };
        let cidr = Cidr { addr, prefix };
        let network = cidr.network();
        if network != addr {
            return Err(format!(
                "`{s}` has host bits set; the network is {network}/{prefix}"
            ));
        }
        Ok(cidr)
    }
}

impl Cidr {
    fn network(&self) -> IpAddr {
        let keep = |width: u8| -> u128 {
            if self.prefix == 0 {
                0
            } else {
                u128::MAX << (width - self.prefix) & (u128::MAX >> (128 - width))
            }
        };
        match self.addr {
            IpAddr::V4(a) => {
                IpAddr::V4(Ipv4Addr::from((u128::from(u32::from(a)) & keep(32)) as u32))
            }
            IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(u128::from(a) & keep(128))),
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl Serialize for Cidr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// Clients outside appshot from `source` (and `source_port`, if given)
/// reach the instance of `aid`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceRule {
    pub source: Cidr,
    pub source_port: Option<u16>,
    pub aid: String,
}

impl SourceRule {
    /// Whether some connection matches both rules.
    pub fn overlaps(&self, other: &SourceRule) -> bool {
        self.source.overlaps(&other.source)
            && match (self.source_port, other.source_port) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            }
    }

    /// Whether every connection `other` matches, this one matches too.
    pub fn covers(&self, other: &SourceRule) -> bool {
        self.source.covers(&other.source)
            && match (self.source_port, other.source_port) {
                (Some(a), Some(b)) => a == b,
                (Some(_), None) => false,
                (None, _) => true,
            }
    }
}

/// A host whose agent answers negotiations: its address, and the agent's
/// port when it is not the default one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    pub addr: IpAddr,
    pub agent_port: Option<u16>,
}

impl FromStr for Peer {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(sa) = s.parse::<SocketAddr>() {
            if sa.port() == 0 {
                return Err(format!("`{s}`: agent port 0 is not a port"));
            }
            return Ok(Peer {
                addr: sa.ip(),
                agent_port: Some(sa.port()),
            });
        }
        s.parse::<IpAddr>()
            .map(|addr| Peer {
                addr,
                agent_port: None,
            })
            .map_err(|_| {
                format!("`{s}` is not ADDRESS or ADDRESS:PORT (e.g. 10.200.1.1, 10.200.1.1:7946, [fd00::1]:7946)")
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn cidrs_parse_and_display() {
        assert_eq!(cidr("10.9.0.0/24").to_string(), "10.9.0.0/24");
        assert_eq!(cidr("10.9.0.7").to_string(), "10.9.0.7/32");
        assert_eq!(cidr("fd00::/64").to_string(), "fd00::/64");
        assert_eq!(cidr("0.0.0.0/0").prefix(), 0);
        for bad in [
            "",
            "10.9.0.0/33",
            "10.9.0/24",
            "fd00::/129",
            "x/8",
            "10.9.0.1/24",
            "::ffff:10.0.0.1",
            "10.0.0.0/-1",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad:?} accepted");
        }
        let err = "10.9.0.1/24".parse::<Cidr>().unwrap_err();
        assert!(err.contains("10.9.0.0/24"), "{err}");
    }

    #[test]
    fn containment() {
        let net = cidr("10.9.0.0/24");
        assert!(net.contains(ip("10.9.0.255")));
        assert!(net.contains(ip("::ffff:10.9.0.3")));
        assert!(!net.contains(ip("10.9.1.0")));
        assert!(!net.contains(ip("fd00::1")));
        assert!(cidr("0.0.0.0/0").contains(ip("1.2.3.4")));
        assert!(cidr("fd00::/8").contains(ip("fdff::1")));
        assert!(!cidr("fd00::/8").contains(ip("fe00::1")));
        assert!(net.covers(&cidr("10.9.0.128/25")));
        assert!(!cidr("10.9.0.128/25").covers(&net));
        assert!(cidr("10.9.0.128/25").overlaps(&net));
        assert!(!cidr("10.9.1.0/24").overlaps(&net));
    }

    #[test]
    fn rules_with_ports() {
        let rule = |s: &str, p: Option<u16>| SourceRule {
            source: cidr(s),
            source_port: p,
            aid: "x".into(),
        };
        let any = rule("10.9.0.0/24", None);
        let one = rule("10.9.0.7", Some(5000));
        assert!(any.covers(&one) && !one.covers(&any));
        assert!(any.overlaps(&one));
        assert!(!one.overlaps(&rule("10.9.0.7", Some(5001))));
    }

    #[test]
    fn peers() {
        assert_eq!(
            "10.200.1.1".parse::<Peer>(),
            Ok(Peer {
                addr: ip("10.200.1.1"),
                agent_port: None
            })
        );
        assert_eq!(
            "[fd00::1]:7000".parse::<Peer>().unwrap().agent_port,
            Some(7000)
        );
        assert!("10.200.1.1:0".parse::<Peer>().is_err());
        assert!("host:7946".parse::<Peer>().is_err());
    }
}
