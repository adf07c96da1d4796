//! `appshot-bench`: measures appshot side by side with native and with
//! peers, and prints one markdown table of medians, ratios and spreads.
//! `bench/run.sh` installs what it needs, builds and runs it.
#![forbid(unsafe_code)]

mod appshot;
mod benches;
mod machine;
mod measure;
mod net;
mod probes;
mod procs;
mod stats;
mod table;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::Parser;
use serde::Serialize;

use crate::appshot::Appshot;
use crate::benches::{Ctx, ALL};
use crate::machine::Machine;
use crate::measure::{Measurement, Plan};
use crate::net::PortPool;
use crate::table::Row;

#[derive(Parser)]
#[command(
    name = "appshot-bench",
    about = "Measure appshot side by side with native and with peers"
)]
struct Cli {
    /// 3 counted runs per figure and smaller runs (about 3 minutes);
    /// the default is 7 runs (about 9 minutes).
    #[arg(long)]
    quick: bool,
    /// The appshot binary to measure.
    #[arg(long, default_value = "target/release/appshot")]
    appshot: PathBuf,
    /// Where results.json and results.md go.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// Run only these benchmarks (repeatable).
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(benches::names()))]
    only: Vec<String>,
}

#[derive(Serialize)]
struct Report<'a> {
    ok: bool,
    date_utc: String,
    command: String,
    machine: Machine,
    appshot: String,
    plan: &'a Plan,
    rows: &'a [Row],
    measurements: &'a [Measurement],
    failures: &'a [String],
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("appshot-bench: {e:#}");
            if procs::interrupted() {
                // As a shell reports death by SIGINT.
                ExitCode::from(130)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// `Ok(false)`: a benchmark failed; the table says which and stderr why.
fn run(cli: Cli) -> anyhow::Result<bool> {
    procs::watch_signals()?;
    procs::keep_inherited_fds()?;
    procs::become_subreaper()?;
    let plan = if cli.quick {
        Plan::quick()
    } else {
        Plan::full()
    };
    let selected: Vec<_> = ALL
        .iter()
        .filter(|b| cli.only.is_empty() || cli.only.iter().any(|o| o == b.name))
        .collect();
    for b in &selected {
        for tool in b.needs {
            if !on_path(tool) {
                bail!(
                    "{}: `{tool}` is not installed (bench/run.sh installs it)",
                    b.title
                );
            }
        }
    }

    let machine = Machine::read();
    if let Some(w) = machine.busy_warning() {
        eprintln!("appshot-bench: warning: {w}");
    }

    let work = tempfile::Builder::new()
        .prefix("appshot-bench.")
        .tempdir()
        .context("creating a temporary directory")?;
    std::fs::create_dir_all(work.path().join("logs"))?;
    let appshot = Appshot::new(&cli.appshot, &work.path().join("run"))?;
    let mut ctx = Ctx {
        plan: &plan,
        appshot: &appshot,
        ports: PortPool::new(),
        work: work.path(),
    };

    let (mut rows, mut measurements, mut failures) = (Vec::new(), Vec::new(), Vec::new());
    for b in selected {
        eprintln!("== {} ({} mode)", b.title, plan.mode);
        // Each benchmark's guards stop its processes before the next starts.
        match (b.run)(&mut ctx) {
            Ok(outcome) => {
                rows.extend(outcome.rows);
                measurements.extend(outcome.measurements);
            }
            Err(e) => {
                procs::check_interrupted()?;
                eprintln!("appshot-bench: FAILED: {e:#}");
                rows.push(Row::failed(b.title, &e.to_string(), &format!("{e:#}")));
                failures.push(format!("{e:#}"));
            }
        }
    }
    procs::check_interrupted()?;

    let table = table::render(&rows);
    print!("{table}");
    let report = Report {
        ok: failures.is_empty(),
        date_utc: machine::utc_now(),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        machine,
        appshot: cli.appshot.display().to_string(),
        plan: &plan,
        rows: &rows,
        measurements: &measurements,
        failures: &failures,
    };
    write_results(&cli.out, &report, &table)?;
    if !failures.is_empty() {
        eprintln!(
            "appshot-bench: {} benchmark(s) failed; no figure was recorded for them:",
            failures.len()
        );
        for f in &failures {
            eprintln!("  - {}", f.lines().next().unwrap_or(f));
        }
    }
    Ok(failures.is_empty())
}

fn write_results(out: &Path, report: &Report<'_>, table: &str) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let json = out.join("results.json");
    std::fs::write(&json, serde_json::to_string_pretty(report)? + "\n")
        .with_context(|| format!("writing {}", json.display()))?;
    let md = out.join("results.md");
    let caption = format!(
        "appshot-bench, {} mode ({} runs after {} warm-up, median), {}; {}\n\n",
        report.plan.mode,
        report.plan.runs,
        report.plan.warmup,
        report.date_utc,
        report.machine.describe()
    );
    std::fs::write(&md, caption + table).with_context(|| format!("writing {}", md.display()))?;
    eprintln!(
        "appshot-bench: wrote {} and {}",
        json.display(),
        md.display()
    );
    Ok(())
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(tool).is_file()))
}
