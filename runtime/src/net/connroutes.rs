//! Connect, getsockname and getpeername decided by the kernel for the
//! instances whose supervisor leaves those calls to it
//! ([`Routing::Kernel`]): the registry's answers, precomputed for every
//! destination the programs of `sys/bpf/udproutes.bpf.c` can be asked
//! about, and kept in their maps by the registry's change hooks.
//!
//! The answers come from the very functions a notified call asks
//! ([`RegistryState::groups`], whose group [`RegistryState::route`] picks
//! from, and [`RegistryState::virtual_port_of`]): the policy is written
//! once.
//! They depend on a destination address only through its equality with an
//! address some translation of the port is bound to (and on whether it is
//! a wildcard), so each port has one entry per such address and one for
//! every other address of each family, asked of the policy with an
//! address that no translation names.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

use appshot_sys::udpbpf::{
    ClassKey, ConnRoute, CLASS_EXACT, CLASS_OTHER4, CLASS_OTHER6, GROUP_MAX, PASS, REFUSE, TO,
};
use appshot_vpm::{Group, Protocol, RegistryState, Translation};
use serde::{Deserialize, Serialize};
use tracing::warn;

/// Who decides an instance's connect, getsockname and getpeername. The
/// kernel by default: a connect is then the application's own, judged in
/// its own context and as fast as native; the supervisor falls back to
/// deciding them itself where the kernel cannot (see
/// `supervisor::settle_routing`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Routing {
    /// The supervisor, notified of each call: needed to negotiate with
    /// other hosts (a cluster key), and wherever the programs cannot be
    /// attached.
    Notified,
    /// The cgroup programs, from the registry's answers in their maps;
    /// only bind is notified.
    #[default]
    Kernel,
}

/// What the connect and name maps hold.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Tables {
    pub connects: BTreeMap<ClassKey, ConnRoute>,
    pub names: BTreeMap<ClassKey, u32>,
    /// The registry has damaged instances: a local TCP destination
    /// without an entry is refused.
    pub damaged: bool,
}

/// An AID no translation has: what an AID without entries of its own gets.
const NO_AID: &str = "";

fn canonical(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

/// The key address of `ip`, as `udproutes::key_addr` and the programs
/// compare it.
fn key_addr(ip: IpAddr) -> [u8; 16] {
    match canonical(ip) {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// An address of each family that none of `named` is, standing for every
/// such address.
fn others(named: &BTreeSet<IpAddr>) -> [(u8, IpAddr); 2] {
    let v4 = (1..=u32::MAX)
        .map(|n| IpAddr::V4(Ipv4Addr::from(0x7fff_ffff - n)))
        .find(|a| !named.contains(a))
        .expect("fewer addresses named than exist");
    let v6 = (1..=u128::MAX)
        .map(|n| IpAddr::V6(Ipv6Addr::from(0x2001_0db8_u128 << 96 | n)))
        .find(|a| !named.contains(a))
        .expect("fewer addresses named than exist");
    [(CLASS_OTHER4, v4), (CLASS_OTHER6, v6)]
}

/// The classes of a port whose translations are bound to `named`: each of
/// those addresses, then every other of each family.
fn classes(named: &BTreeSet<IpAddr>) -> Vec<(u8, [u8; 16], IpAddr)> {
    let mut out: Vec<_> = named
        .iter()
        .map(|a| (CLASS_EXACT, key_addr(*a), *a))
        .collect();
    out.extend(others(named).map(|(class, a)| (class, [0; 16], a)));
    out
}

fn protocol_number(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => libc::IPPROTO_TCP as u8,
        Protocol::Udp => libc::IPPROTO_UDP as u8,
    }
}

fn conn_route(group: Group<'_>, port: u16) -> ConnRoute {
    let mut route = ConnRoute {
        action: PASS,
        count: 0,
        ports: [0; GROUP_MAX],
    };
    match group {
        Group::PassThrough => {}
        Group::Refused => route.action = REFUSE,
        Group::Members(members) => {
            if members.len() > GROUP_MAX {
                warn!(
                    port,
                    instances = members.len(),
                    "connects of one AID to port {port} spread over its first {GROUP_MAX} instances only"
                );
            }
            route.action = TO;
            for (slot, (_, real)) in route.ports.iter_mut().zip(&members) {
                *slot = *real;
            }
            route.count = members.len().min(GROUP_MAX) as u32;
        }
    }
    route
}

/// A connect entry's key before its asker is resolved to a cgroup id: the
/// asker's AID by name ([`NO_AID`] for any AID without entries of its own)
/// and the key with `aid` 0.
pub type NamedKey = (String, ClassKey);

/// [`Tables`] with askers by name: what a state says, before any cgroup is
/// looked at.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct NamedTables {
    pub connects: BTreeMap<NamedKey, ConnRoute>,
    pub names: BTreeMap<ClassKey, u32>,
}

/// The ports a plan covers.
#[derive(Clone, Copy)]
pub enum Ports<'a> {
    All,
    /// These (protocol, port) only: the entries of other ports depend on
    /// none of their translations.
    Only(&'a BTreeSet<(Protocol, u16)>),
}

impl Ports<'_> {
    fn covers(&self, protocol: Protocol, port: u16) -> bool {
        match self {
            Ports::All => true,
            Ports::Only(set) => set.contains(&(protocol, port)),
        }
    }
}

