//! Source rules for clients outside appshot (non-cooperative multiplexing):
//! a client that runs under no VPM connects to the fixed port V; the
//! kernel's nftables rewrites the destination of its connection to the real
//! port of the instance its source address belongs to (NAT: headers and
//! checksums rewritten in the kernel, no userland copy, and the instance
//! sees the client's real source address).
//!
//! Each instance owns three chains in `table inet appshot`, named after
//! the registry and the instance so that whoever reclaims a dead instance
//! can delete exactly them:
//!
//! - `…/src`, nat prerouting at dstnat (-100): the instance's own rules.
//! - `…/dflt`, nat prerouting at dstnat+10: the catch-all of the default
//!   AID. The kernel stops at the first nat chain that sets up a mapping,
//!   so every specific rule of every instance is tried before it.
//! - `…/rst`, filter input: resets connections still addressed to V, i.e.
//!   sources that no rule (or no running instance of their AID) took.
//!
//! The plan is pure and unit-tested; applying it runs `nft -f -`.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use appshot_configurator::{Cidr, SourceRule};
use appshot_vpm::{Protocol, Registry, RegistryState, SourceRuleRecord, Translation};
use tracing::{info, warn};

use crate::error::chain;

pub const TABLE: &str = "inet appshot";
/// The run directory's markers of instances that may have chains in the
/// kernel: one is created before an instance's chains are installed and
/// removed after they are, so that a reclaim runs `nft` only for a name
/// that has one. (Asking `nft` about every name cost every supervisor's
/// start about 10 ms, under the registry lock.)
const MARKERS: &str = "sourcerules";
/// Sorts the default catch-all after every instance's specific rules.
const SPECIFIC_PRIORITY: i32 = -100;
const DEFAULT_PRIORITY: i32 = -90;

/// What the configuration says about outside clients.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    pub rules: Vec<SourceRule>,
    pub default_aid: Option<String>,
}

impl Policy {
    /// Whether any kernel rules are wanted at all; without, the fixed port
    /// behaves as on a host without source rules.
    pub fn active(&self) -> bool {
        !self.rules.is_empty() || self.default_aid.is_some()
    }

    /// Rules in the order the kernel must try them: most specific first
    /// (fewer host bits, then with a source port), the file's order
    /// otherwise. Rules of different families never overlap, so comparing
    /// host bits across them is harmless.
    fn ordered(&self) -> Vec<&SourceRule> {
        let mut rules: Vec<&SourceRule> = self.rules.iter().collect();
        rules.sort_by_key(|r| {
            let width = if r.source.is_ipv4() { 32 } else { 128 };
            (width - r.source.prefix(), r.source_port.is_none())
        });
        rules
    }
}

/// Where the kernel sends a connection for one family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    /// To the real port on the address the packet arrived at: the instance
    /// listens on the unspecified address.
    Redirect(u16),
    /// To a specific address the instance bound.
    Dnat(IpAddr, u16),
}

impl Target {
    fn real_port(&self) -> u16 {
        match self {
            Target::Redirect(p) | Target::Dnat(_, p) => *p,
        }
    }

    fn statement(&self) -> String {
        match self {
            Target::Redirect(p) => format!("redirect to :{p}"),
            Target::Dnat(IpAddr::V4(a), p) => format!("dnat ip to {a}:{p}"),
            Target::Dnat(IpAddr::V6(a), p) => format!("dnat ip6 to [{a}]:{p}"),
        }
    }
}

/// The listening sockets of one virtual port that outside clients can
/// reach, per family.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Targets {
    v4: Option<Target>,
    v6: Option<Target>,
}

impl Targets {
    fn of(translations: &[&Translation]) -> Targets {
        let find = |want: &dyn Fn(IpAddr) -> bool| {
            translations.iter().find(|t| want(t.addr)).map(|t| {
                if t.addr.is_unspecified() {
                    Target::Redirect(t.real_port)
                } else {
                    Target::Dnat(t.addr.to_canonical(), t.real_port)
                }
            })
        };
        let specific = |v4: bool| {
            move |a: IpAddr| {
                let a = a.to_canonical();
                a.is_ipv4() == v4 && !a.is_unspecified() && !a.is_loopback()
            }
        };
        let v4 = find(&|a| a == IpAddr::from([0, 0, 0, 0]))
            // `::` is dual-stack unless the app said otherwise.
            .or_else(|| find(&|a| a.is_ipv6() && a.is_unspecified()))
            .or_else(|| find(&specific(true)));
        let v6 = find(&|a| a.is_ipv6() && a.is_unspecified()).or_else(|| find(&specific(false)));
        Targets { v4, v6 }
    }

