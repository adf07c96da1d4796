//! Answers for intercepted calls: which virtual port a real one stands for,
//! and where a supervised client's connect to a virtual port goes.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use crate::address::{covers, serves};
use crate::translation::{Protocol, RegistryState};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// No supervised instance serves the destination; leave the call alone.
    PassThrough,
    To {
        real_port: u16,
        owner: String,
    },
    /// Instances serve the destination, but none of the caller's AID; or
    /// the registry is damaged and one might.
    Refused,
}

impl RegistryState {
    /// The virtual port behind `addr:real_port`, for rewriting the results of
    /// getsockname and getpeername.
    pub fn virtual_port_of(&self, protocol: Protocol, addr: IpAddr, real_port: u16) -> Option<u16> {
        self.translations
            .iter()
            .filter(|t| t.protocol == protocol && t.real_port == real_port)
            .filter_map(|t| covers(t.addr, addr).map(|rank| (rank, t.virtual_port)))
            .max_by_key(|&(rank, _)| rank)
            .map(|(_, port)| port)
    }

    /// Where a client of `aid` connecting to `dest:virtual_port` goes. All
    /// instances of one AID serving the destination form one group, and
    /// `pick` chooses among them so that callers can spread connections.
    pub fn route(
        &self,
        protocol: Protocol,
        dest: IpAddr,
        virtual_port: u16,
        aid: &str,
        pick: usize,
    ) -> Route {
        match self.group(protocol, dest, virtual_port, aid) {
            Group::Members(members) => {
                let (owner, real_port) = members[pick % members.len()];
                Route::To {
                    real_port,
                    owner: owner.to_owned(),
                }
            }
            Group::PassThrough => Route::PassThrough,
            Group::Refused => Route::Refused,
        }
    }

    /// The group [`route`](Self::route) picks from: what the kernel is
    /// given to pick from itself for the instances that leave connect to
    /// it.
    pub fn group(
        &self,
        protocol: Protocol,
        dest: IpAddr,
        virtual_port: u16,
        aid: &str,
    ) -> Group<'_> {
        self.groups(protocol, dest, virtual_port).of(aid)
    }

    /// What every AID's connect to `dest:virtual_port` finds, read in one
    /// pass over the translations.
    pub fn groups(&self, protocol: Protocol, dest: IpAddr, virtual_port: u16) -> Groups<'_> {
        let mut groups = Groups {
            served: false,
            by_aid: BTreeMap::new(),
            real_port_of: BTreeSet::new(),
            damaged: !self.damaged.is_empty(),
        };
        for t in &self.translations {
            if t.protocol != protocol {
                continue;
            }
            let Some(rank) = serves(t.addr, dest) else {
                continue;
            };
            if t.real_port == virtual_port {
                groups.real_port_of.insert(&t.aid);
            }
            if t.virtual_port != virtual_port {
                continue;
            }
            groups.served = true;
            // Per owner, the socket the kernel would pick: the most
            // specific address, then (for determinism) the lowest real
            // port.
            let best = groups
                .by_aid
                .entry(&t.aid)
                .or_default()
                .entry(&t.owner)
                .or_insert((rank, t.real_port));
            if (rank, std::cmp::Reverse(t.real_port)) > (best.0, std::cmp::Reverse(best.1)) {
                *best = (rank, t.real_port);
            }
        }
        groups
    }
}

/// Every AID's group for one destination ([`RegistryState::groups`]).
pub struct Groups<'a> {
    /// Some instance serves the destination.
    served: bool,
    /// Per AID, per owner: (rank of its address, real port).
    by_aid: BTreeMap<&'a str, BTreeMap<&'a str, (u8, u16)>>,
    /// The AIDs whose translations have the destination's port as their
    /// real port.
    real_port_of: BTreeSet<&'a str>,
    damaged: bool,
}

impl<'a> Groups<'a> {
    /// The group of a client of `aid`.
    pub fn of(&self, aid: &str) -> Group<'a> {
        if let Some(group) = self.by_aid.get(aid) {
            return Group::Members(
                group
                    .iter()
                    .map(|(owner, (_, real_port))| (*owner, *real_port))
                    .collect(),
            );
        }
        if self.served {
            return Group::Refused;
        }
        // Connecting straight to another group's real port would bypass
        // the AID check.
        if self.real_port_of.iter().any(|other| *other != aid) {
            return Group::Refused;
        }
        // A live instance whose translations are lost may hold this very
        // port (the first instance of a port holds the fixed port
        // itself): passing through could reach another AID's instance.
        if self.damaged {
            return Group::Refused;
        }
        Group::PassThrough
    }
}