/// The (protocol, port) pairs whose entries a change from `before` to
/// `after` may alter: the virtual and real port of every translation that
/// one has and the other has not.
pub fn changed_ports(before: &RegistryState, after: &RegistryState) -> BTreeSet<(Protocol, u16)> {
    let mut out = BTreeSet::new();
    let mut note = |one: &RegistryState, other: &RegistryState| {
        let others: std::collections::HashSet<&Translation> = other.translations.iter().collect();
        for t in one.translations.iter().filter(|t| !others.contains(t)) {
            out.insert((t.protocol, t.virtual_port));
            out.insert((t.protocol, t.real_port));
        }
    };
    note(before, after);
    note(after, before);
    out
}

/// The maps' entries for `state`; `aids` gives each AID's cgroup id (an AID
/// without one has no entries of its own: its callers would not be found
/// in its cgroup).
pub fn plan(state: &RegistryState, aids: &BTreeMap<String, u64>) -> Tables {
    let named = plan_named(state, Ports::All);
    Tables {
        connects: named
            .connects
            .into_iter()
            .filter_map(|(key, route)| resolve(&key, aids).map(|key| (key, route)))
            .collect(),
        names: named.names,
        damaged: !state.damaged.is_empty(),
    }
}

/// `key` with its asker's cgroup id; `None` for an AID without one.
pub fn resolve((aid, key): &NamedKey, aids: &BTreeMap<String, u64>) -> Option<ClassKey> {
    let id = if aid == NO_AID { 0 } else { *aids.get(aid)? };
    Some(ClassKey { aid: id, ..*key })
}

