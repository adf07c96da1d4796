//! Repeated runs of the configurations of one benchmark, interleaved, with
//! the warm-up runs kept apart from the samples.

use anyhow::{anyhow, Context};
use serde::Serialize;

use crate::stats::{summarize, Summary};

/// How many runs, and how big each one is.
#[derive(Clone, Debug, Serialize)]
pub struct Plan {
    pub mode: &'static str,
    /// Runs that count, per configuration.
    pub runs: usize,
    /// Runs before them that are discarded: first touches of fresh memory,
    /// cold page cache and lazy binding make a first run slow here.
    pub warmup: usize,
    pub syscall_iterations: u64,
    pub connections: u64,
    pub iperf_seconds: u32,
    pub redis_requests: u64,
    pub redis_pipelined_requests: u64,
    /// Memory of the snapshot/restore/clone workload, MiB per size.
    pub snapshot_sizes_mib: Vec<u64>,
    /// Counted runs per snapshot size (after `warmup`): each run dumps,
    /// restores and clones a process of that size.
    pub snapshot_runs: usize,
}

impl Plan {
    pub fn quick() -> Plan {
        Plan {
            mode: "quick",
            runs: 3,
            warmup: 1,
            syscall_iterations: 50_000,
            connections: 3_000,
            iperf_seconds: 2,
            redis_requests: 30_000,
            redis_pipelined_requests: 300_000,
            snapshot_sizes_mib: vec![64, 256],
            snapshot_runs: 3,
        }
    }

