//! One module per benchmark. Each runs its configurations interleaved
//! (`measure::interleaved`) and turns the measurements into table rows.

use std::path::{Path, PathBuf};

use crate::appshot::Appshot;
use crate::measure::{Measurement, Plan};
use crate::net::PortPool;
use crate::table::Row;

mod connrate;
mod criu;
mod iperf;
mod redis;
mod servers;
mod snapshot;
mod syscall;

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
];

pub fn names() -> Vec<&'static str> {
    ALL.iter().map(|b| b.name).collect()
}

/// `argv` as owned strings, for `Command` and `Appshot`.
pub fn argv<I, S>(parts: I) -> Vec<String>
where
    I: IntoIterator<Item = S>,
    S: ToString,
{
    parts.into_iter().map(|p| p.to_string()).collect()
}
