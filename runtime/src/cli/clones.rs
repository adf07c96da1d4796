//! `appshot clone` of many: which AID and name each clone gets, and
//! starting their supervisors side by side from one command.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::bail;

use crate::cli::detach::{self, Started, Starting};
use appshot::supervisor::Launch;

/// The AID and name of each clone, from `--aid` (repeatable), `--name`
/// (repeatable) and `--count`: one `--aid` (or `--name`) for N clones
/// numbers it `AID-1` … `AID-N`; several give one clone each. The name
/// defaults to the clone's AID.
pub fn plan(
    aids: &[String],
    names: &[String],
    count: Option<u32>,
) -> anyhow::Result<Vec<(String, String)>> {
    let count = match (count, aids.len()) {
        (Some(0), _) => bail!("--count 0: nothing to clone"),
        (Some(n), 1) => n as usize,
        (Some(n), k) if n as usize == k => k,
        (Some(n), k) => bail!(
            "--count {n} with {k} --aid: give one --aid (the clones get AID-1 … AID-{n}) or one per clone"
        ),
        (None, k) => k,
    };
    let numbered = |base: &str| -> Vec<String> {
        if count == 1 {
            vec![base.to_string()]
        } else {
            (1..=count).map(|i| format!("{base}-{i}")).collect()
        }
    };
    let clone_aids = match aids {
        [one] => numbered(one),
        many => many.to_vec(),
    };
    let clone_names = match names {
        [] => clone_aids.clone(),
        [one] => numbered(one),
        many if many.len() == count => many.to_vec(),
        many => bail!(
            "{} --name for {count} clones: give one (the clones get NAME-1 … NAME-{count}) or one per clone",
            many.len()
        ),
    };
    let mut seen = BTreeSet::new();
    if let Some(twice) = clone_names.iter().find(|n| !seen.insert(*n)) {
        bail!("two clones would be named `{twice}`: give each its own --name");
    }
    Ok(clone_aids.into_iter().zip(clone_names).collect())
}

/// How many supervisors start at once: more only queue for the CPUs (a
/// clone's start is mostly CPU work: three execs and the restore), fewer
/// leave them idle while one waits on the registry lock or the disk.
/// Measured on 2 CPUs, 100 clones of http.server, release build, run dir
/// on tmpfs: 1 at a time 2.2 s, 2: 2.3 s, 4: 1.4 s, 8: 1.5 s, 16: 1.7 s,
/// all 100: 1.4 s.
fn window() -> usize {
    std::thread::available_parallelism().map_or(2, |n| 2 * n.get())
}

/// Starts a detached supervisor for each launch, a few at a time, and
/// waits for each to answer. The names of the clones that run are printed
/// in order, one a line; each one that failed is reported with why, and
/// left nothing running (a supervisor that failed removed its namespace
/// and registry entries; one overdue is killed, taking its instance with
/// it). The clones that run go on running when others failed: the error
/// names both sets, so the operator can stop them or clone the rest.
pub fn start_all(launches: &[Launch], verbose: u8) -> anyhow::Result<i32> {
    let (tx, rx) = std::sync::mpsc::channel();
    let mut outcomes: Vec<Option<anyhow::Result<()>>> = launches.iter().map(|_| None).collect();
    let mut pending: BTreeMap<usize, Starting> = BTreeMap::new();
    let mut next = launches.iter().enumerate();
    let window = window();
    loop {
        while pending.len() < window {
            let Some((i, launch)) = next.next() else {
                break;
            };
            match detach::spawn(launch, verbose, i, &tx) {
                Ok(starting) => {
                    pending.insert(i, starting);
                }
                Err(e) => outcomes[i] = Some(Err(e)),
            }
        }
        let Some(deadline) = pending.values().map(Starting::deadline).min() else {
            break;
        };
        match detach::next_answer(&rx, deadline) {
            Some((i, answer)) => {
                if let Some(starting) = pending.remove(&i) {
                    outcomes[i] = Some(ended(starting, Some(answer)));
                }
            }
            None => {
                let now = std::time::Instant::now();
                let overdue: Vec<usize> = pending
                    .iter()
                    .filter(|(_, s)| s.deadline() <= now)
                    .map(|(i, _)| *i)
                    .collect();
                for i in overdue {
                    let starting = pending.remove(&i).expect("pending start");
                    outcomes[i] = Some(ended(starting, None));
                }
            }
        }
    }
    let mut running = Vec::new();
    let mut failed = Vec::new();
    for (launch, outcome) in launches.iter().zip(outcomes) {
        match outcome.expect("every start has ended") {
            Ok(()) => {
                println!("{}", launch.name);
                running.push(launch.name.as_str());
            }
            Err(e) => {
                eprintln!("appshot: clone `{}`: {e:#}", launch.name);
                failed.push(launch.name.as_str());
            }
        }
    }
    if failed.is_empty() {
        return Ok(0);
    }
    let runs = match running.as_slice() {
        [] => "none runs".to_string(),
        names => format!("{} run: {}", names.len(), names.join(" ")),
    };
    bail!(
        "{} of {} clones failed to start ({}) and left nothing running; {runs}",
        failed.len(),
        launches.len(),
        failed.join(" ")
    )
}