    fn get(&self, v4: bool) -> Option<Target> {
        if v4 {
            self.v4
        } else {
            self.v6
        }
    }
}

/// The kernel rules and registry records of one instance.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Rules of the `src`, `dflt` and `rst` chains.
    pub specific: Vec<String>,
    pub default: Vec<String>,
    pub reset: Vec<String>,
    pub records: Vec<SourceRuleRecord>,
}

fn matcher(
    source: &Cidr,
    source_port: Option<u16>,
    protocol: Protocol,
    virtual_port: u16,
) -> String {
    let family = if source.is_ipv4() { "ip" } else { "ip6" };
    let mut m = format!("{family} saddr {source}");
    if let Some(p) = source_port {
        let _ = write!(m, " {protocol} sport {p}");
    }
    let _ = write!(m, " {protocol} dport {virtual_port}");
    m
}

/// Plans the chains of instance `owner` (AID `aid`) from its translations.
/// A rule names the AID that serves a source, whatever the protocol: it
/// applies to the instance's TCP and UDP ports alike. What no rule takes
/// is refused as a closed port would be: TCP with a reset, UDP with ICMP
/// port unreachable.
pub fn plan(policy: &Policy, owner: &str, aid: &str, translations: &[Translation]) -> Plan {
    let mut out = Plan::default();
    if !policy.active() {
        return out;
    }
    let mut ports: Vec<(Protocol, u16)> = translations
        .iter()
        .map(|t| (t.protocol, t.virtual_port))
        .collect();
    ports.sort_unstable();
    ports.dedup();
    let ordered = policy.ordered();
    for &(protocol, v) in &ports {
        let socks: Vec<&Translation> = translations
            .iter()
            .filter(|t| t.protocol == protocol && t.virtual_port == v)
            .collect();
        let targets = Targets::of(&socks);
        let record = |source: String, source_port, real_port| SourceRuleRecord {
            owner: owner.to_owned(),
            aid: aid.to_owned(),
            protocol,
            source,
            source_port,
            virtual_port: v,
            real_port,
        };

        // Specific rules: ours redirect; a more specific rule of another
        // AID that a later rule of ours overlaps must return first, so the
        // most specific rule wins whichever chain the kernel tries first.
        for (i, rule) in ordered.iter().enumerate() {
            let target = targets.get(rule.source.is_ipv4());
            if rule.aid == aid {
                if let Some(target) = target {
                    out.specific.push(format!(
                        "{} {}",
                        matcher(&rule.source, rule.source_port, protocol, v),
                        target.statement()
                    ));
                    out.records.push(record(
                        rule.source.to_string(),
                        rule.source_port,
                        Some(target.real_port()),
                    ));
                }
            } else {
                let shadowed = ordered[i + 1..].iter().any(|later| {
                    later.aid == aid
                        && later.overlaps(rule)
                        && targets.get(later.source.is_ipv4()).is_some()
                });
                if shadowed {
                    out.specific.push(format!(
                        "{} return",
                        matcher(&rule.source, rule.source_port, protocol, v)
                    ));
                }
            }
        }

        if policy.default_aid.as_deref() == Some(aid) {
            for rule in ordered.iter().filter(|r| r.aid != aid) {
                out.default.push(format!(
                    "{} return",
                    matcher(&rule.source, rule.source_port, protocol, v)
                ));
            }
            for (v4, nfproto) in [(true, "ipv4"), (false, "ipv6")] {
                if let Some(target) = targets.get(v4) {
                    out.default.push(format!(
                        "meta nfproto {nfproto} {protocol} dport {v} {}",
                        target.statement()
                    ));
                    let source = if v4 { "0.0.0.0/0" } else { "::/0" };
                    out.records.push(record(
                        format!("{source} (default)"),
                        None,
                        Some(target.real_port()),
                    ));
                }
            }
        } else if policy.default_aid.is_none() {
            out.records.push(SourceRuleRecord {
                aid: "-".into(),
                ..record("unmatched".into(), None, None)
            });
        }
        out.reset.push(match protocol {
            Protocol::Tcp => format!("tcp dport {v} reject with tcp reset"),
            Protocol::Udp => format!("udp dport {v} reject"),
        });
    }
    out
}