/// The instances a connect may go to.
#[derive(Debug, PartialEq, Eq)]
pub enum Group<'a> {
    /// As [`Route::PassThrough`].
    PassThrough,
    /// (owner, real port) of each instance of the caller's AID, in owner
    /// order; never empty.
    Members(Vec<(&'a str, u16)>),
    /// As [`Route::Refused`].
    Refused,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::translation::tests::tcp;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn state(translations: Vec<crate::Translation>) -> RegistryState {
        RegistryState {
            translations,
            ..RegistryState::default()
        }
    }

    fn to(real_port: u16, owner: &str) -> Route {
        Route::To {
            real_port,
            owner: owner.into(),
        }
    }

    #[test]
    fn unserved_destinations_pass_through() {
        let s = state(vec![tcp("0.0.0.0", 9000, "a", 9000, "i1")]);
        assert_eq!(
            s.route(Protocol::Tcp, ip("127.0.0.1"), 9001, "a", 0),
            Route::PassThrough
        );
        assert_eq!(
            s.route(Protocol::Udp, ip("127.0.0.1"), 9000, "a", 0),
            Route::PassThrough
        );
        assert_eq!(
            s.route(Protocol::Tcp, ip("::1"), 9000, "a", 0),
            Route::PassThrough
        );
        let local = state(vec![tcp("127.0.0.1", 9000, "a", 9000, "i1")]);
        assert_eq!(
            local.route(Protocol::Tcp, ip("10.0.0.1"), 9000, "a", 0),
            Route::PassThrough
        );
    }

    #[test]
    fn other_aids_are_refused() {
        let s = state(vec![tcp("0.0.0.0", 9000, "a", 9000, "i1")]);
        assert_eq!(
            s.route(Protocol::Tcp, ip("127.0.0.1"), 9000, "b", 0),
            Route::Refused
        );
        assert_eq!(
            s.route(Protocol::Tcp, ip("127.0.0.1"), 9000, "a", 0),
            to(9000, "i1")
        );
    }

    #[test]
    fn real_ports_of_other_aids_are_refused() {
        let s = state(vec![tcp("::", 9000, "b", 28731, "i2")]);
        assert_eq!(
            s.route(Protocol::Tcp, ip("127.0.0.1"), 28731, "a", 0),
            Route::Refused
        );
        assert_eq!(
            s.route(Protocol::Tcp, ip("127.0.0.1"), 28731, "b", 0),
            Route::PassThrough
        );
    }

    #[test]
    fn each_aid_reaches_its_own_instance() {
        let s = state(vec![
            tcp("0.0.0.0", 9000, "a", 9000, "i1"),
            tcp("0.0.0.0", 9000, "b", 40000, "i2"),
        ]);
        assert_eq!(
            s.route(Protocol::Tcp, ip("127.0.0.1"), 9000, "a", 7),
            to(9000, "i1")
        );
        assert_eq!(
            s.route(Protocol::Tcp, ip("127.0.0.1"), 9000, "b", 7),
            to(40000, "i2")
        );
        assert_eq!(
            s.route(Protocol::Tcp, ip("127.0.0.1"), 9000, "c", 7),
            Route::Refused
        );
    }

    #[test]
    fn same_aid_group_is_picked_round_robin_in_owner_order() {
        let s = state(vec![
            tcp("0.0.0.0", 9000, "a", 40002, "i3"),
            tcp("0.0.0.0", 9000, "a", 9000, "i1"),
            tcp("0.0.0.0", 9000, "b", 40003, "other"),
            tcp("0.0.0.0", 9000, "a", 40001, "i2"),
        ]);
        let picks: Vec<Route> = (0..4)
            .map(|pick| s.route(Protocol::Tcp, ip("127.0.0.1"), 9000, "a", pick))
            .collect();
        assert_eq!(
            picks,
            [
                to(9000, "i1"),
                to(40001, "i2"),
                to(40002, "i3"),
                to(9000, "i1")
            ]
        );
    }

    #[test]
    fn an_instance_with_several_matching_sockets_counts_once_with_its_most_specific() {
        let s = state(vec![
            tcp("::", 9000, "a", 40001, "i1"),
            tcp("0.0.0.0", 9000, "a", 40002, "i1"),
            tcp("127.0.0.1", 9000, "a", 40003, "i1"),
            tcp("0.0.0.0", 9000, "a", 40004, "i2"),
        ]);
        assert_eq!(
            s.route(Protocol::Tcp, ip("127.0.0.1"), 9000, "a", 0),
            to(40003, "i1")
        );
        assert_eq!(
            s.route(Protocol::Tcp, ip("10.0.0.1"), 9000, "a", 0),
            to(40002, "i1")
        );
        assert_eq!(
            s.route(Protocol::Tcp, ip("127.0.0.1"), 9000, "a", 1),
            to(40004, "i2")
        );
        assert_eq!(
            s.route(Protocol::Tcp, ip("::1"), 9000, "a", 0),
            to(40001, "i1")
        );
        assert_eq!(
            s.route(Protocol::Tcp, ip("::1"), 9000, "a", 1),
            to(40001, "i1")
        );
    }

    #[test]
    fn ipv6_and_dual_stack() {
        let s = state(vec![tcp("::", 9000, "a", 40001, "i1")]);
        assert_eq!(
            s.route(Protocol::Tcp, ip("::1"), 9000, "a", 0),
            to(40001, "i1")
        );
        assert_eq!(
            s.route(Protocol::Tcp, ip("127.0.0.1"), 9000, "a", 0),
            to(40001, "i1")
        );
        assert_eq!(
            s.route(Protocol::Tcp, ip("::ffff:127.0.0.1"), 9000, "b", 0),
            Route::Refused
        );

        let v4 = state(vec![tcp("0.0.0.0", 9000, "a", 40001, "i1")]);
        assert_eq!(
            v4.route(Protocol::Tcp, ip("::ffff:10.0.0.1"), 9000, "a", 0),
            to(40001, "i1")
        );
        assert_eq!(
            v4.route(Protocol::Tcp, ip("fe80::1"), 9000, "a", 0),
            Route::PassThrough
        );

        let v6 = state(vec![tcp("::1", 9000, "a", 40001, "i1")]);
        assert_eq!(
            v6.route(Protocol::Tcp, ip("::1"), 9000, "a", 0),
            to(40001, "i1")
        );
        assert_eq!(
            v6.route(Protocol::Tcp, ip("127.0.0.1"), 9000, "a", 0),
            Route::PassThrough
        );
    }

    #[test]
    fn loopback_and_unspecified_destinations() {
        let loopback = state(vec![tcp("127.0.0.1", 9000, "a", 40001, "i1")]);
        assert_eq!(
            loopback.route(Protocol::Tcp, ip("0.0.0.0"), 9000, "a", 0),
            to(40001, "i1")
        );
        assert_eq!(
            loopback.route(Protocol::Tcp, ip("127.0.0.1"), 9000, "b", 0),
            Route::Refused
        );
        assert_eq!(
            loopback.route(Protocol::Tcp, ip("::"), 9000, "a", 0),
            Route::PassThrough
        );

        let wildcard = state(vec![tcp("0.0.0.0", 9000, "a", 40001, "i1")]);
        assert_eq!(
            wildcard.route(Protocol::Tcp, ip("0.0.0.0"), 9000, "a", 0),
            to(40001, "i1")
        );
        assert_eq!(
            wildcard.route(Protocol::Tcp, ip("127.0.0.1"), 9000, "a", 0),
            to(40001, "i1")
        );

        let v6_loopback = state(vec![tcp("::1", 9000, "a", 40001, "i1")]);
        assert_eq!(
            v6_loopback.route(Protocol::Tcp, ip("::"), 9000, "a", 0),
            to(40001, "i1")
        );

        let dual = state(vec![tcp("::", 9000, "a", 40001, "i1")]);
        assert_eq!(
            dual.route(Protocol::Tcp, ip("0.0.0.0"), 9000, "a", 0),
            to(40001, "i1")
        );
    }

    #[test]
    fn virtual_port_of_real_sockets() {
        let s = state(vec![
            tcp("0.0.0.0", 9000, "a", 40001, "i1"),
            tcp("::", 8080, "a", 40002, "i1"),
            tcp("127.0.0.1", 7000, "a", 40003, "i1"),
        ]);
        let tcp_port = |addr: &str, port| s.virtual_port_of(Protocol::Tcp, ip(addr), port);
        assert_eq!(tcp_port("0.0.0.0", 40001), Some(9000));
        assert_eq!(tcp_port("10.0.0.7", 40001), Some(9000));
        assert_eq!(tcp_port("::ffff:127.0.0.1", 40001), Some(9000));
        assert_eq!(tcp_port("::1", 40001), None);
        assert_eq!(tcp_port("::1", 40002), Some(8080));
        assert_eq!(tcp_port("127.0.0.1", 40002), Some(8080));
        assert_eq!(tcp_port("127.0.0.1", 40003), Some(7000));
        assert_eq!(tcp_port("10.0.0.7", 40003), None);
        assert_eq!(tcp_port("127.0.0.1", 40004), None);
        assert_eq!(s.virtual_port_of(Protocol::Udp, ip("0.0.0.0"), 40001), None);
    }
}