    pub fn full() -> Plan {
        Plan {
            mode: "full",
            runs: 7,
            warmup: 1,
            syscall_iterations: 200_000,
            connections: 10_000,
            iperf_seconds: 3,
            redis_requests: 100_000,
            redis_pipelined_requests: 2_000_000,
            snapshot_sizes_mib: vec![64, 256, 1024],
            snapshot_runs: 5,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Unit {
    /// Microseconds per syscall: lower is better.
    MicrosPerCall,
    /// Microseconds per page touched: lower is better.
    MicrosPerPage,
    ConnsPerSec,
    GbitPerSec,
    RequestsPerSec,
    /// Milliseconds: lower is better.
    Millis,
    MiB,
}

impl Unit {
    pub fn label(self) -> &'static str {
        match self {
            Unit::MicrosPerCall => "µs",
            Unit::MicrosPerPage => "µs/page",
            Unit::ConnsPerSec => "conn/s",
            Unit::GbitPerSec => "Gbit/s",
            Unit::RequestsPerSec => "req/s",
            Unit::Millis => "ms",
            Unit::MiB => "MiB",
        }
    }
}

/// One configuration's runs.
#[derive(Clone, Debug, Serialize)]
pub struct Measurement {
    pub benchmark: String,
    pub configuration: String,
    pub unit: Unit,
    /// Discarded runs, kept for the record.
    pub warmup: Vec<f64>,
    pub samples: Vec<f64>,
    pub summary: Summary,
}

impl Measurement {
    /// A measurement from the figures of consecutive runs, the first
    /// `warmup` of them discarded: for benchmarks whose every run yields
    /// several figures, which `interleaved` cannot collect. Fails on a
    /// figure that is not positive and finite, or on too few runs.
    pub fn from_runs(
        benchmark: &str,
        configuration: &str,
        unit: Unit,
        mut values: Vec<f64>,
        warmup: usize,
    ) -> anyhow::Result<Measurement> {
        if let Some((i, v)) = values
            .iter()
            .enumerate()
            .find(|(_, v)| !v.is_finite() || **v <= 0.0)
        {
            return Err(anyhow!(
                "{benchmark} / {configuration}: run {} gave {v}, not a positive figure",
                i + 1
            ));
        }
        if values.len() <= warmup {
            return Err(anyhow!(
                "{benchmark} / {configuration}: {} runs, none left after {warmup} warm-up",
                values.len()
            ));
        }
        let samples = values.split_off(warmup);
        let summary = summarize(&samples).expect("finite samples");
        Ok(Measurement {
            benchmark: benchmark.to_string(),
            configuration: configuration.to_string(),
            unit,
            warmup: values,
            samples,
            summary,
        })
    }
}

/// A configuration and how to run it once; it returns the figure of that
/// run in the benchmark's unit.
pub struct Trial<'a> {
    pub configuration: String,
    pub run: Box<dyn FnMut() -> anyhow::Result<f64> + 'a>,
}

impl<'a> Trial<'a> {
    pub fn new(
        configuration: impl Into<String>,
        run: impl FnMut() -> anyhow::Result<f64> + 'a,
    ) -> Self {
        Trial {
            configuration: configuration.into(),
            run: Box::new(run),
        }
    }
}

/// Runs every trial `plan.warmup + plan.runs` times, round-robin: a drift
/// of the machine over the minutes of a benchmark (another tenant, thermal
/// limits) then hits every configuration alike instead of biasing the one
/// that happened to run last. An error names the configuration that failed.
pub fn interleaved(
    benchmark: &str,
    unit: Unit,
    plan: &Plan,
    mut trials: Vec<Trial<'_>>,
) -> anyhow::Result<Vec<Measurement>> {
    let total = plan.warmup + plan.runs;
    let mut values: Vec<Vec<f64>> = vec![Vec::with_capacity(total); trials.len()];
    for round in 0..total {
        for (trial, out) in trials.iter_mut().zip(&mut values) {
            crate::procs::check_interrupted()?;
            let v = (trial.run)().with_context(|| {
                format!(
                    "{benchmark} / {}: run {} of {total} failed",
                    trial.configuration,
                    round + 1
                )
            })?;
            if !v.is_finite() || v <= 0.0 {
                return Err(anyhow!(
                    "{benchmark} / {}: run {} gave {v}, not a positive figure",
                    trial.configuration,
                    round + 1
                ));
            }
            eprintln!(
                "  {benchmark} / {}: run {}/{total}{}: {}",
                trial.configuration,
                round + 1,
                warmup_mark(round, plan.warmup),
                crate::table::format_value(v, unit)
            );
            out.push(v);
        }
    }
    Ok(trials
        .iter()
        .zip(values)
        .map(|(trial, mut v)| {
            let samples = v.split_off(plan.warmup);
            let summary = summarize(&samples).expect("at least one finite sample");
            Measurement {
                benchmark: benchmark.to_string(),
                configuration: trial.configuration.clone(),
                unit,
                warmup: v,
                samples,
                summary,
            }
        })
        .collect())
}

/// What follows "run N/TOTAL" in the progress lines: whether run `round`
/// (from 0) is one of the first `warmup`, which are discarded.
pub fn warmup_mark(round: usize, warmup: usize) -> &'static str {
    if round < warmup {
        " (warm-up)"
    } else {
        ""
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_plan() -> Plan {
        Plan {
            runs: 3,
            ..Plan::quick()
        }
    }

    #[test]
    fn first_run_is_discarded_and_runs_alternate() {
        let order = std::cell::RefCell::new(Vec::new());
        let mut a = [100.0, 1.0, 3.0, 2.0].into_iter();
        let mut b = [50.0, 10.0, 30.0, 20.0].into_iter();
        let trials = vec![
            Trial::new("a", || {
                order.borrow_mut().push('a');
                Ok(a.next().unwrap())
            }),
            Trial::new("b", || {
                order.borrow_mut().push('b');
                Ok(b.next().unwrap())
            }),
        ];
        let m = interleaved("t", Unit::ConnsPerSec, &tiny_plan(), trials).unwrap();
        assert_eq!(order.into_inner(), ['a', 'b', 'a', 'b', 'a', 'b', 'a', 'b']);
        assert_eq!(m[0].warmup, [100.0]);
        assert_eq!(m[0].samples, [1.0, 3.0, 2.0]);
        assert_eq!(m[0].summary.median, 2.0);
        assert_eq!(m[1].summary.median, 20.0);
    }

    #[test]
    fn a_failing_run_names_its_configuration() {
        let trials = vec![
            Trial::new("fine", || Ok(1.0)),
            Trial::new("broken", || Err(anyhow!("server died"))),
        ];
        let err = interleaved("bench", Unit::ConnsPerSec, &tiny_plan(), trials).unwrap_err();
        let text = format!("{err:#}");
        assert!(text.contains("bench / broken"), "{text}");
        assert!(text.contains("server died"), "{text}");
    }

    #[test]
    fn from_runs_discards_the_warmup_and_rejects_bad_figures() {
        let m = Measurement::from_runs("b", "c", Unit::Millis, vec![90.0, 12.0, 10.0, 11.0], 1)
            .unwrap();
        assert_eq!(m.warmup, [90.0]);
        assert_eq!(m.samples, [12.0, 10.0, 11.0]);
        assert_eq!(m.summary.median, 11.0);
        assert_eq!((m.summary.min, m.summary.max), (10.0, 12.0));
        let err = Measurement::from_runs("b", "c", Unit::Millis, vec![1.0, 0.0], 1).unwrap_err();
        assert!(err.to_string().contains("run 2 gave 0"), "{err}");
        assert!(Measurement::from_runs("b", "c", Unit::Millis, vec![1.0, f64::NAN], 1).is_err());
        assert!(Measurement::from_runs("b", "c", Unit::Millis, vec![1.0], 1).is_err());
    }

    #[test]
    fn a_zero_figure_is_an_error_not_a_sample() {
        let trials = vec![Trial::new("zero", || Ok(0.0))];
        assert!(interleaved("bench", Unit::ConnsPerSec, &tiny_plan(), trials).is_err());
    }
}