/// The entries of `ports` for `state`, askers by name.
pub fn plan_named(state: &RegistryState, ports: Ports<'_>) -> NamedTables {
    let mut out = NamedTables::default();
    for protocol in [Protocol::Tcp, Protocol::Udp] {
        let number = protocol_number(protocol);
        let key = |class: u8, addr: [u8; 16], port: u16| ClassKey {
            aid: 0,
            addr,
            port: u32::from(port),
            protocol: number,
            class,
            pad: 0,
        };
        // The answers for a port depend on its translations alone (and
        // on damage): each is asked of a state holding just those, so a
        // change costs in proportion to the port's translations, not the
        // host's.
        let mut by_port: BTreeMap<u16, Vec<Translation>> = BTreeMap::new();
        let mut by_real: BTreeMap<u16, Vec<Translation>> = BTreeMap::new();
        for t in state.translations.iter().filter(|t| t.protocol == protocol) {
            if ports.covers(protocol, t.virtual_port) {
                by_port.entry(t.virtual_port).or_default().push(t.clone());
            }
            if t.real_port != t.virtual_port && ports.covers(protocol, t.real_port) {
                by_port.entry(t.real_port).or_default().push(t.clone());
            }
            if ports.covers(protocol, t.real_port) {
                by_real.entry(t.real_port).or_default().push(t.clone());
            }
        }
        let only = |translations: Vec<Translation>| RegistryState {
            translations,
            damaged: state.damaged.clone(),
            ..RegistryState::default()
        };
        for (port, on_port) in by_port {
            // A connect to a wildcard reaches the host itself: its own
            // class whatever the translations name.
            let mut named: BTreeSet<IpAddr> = on_port.iter().map(|t| canonical(t.addr)).collect();
            named.insert(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
            named.insert(IpAddr::V6(Ipv6Addr::UNSPECIFIED));
            let classes = classes(&named);
            let mut askers: BTreeSet<String> = on_port.iter().map(|t| t.aid.clone()).collect();
            askers.insert(NO_AID.to_owned());
            let port_state = only(on_port);
            for (class, addr, dest) in &classes {
                let groups = port_state.groups(protocol, *dest, port);
                for aid in &askers {
                    out.connects.insert(
                        (aid.clone(), key(*class, *addr, port)),
                        conn_route(groups.of(aid), port),
                    );
                }
            }
        }
        for (real, with_real) in by_real {
            let named: BTreeSet<IpAddr> = with_real.iter().map(|t| canonical(t.addr)).collect();
            let real_state = only(with_real);
            let names: Vec<(ClassKey, u32)> = classes(&named)
                .into_iter()
                .map(|(class, addr, local)| {
                    let v = real_state
                        .virtual_port_of(protocol, local, real)
                        .unwrap_or(real);
                    (key(class, addr, real), u32::from(v))
                })
                .collect();
            if names.iter().any(|(_, v)| *v != u32::from(real)) {
                out.names.extend(names);
            }
        }
    }
    out
}

/// What turns the maps' entries for one state into another's.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Diff {
    pub connects: Vec<(NamedKey, Option<ConnRoute>)>,
    pub names: Vec<(ClassKey, Option<u32>)>,
}

impl Diff {
    /// The AIDs whose cgroup ids the connect changes need.
    pub fn aids(&self) -> BTreeSet<&str> {
        self.connects
            .iter()
            .map(|((aid, _), _)| aid.as_str())
            .filter(|aid| *aid != NO_AID)
            .collect()
    }
}

/// The changes (a value to set, or `None` to remove) from `old`'s entries
/// to `new`'s.
pub fn diff(old: &NamedTables, new: &NamedTables) -> Diff {
    fn changes<K: Ord + Clone, V: PartialEq + Copy>(
        old: &BTreeMap<K, V>,
        new: &BTreeMap<K, V>,
    ) -> Vec<(K, Option<V>)> {
        let gone = old
            .keys()
            .filter(|k| !new.contains_key(*k))
            .map(|k| (k.clone(), None));
        let set = new
            .iter()
            .filter(|(k, v)| old.get(*k) != Some(*v))
            .map(|(k, v)| (k.clone(), Some(*v)));
        gone.chain(set).collect()
    }
    Diff {
        connects: changes(&old.connects, &new.connects),
        names: changes(&old.names, &new.names),
    }
}

/// The cgroup ids of the AIDs of `state`'s translations, their directories
/// made if missing (the programs compare ids, so each must exist); `None`
/// when one cannot be made.
pub fn aid_ids(root: &Path, tag: &str, state: &RegistryState) -> Option<BTreeMap<String, u64>> {
    ids_of(root, tag, state.translations.iter().map(|t| t.aid.as_str()))
}