/// The chain names of `owner` in the registry at `registry_dir`. Instance
/// names are unique per registry only; the tag keeps two registries on one
/// host (two run dirs) apart.
pub fn chains(registry_dir: &Path, owner: &str) -> [String; 3] {
    let tag = registry_tag(registry_dir);
    ["src", "dflt", "rst"].map(|kind| format!("as_{tag}/{owner}/{kind}"))
}

/// FNV-1a of the registry's path: stable across builds (unlike std's
/// hasher), which matters because another appshot may reclaim our chains.
pub(crate) fn registry_tag(dir: &Path) -> String {
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let mut h: u32 = 0x811c_9dc5;
    for b in dir.as_os_str().as_encoded_bytes() {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    format!("{h:08x}")
}

/// The `nft -f` script that replaces the instance's chains with `plan`.
pub fn install_script(chains: &[String; 3], plan: &Plan) -> String {
    let mut s = format!("add table {TABLE}\n");
    let specs = [
        format!("type nat hook prerouting priority {SPECIFIC_PRIORITY}"),
        format!("type nat hook prerouting priority {DEFAULT_PRIORITY}"),
        "type filter hook input priority 0".to_string(),
    ];
    let rules = [&plan.specific, &plan.default, &plan.reset];
    for ((chain, spec), rules) in chains.iter().zip(&specs).zip(rules) {
        let _ = writeln!(
            s,
            "add chain {TABLE} {chain} {{ {spec} ; policy accept ; }}"
        );
        let _ = writeln!(s, "flush chain {TABLE} {chain}");
        for rule in rules {
            let _ = writeln!(s, "add rule {TABLE} {chain} {rule}");
        }
    }
    s
}

/// Deletes the chains whether or not they exist (nft 1.0.6 has no
/// `destroy`): adding first makes the deletion always valid, and the
/// script is one transaction.
pub fn removal_script(chains: &[String; 3]) -> String {
    let mut s = format!("add table {TABLE}\n");
    for chain in chains {
        let _ = writeln!(s, "add chain {TABLE} {chain}");
        let _ = writeln!(s, "delete chain {TABLE} {chain}");
    }
    s
}

/// Why nftables did not take a script.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("running nft (is the nftables package installed?)")]
    Spawn(#[source] std::io::Error),
    #[error("writing the script to nft")]
    Write(#[source] std::io::Error),
    #[error("waiting for nft")]
    Wait(#[source] std::io::Error),
    #[error("nft failed ({status}): {stderr}")]
    Refused {
        status: std::process::ExitStatus,
        stderr: String,
    },
}

/// Why an instance's source rules were not installed.
#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    #[error("the registry")]
    Registry(#[from] appshot_vpm::VpmError),
    #[error("marking {} as holding chains", path.display())]
    Marker {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Nft(#[from] NftError),
}

pub(crate) fn nft(script: &str) -> Result<(), NftError> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(NftError::Spawn)?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(script.as_bytes())
        .map_err(NftError::Write)?;
    let out = child.wait_with_output().map_err(NftError::Wait)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NftError::Refused {
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Brings the kernel and the registry in line with the instance's current
/// translations. Runs inside a registry transaction so that a reclaim of
/// the same name cannot interleave.
pub fn refresh(registry: &Registry, policy: &Policy, owner: &str, aid: &str) {
    if !policy.active() {
        return;
    }
    let chains = chains(registry.dir(), owner);
    let result = registry.transaction(|state: &mut RegistryState| {
        let mine: Vec<Translation> = state.translations_of(owner).cloned().collect();
        let plan = plan(policy, owner, aid, &mine);
        let path = registry.private_subdir(MARKERS)?.join(owner);
        std::fs::write(&path, b"").map_err(|source| RulesError::Marker { path, source })?;
        nft(&install_script(&chains, &plan))?;
        state.source_rules.retain(|r| r.owner != owner);
        state.source_rules.extend(plan.records.iter().cloned());
        Ok::<usize, RulesError>(plan.specific.len() + plan.default.len())
    });
    match result {
        Ok(Ok(n)) => info!(instance = %owner, rules = n, "source rules installed"),
        Ok(Err(e)) => warn!(
            instance = %owner,
            "source rules not installed, outside clients cannot reach this instance: {}",
            chain(&e)
        ),
        Err(e) => warn!(instance = %owner, "source rules not installed: {e}"),
    }
}

/// Removes the instance's chains (the registry records go with the
/// instance's other entries).
pub fn remove(registry_dir: &Path, owner: &str) {
    match nft(&removal_script(&chains(registry_dir, owner))) {
        Ok(()) => {
            let _ = std::fs::remove_file(marker(registry_dir, owner));
        }
        // The marker stays: a later reclaim tries again.
        Err(e) => warn!(instance = %owner, "removing source rules: {}", chain(&e)),
    }
}

fn marker(registry_dir: &Path, owner: &str) -> std::path::PathBuf {
    registry_dir.join(MARKERS).join(owner)
}

/// The registry's reclaim hook: chains of supervisors that died.
pub fn reclaim(registry_dir: &Path, names: &[String]) {
    // Only names that may have chains: most instances never had any, and
    // their supervisors start without waiting for an nft.
    let names: Vec<&String> = names
        .iter()
        .filter(|n| marker(registry_dir, n).exists())
        .collect();
    if names.is_empty() {
        return;
    }
    // Hosts that never used source rules have no table: nothing to do.
    let listed = Command::new("nft")
        .args(["list", "table", "inet", "appshot"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output();
    let Ok(out) = listed else { return };
    // No table: no chains, and nothing for the markers to stand for.
    let text = match out.status.success() {
        true => String::from_utf8_lossy(&out.stdout).into_owned(),
        false => String::new(),
    };
    for name in names {
        let chains = chains(registry_dir, name);
        if chains.iter().any(|c| text.contains(&format!("chain {c} "))) {
            warn!(instance = %name, "removing source rules of a dead instance");
            remove(registry_dir, name);
        } else {
            let _ = std::fs::remove_file(marker(registry_dir, name));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use appshot_vpm::Protocol;

    fn rule(source: &str, port: Option<u16>, aid: &str) -> SourceRule {
        SourceRule {
            source: source.parse().unwrap(),
            source_port: port,
            aid: aid.into(),
        }
    }

    fn tcp(addr: &str, virtual_port: u16, real_port: u16) -> Translation {
        Translation {
            protocol: Protocol::Tcp,
            addr: addr.parse().unwrap(),
            virtual_port,
            aid: "x".into(),
            real_port,
            owner: "x".into(),
            socket_inode: u64::from(real_port),
        }
    }

    fn policy(default_aid: Option<&str>) -> Policy {
        Policy {
            rules: vec![
                rule("10.9.0.0/24", None, "b"),
                rule("10.9.0.7", None, "c"),
                rule("fd00::/64", Some(5000), "b"),
            ],
            default_aid: default_aid.map(Into::into),
        }
    }

    #[test]
    fn no_policy_no_rules() {
        let p = plan(&Policy::default(), "web-b", "b", &[tcp("::", 9000, 20001)]);
        assert_eq!(p, Plan::default());
    }

    #[test]
    fn an_instance_redirects_its_sources_and_returns_more_specific_others() {
        let p = plan(&policy(None), "web-b", "b", &[tcp("::", 9000, 20001)]);
        assert_eq!(
            p.specific,
            [
                "ip saddr 10.9.0.7/32 tcp dport 9000 return",
                "ip saddr 10.9.0.0/24 tcp dport 9000 redirect to :20001",
                "ip6 saddr fd00::/64 tcp sport 5000 tcp dport 9000 redirect to :20001",
            ]
        );
        assert!(p.default.is_empty());
        assert_eq!(p.reset, ["tcp dport 9000 reject with tcp reset"]);
        let shown: Vec<(&str, Option<u16>)> = p
            .records
            .iter()
            .map(|r| (r.source.as_str(), r.real_port))
            .collect();
        assert_eq!(
            shown,
            [
                ("10.9.0.0/24", Some(20001)),
                ("fd00::/64", Some(20001)),
                ("unmatched", None)
            ]
        );
    }

    #[test]
    fn the_most_specific_rule_needs_no_returns() {
        let p = plan(&policy(None), "web-c", "c", &[tcp("0.0.0.0", 9000, 20002)]);
        assert_eq!(
            p.specific,
            ["ip saddr 10.9.0.7/32 tcp dport 9000 redirect to :20002"]
        );
    }

    #[test]
    fn the_default_aid_takes_what_no_other_rule_names() {
        let p = plan(&policy(Some("a")), "web-a", "a", &[tcp("::", 9000, 20000)]);
        assert!(p.specific.is_empty(), "{:?}", p.specific);
        assert_eq!(
            p.default,
            [
                "ip saddr 10.9.0.7/32 tcp dport 9000 return",
                "ip saddr 10.9.0.0/24 tcp dport 9000 return",
                "ip6 saddr fd00::/64 tcp sport 5000 tcp dport 9000 return",
                "meta nfproto ipv4 tcp dport 9000 redirect to :20000",
                "meta nfproto ipv6 tcp dport 9000 redirect to :20000",
            ]
        );
        assert_eq!(p.reset.len(), 1);
        // With a default, there is no "unmatched: reset" row.
        assert!(p.records.iter().all(|r| r.real_port.is_some()));
    }

    #[test]
    fn targets_follow_the_bound_address() {
        // IPv4-only listener: IPv6 rules have nowhere to go.
        let p = plan(&policy(None), "web-b", "b", &[tcp("0.0.0.0", 9000, 20001)]);
        assert_eq!(
            p.specific,
            [
                "ip saddr 10.9.0.7/32 tcp dport 9000 return",
                "ip saddr 10.9.0.0/24 tcp dport 9000 redirect to :20001"
            ]
        );
        // A specific address: dnat to it.
        let p = plan(
            &policy(None),
            "web-b",
            "b",
            &[tcp("10.200.1.1", 9000, 20001), tcp("fd00::1", 9000, 20003)],
        );
        assert_eq!(
            p.specific[1..],
            [
                "ip saddr 10.9.0.0/24 tcp dport 9000 dnat ip to 10.200.1.1:20001",
                "ip6 saddr fd00::/64 tcp sport 5000 tcp dport 9000 dnat ip6 to [fd00::1]:20003",
            ]
        );
        // Loopback is out of reach from outside.
        let p = plan(
            &policy(None),
            "web-b",
            "b",
            &[tcp("127.0.0.1", 9000, 20001)],
        );
        assert!(p.specific.is_empty());
        assert_eq!(p.reset.len(), 1);
    }

    #[test]
    fn every_virtual_port_gets_its_rules() {
        let p = plan(
            &Policy {
                rules: vec![rule("10.9.0.0/24", None, "b")],
                default_aid: None,
            },
            "web-b",
            "b",
            &[tcp("::", 9000, 20001), tcp("::", 8080, 20004)],
        );
        assert_eq!(
            p.specific,
            [
                "ip saddr 10.9.0.0/24 tcp dport 8080 redirect to :20004",
                "ip saddr 10.9.0.0/24 tcp dport 9000 redirect to :20001"
            ]
        );
        assert_eq!(p.reset.len(), 2);
    }

    #[test]
    fn udp_ports_get_the_same_rules_and_a_closed_port_answer() {
        let mut dns = tcp("0.0.0.0", 53, 20007);
        dns.protocol = Protocol::Udp;
        let p = plan(
            &Policy {
                rules: vec![rule("10.9.0.0/24", Some(4000), "b")],
                default_aid: Some("b".into()),
            },
            "dns-b",
            "b",
            &[tcp("0.0.0.0", 53, 20008), dns],
        );
        assert_eq!(
            p.specific,
            [
                "ip saddr 10.9.0.0/24 tcp sport 4000 tcp dport 53 redirect to :20008",
                "ip saddr 10.9.0.0/24 udp sport 4000 udp dport 53 redirect to :20007",
            ]
        );
        assert_eq!(
            p.default,
            [
                "meta nfproto ipv4 tcp dport 53 redirect to :20008",
                "meta nfproto ipv4 udp dport 53 redirect to :20007",
            ]
        );
        assert_eq!(
            p.reset,
            ["tcp dport 53 reject with tcp reset", "udp dport 53 reject"]
        );
        assert!(p.records.iter().any(|r| r.protocol == Protocol::Udp));
    }

    #[test]
    fn scripts_name_the_instance_chains() {
        let chains = chains(Path::new("/run/appshot-test"), "web-b");
        assert!(chains[0].starts_with("as_") && chains[0].ends_with("/web-b/src"));
        assert_ne!(chains, super::chains(Path::new("/run/other"), "web-b"));
        let plan = plan(&policy(None), "web-b", "b", &[tcp("::", 9000, 20001)]);
        let script = install_script(&chains, &plan);
        assert!(script.starts_with("add table inet appshot\n"));
        assert!(script.contains(&format!(
            "add chain inet appshot {} {{ type nat hook prerouting priority -100 ; policy accept ; }}\nflush chain inet appshot {}\n",
            chains[0], chains[0]
        )));
        assert!(script.contains(&format!(
            "add rule inet appshot {} tcp dport 9000 reject with tcp reset\n",
            chains[2]
        )));
        let removal = removal_script(&chains);
        assert_eq!(removal.matches("delete chain").count(), 3);
    }
}
