//! One module per benchmark. Each runs its configurations interleaved
//! (`measure::interleaved`) and turns the measurements into table rows.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::appshot::Appshot;
use crate::measure::{Measurement, Plan, Trial};
use crate::net::PortPool;
use crate::procs;
use crate::table::Row;

mod connrate;
mod criu;
mod iperf;
mod nginx;
mod oci;
mod redis;
mod redisconns;
mod sandlock;
mod servers;
mod snapshot;
mod syscall;
mod udp;

/// What every benchmark gets.
pub struct Ctx<'a> {
    pub plan: &'a Plan,
    pub appshot: &'a Appshot,
    pub ports: PortPool,
    /// Scratch space: probe binaries, server logs, redis working dirs.
    pub work: &'a Path,
}

impl Ctx<'_> {
    pub fn logs(&self) -> PathBuf {
        self.work.join("logs")
    }
}

#[derive(Default)]
pub struct Outcome {
    pub rows: Vec<Row>,
    pub measurements: Vec<Measurement>,
}

impl Outcome {
    /// Adds the measurements `m`, native and appshot first, and the row of
    /// appshot against native, as `configuration`.
    pub fn add_against_native(
        &mut self,
        benchmark: &str,
        configuration: &str,
        m: Vec<Measurement>,
    ) {
        let row = Row::compared(benchmark, configuration, "native", &m[0], &m[1]);
        self.rows.push(row);
        self.measurements.extend(m);
    }
}

pub struct Benchmark {
    /// For `--only`.
    pub name: &'static str,
    pub title: &'static str,
    /// Programs it needs on PATH.
    pub needs: &'static [&'static str],
    pub run: fn(&mut Ctx<'_>) -> anyhow::Result<Outcome>,
}

pub const ALL: &[Benchmark] = &[
    Benchmark {
        name: "syscall",
        title: syscall::TITLE,
        needs: &["gcc"],
        run: syscall::run,
    },
    Benchmark {
        name: "connrate",
        title: connrate::TITLE,
        needs: &["gcc", "socat"],
        run: connrate::run,
    },
    Benchmark {
        name: "iperf",
        title: iperf::TITLE,
        needs: &["iperf3", "socat"],
        run: iperf::run,
    },
    Benchmark {
        name: "udp",
        title: udp::TITLE,
        needs: &["gcc", "iperf3"],
        run: udp::run,
    },
    Benchmark {
        name: "redis",
        title: redis::TITLE,
        needs: &["redis-server", "redis-benchmark"],
        run: redis::run,
    },
    Benchmark {
        name: "snapshot",
        title: snapshot::TITLE,
        needs: &["gcc"],
        run: snapshot::run,
    },
    Benchmark {
        name: "oci",
        title: oci::TITLE,
        needs: &["gcc", "runc"],
        run: oci::run,
    },
    Benchmark {
        name: "redisconns",
        title: redisconns::TITLE,
        needs: &["redis-server", "python3"],
        run: redisconns::run,
    },
    Benchmark {
        name: "nginx",
        title: nginx::TITLE,
        needs: &["gcc", "nginx"],
        run: nginx::run,
    },
];

pub fn names() -> Vec<&'static str> {
    ALL.iter().map(|b| b.name).collect()
}

/// `CI=true`: a peer that cannot be measured fails the benchmark there.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// `argv` as owned strings, for `Command` and `Appshot`.
pub fn argv<I, S>(parts: I) -> Vec<String>
where
    I: IntoIterator<Item = S>,
    S: ToString,
{
    parts.into_iter().map(|p| p.to_string()).collect()
}

/// A benchmark's client: each run of a trial runs it to its end, natively
/// or under appshot as `aid`, and `figure` of its output is the run's
/// figure.
/// The configuration of a client run with `--routing notified`: its
/// supervisor decides connect, getsockname and getpeername, notified of
/// each (the default is the kernel's cgroup programs).
pub const NOTIFIED_ROUTING: &str = "appshot --routing notified";

#[derive(Clone, Copy)]
pub struct Client<'a, F> {
    pub appshot: &'a Appshot,
    pub aid: &'a str,
    pub timeout: Duration,
    pub figure: F,
}

impl<'a, F> Client<'a, F>
where
    F: Fn(&str) -> anyhow::Result<f64> + Copy + 'a,
{
    /// The trial `configuration`: `argv` run natively; `what` names the
    /// client in errors.
    pub fn native(self, configuration: &str, argv: Vec<String>, what: &'a str) -> Trial<'a> {
        Trial::new(configuration, move || {
            let out = procs::run(&mut procs::command(&argv), what, self.timeout)?;
            (self.figure)(&out)
        })
    }

    /// The trial "appshot": `argv` run under appshot as the AID.
    pub fn appshot(self, argv: Vec<String>, what: &'a str) -> Trial<'a> {
        Trial::new("appshot", move || {
            let mut cmd = self.appshot.foreground(self.aid, &argv);
            (self.figure)(&procs::run(&mut cmd, what, self.timeout)?)
        })
    }

    /// The trial [`NOTIFIED_ROUTING`]: as [`appshot`](Self::appshot), with
    /// the supervisor notified of connect, getsockname and getpeername.
    pub fn appshot_notified(self, argv: Vec<String>, what: &'a str) -> Trial<'a> {
        Trial::new(NOTIFIED_ROUTING, move || {
            let mut cmd = self.appshot.foreground(self.aid, &argv);
            cmd.env("APPSHOT_ROUTING", "notified");
            (self.figure)(&procs::run(&mut cmd, what, self.timeout)?)
        })
    }
}