/// [`aid_ids`] of the AIDs `aids`.
pub fn ids_of<'a>(
    root: &Path,
    tag: &str,
    aids: impl IntoIterator<Item = &'a str>,
) -> Option<BTreeMap<String, u64>> {
    use std::os::unix::fs::MetadataExt;
    let mut ids = BTreeMap::new();
    for aid in aids {
        if ids.contains_key(aid) {
            continue;
        }
        match crate::net::cgroup::ensure_aid_dir(root, tag, aid).and_then(std::fs::metadata) {
            Ok(m) => {
                ids.insert(aid.to_owned(), m.ino());
            }
            Err(e) => {
                warn!(aid, "routes not installed: creating the AID's cgroup: {e}");
                return None;
            }
        }
    }
    Some(ids)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::fixtures::{aids, state, translation};
    use appshot_vpm::Route;

    fn tcp(aid: &str, addr: &str, virtual_port: u16, real_port: u16, owner: &str) -> Translation {
        translation(Protocol::Tcp, aid, addr, virtual_port, real_port, owner)
    }

    /// What the programs find for a caller of cgroup `aid` connecting to
    /// `dest:port` over TCP: `lookup` of the program, in Rust.
    fn find<'t, V>(
        map: &'t BTreeMap<ClassKey, V>,
        aid: u64,
        dest: &str,
        port: u16,
    ) -> Option<&'t V> {
        let ip: IpAddr = dest.parse().unwrap();
        let v4 = matches!(canonical(ip), IpAddr::V4(_));
        for aid in [aid, 0] {
            let mut key = ClassKey {
                aid,
                addr: key_addr(ip),
                port: u32::from(port),
                protocol: libc::IPPROTO_TCP as u8,
                class: CLASS_EXACT,
                pad: 0,
            };
            if let Some(v) = map.get(&key) {
                return Some(v);
            }
            key.class = if v4 { CLASS_OTHER4 } else { CLASS_OTHER6 };
            key.addr = [0; 16];
            if let Some(v) = map.get(&key) {
                return Some(v);
            }
            if aid == 0 {
                break;
            }
        }
        None
    }

    /// The route the programs take, as a [`Route`] (`pick` as the shared
    /// counter would give it).
    fn kernel_route(t: &Tables, aid: u64, dest: &str, port: u16, pick: usize) -> Route {
        match find(&t.connects, aid, dest, port) {
            None if t.damaged => Route::Refused,
            None => Route::PassThrough,
            Some(r) if r.action == REFUSE => Route::Refused,
            Some(r) if r.action == PASS => Route::PassThrough,
            Some(r) => Route::To {
                real_port: r.ports[pick % r.count as usize],
                owner: String::new(),
            },
        }
    }

    fn without_owner(r: Route) -> Route {
        match r {
            Route::To { real_port, .. } => Route::To {
                real_port,
                owner: String::new(),
            },
            other => other,
        }
    }

    /// Every (AID, destination, port, pick) the kernel may be asked about
    /// gets the registry's own answer.
    fn assert_same_as_policy(s: &RegistryState) {
        let t = plan(s, &aids());
        let dests = [
            "127.0.0.1",
            "127.0.0.2",
            "127.9.9.9",
            "0.0.0.0",
            "::",
            "::1",
            "::ffff:127.0.0.1",
            "10.1.2.3",
            "fd00::5",
        ];
        let ports: BTreeSet<u16> = s
            .translations
            .iter()
            .flat_map(|t| [t.virtual_port, t.real_port, t.virtual_port + 1])
            .collect();
        for (aid, id) in [("a", 101), ("b", 102), ("c", 103), ("z", 999)] {
            for dest in dests {
                for &port in &ports {
                    for pick in 0..4 {
                        let ip: IpAddr = dest.parse().unwrap();
                        assert_eq!(
                            kernel_route(&t, id, dest, port, pick),
                            without_owner(s.route(Protocol::Tcp, ip, port, aid, pick)),
                            "aid {aid} to {dest}:{port} pick {pick}"
                        );
                    }
                    let ip: IpAddr = dest.parse().unwrap();
                    let kernel = find(&t.names, 0, dest, port)
                        .copied()
                        .unwrap_or(port.into());
                    let policy = s.virtual_port_of(Protocol::Tcp, ip, port).unwrap_or(port);
                    assert_eq!(kernel, u32::from(policy), "name of {dest}:{port}");
                }
            }
        }
    }

    #[test]
    fn the_kernel_answers_as_the_policy_for_wildcards_and_round_robin() {
        assert_same_as_policy(&state(vec![
            tcp("a", "0.0.0.0", 8080, 8080, "a1"),
            tcp("a", "0.0.0.0", 8080, 20001, "a2"),
            tcp("b", "0.0.0.0", 8080, 20002, "b1"),
            tcp("c", "0.0.0.0", 8080, 20003, "c1"),
        ]));
    }

    #[test]
    fn the_kernel_answers_as_the_policy_for_specific_and_dual_stack_addresses() {
        assert_same_as_policy(&state(vec![
            tcp("a", "::", 80, 20010, "a1"),
            tcp("a", "127.0.0.2", 80, 20011, "a2"),
            tcp("b", "127.0.0.1", 80, 80, "b1"),
            tcp("b", "::1", 80, 20012, "b2"),
            tcp("c", "::", 443, 20013, "c1"),
            tcp("c", "0.0.0.0", 443, 20014, "c1"),
        ]));
    }

    #[test]
    fn a_damaged_registry_refuses_what_it_cannot_tell() {
        let mut s = state(vec![tcp("a", "0.0.0.0", 8080, 20001, "a1")]);
        s.damaged.insert("lost".into());
        assert_same_as_policy(&s);
    }

    /// The maps `before` left, changed by `diff` as the TCP change hook
    /// changes them.
    fn changed(before: &RegistryState, after: &RegistryState) -> Tables {
        let mut maps = plan(before, &aids());
        let ports = changed_ports(before, after);
        let only = Ports::Only(&ports);
        let d = diff(&plan_named(before, only), &plan_named(after, only));
        for (key, route) in &d.connects {
            let Some(key) = resolve(key, &aids()) else {
                continue;
            };
            match route {
                Some(r) => maps.connects.insert(key, *r),
                None => maps.connects.remove(&key),
            };
        }
        for (key, name) in &d.names {
            match name {
                Some(v) => maps.names.insert(*key, *v),
                None => maps.names.remove(key),
            };
        }
        maps.damaged = !after.damaged.is_empty();
        maps
    }

    #[test]
    fn the_ports_a_change_touches_are_enough_to_reach_the_full_plan() {
        let udp = |aid, addr, v, r, owner| translation(Protocol::Udp, aid, addr, v, r, owner);
        let a1 = tcp("a", "0.0.0.0", 8080, 8080, "a1");
        let a2 = tcp("a", "0.0.0.0", 8080, 20001, "a2");
        let b1 = tcp("b", "0.0.0.0", 8080, 20002, "b1");
        let b1_exact = tcp("b", "127.0.0.2", 8080, 20002, "b1");
        let c1 = tcp("c", "::", 8080, 20003, "c1");
        let c2 = tcp("c", "::1", 443, 20004, "c2");
        let z1 = tcp("z", "0.0.0.0", 8080, 20005, "z1");
        let d1 = udp("a", "0.0.0.0", 53, 20053, "d1");
        // Starts and stops one by one, a socket rebound to an address of
        // its own, an AID without a cgroup, UDP beside TCP, and back to
        // nothing.
        let steps = [
            vec![],
            vec![a1.clone()],
            vec![a1.clone(), a2.clone()],
            vec![a1.clone(), a2.clone(), b1.clone()],
            vec![a1.clone(), a2.clone(), b1_exact.clone()],
            vec![a2.clone(), b1_exact.clone(), c1.clone(), c2.clone()],
            vec![
                a2.clone(),
                b1_exact.clone(),
                c1.clone(),
                c2.clone(),
                z1.clone(),
                d1.clone(),
            ],
            vec![b1.clone(), c2.clone(), z1.clone()],
            vec![c2.clone()],
            vec![],
        ];
        for pair in steps.windows(2) {
            let (before, after) = (state(pair[0].clone()), state(pair[1].clone()));
            assert_eq!(
                changed(&before, &after),
                plan(&after, &aids()),
                "from {:?} to {:?}",
                pair[0],
                pair[1]
            );
        }
    }

    #[test]
    fn a_change_touching_nothing_changes_nothing() {
        let s = state(vec![tcp("a", "0.0.0.0", 8080, 20001, "a1")]);
        assert!(changed_ports(&s, &s).is_empty());
        let named = plan_named(&s, Ports::Only(&BTreeSet::new()));
        assert_eq!(named, NamedTables::default());
    }

    #[test]
    fn another_aids_real_port_is_refused_and_its_own_passes() {
        let s = state(vec![tcp("a", "0.0.0.0", 8080, 20001, "a1")]);
        let t = plan(&s, &aids());
        assert_eq!(kernel_route(&t, 102, "127.0.0.1", 20001, 0), Route::Refused);
        assert_eq!(
            kernel_route(&t, 101, "127.0.0.1", 20001, 0),
            Route::PassThrough
        );
        assert_eq!(
            kernel_route(&t, 101, "127.0.0.1", 8080, 0),
            Route::To {
                real_port: 20001,
                owner: String::new()
            }
        );
        assert_eq!(find(&t.names, 0, "127.0.0.1", 20001), Some(&8080));
    }
}