/// A clone's start as a result: it runs, or the reason it does not.
fn ended(starting: Starting, answer: Option<String>) -> anyhow::Result<()> {
    let name = starting.name().to_string();
    match starting.finish(answer)? {
        Started::Running => Ok(()),
        // A restore executes nothing; said all the same if it ever does.
        Started::NotExecuted { status, output } => {
            bail!(
                "instance `{name}` could not be started ({status}):\n{}",
                output.trim_end()
            )
        }
        Started::Refused { message, .. } => bail!(message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(a, n)| (a.to_string(), n.to_string()))
            .collect()
    }

    #[test]
    fn one_aid_is_numbered_and_names_follow_it() {
        let p = plan(&strings(&["web"]), &[], None).unwrap();
        assert_eq!(p, pairs(&[("web", "web")]));
        let p = plan(&strings(&["web"]), &[], Some(3)).unwrap();
        assert_eq!(
            p,
            pairs(&[("web-1", "web-1"), ("web-2", "web-2"), ("web-3", "web-3")])
        );
        let p = plan(&strings(&["web"]), &strings(&["w"]), Some(2)).unwrap();
        assert_eq!(p, pairs(&[("web-1", "w-1"), ("web-2", "w-2")]));
        let p = plan(&strings(&["web"]), &strings(&["w"]), Some(1)).unwrap();
        assert_eq!(p, pairs(&[("web", "w")]));
    }

    #[test]
    fn repeated_aids_and_names_give_one_clone_each() {
        let p = plan(&strings(&["a", "b"]), &[], None).unwrap();
        assert_eq!(p, pairs(&[("a", "a"), ("b", "b")]));
        let p = plan(&strings(&["a", "b"]), &strings(&["x", "y"]), Some(2)).unwrap();
        assert_eq!(p, pairs(&[("a", "x"), ("b", "y")]));
        let p = plan(&strings(&["a", "b"]), &strings(&["s"]), None).unwrap();
        assert_eq!(p, pairs(&[("a", "s-1"), ("b", "s-2")]));
        // One AID group of several clones: named apart.
        let p = plan(&strings(&["g"]), &strings(&["x", "y", "z"]), Some(3)).unwrap();
        assert_eq!(p, pairs(&[("g-1", "x"), ("g-2", "y"), ("g-3", "z")]));
        let p = plan(&strings(&["g", "g"]), &strings(&["x", "y"]), None).unwrap();
        assert_eq!(p, pairs(&[("g", "x"), ("g", "y")]));
    }

    #[test]
    fn conflicting_flags_are_refused() {
        for (aids, names, count, says) in [
            (vec!["a"], vec![], Some(0), "nothing to clone"),
            (vec!["a", "b"], vec![], Some(3), "--count 3 with 2 --aid"),
            (vec!["a"], vec!["x", "y"], Some(3), "2 --name for 3 clones"),
            (vec!["a", "b", "c"], vec!["x", "y"], None, "2 --name for 3"),
            (
                vec!["g", "g"],
                vec![],
                None,
                "two clones would be named `g`",
            ),
            (vec!["a"], vec!["x", "x"], Some(2), "named `x`"),
        ] {
            let e = plan(&strings(&aids), &strings(&names), count)
                .unwrap_err()
                .to_string();
            assert!(e.contains(says), "{aids:?} {names:?} {count:?}: {e}");
        }
    }
}
