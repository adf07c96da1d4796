//! The result rows and their one markdown table.

use serde::Serialize;

use crate::measure::{Measurement, Unit};
use crate::stats::Summary;

pub const HEADER: [&str; 6] = [
    "benchmark",
    "configuration",
    "native/peer",
    "appshot",
    "ratio (appshot/native)",
    "spread",
];

#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub benchmark: String,
    pub configuration: String,
    pub result: RowResult,
}

#[derive(Clone, Debug, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum RowResult {
    /// appshot against a baseline: native, or a peer such as a TCP proxy.
    Compared {
        unit: Unit,
        /// "native" or the peer's name; it labels the spread.
        baseline_name: String,
        baseline: Summary,
        appshot: Summary,
        /// appshot's median over the baseline's.
        ratio: f64,
    },
    /// appshot alone: no peer is installed that does the same, so the
    /// native/peer and ratio cells stay empty; `peer` says why.
    Alone {
        unit: Unit,
        appshot: Summary,
        peer: String,
    },
    /// The configuration could not be measured; the error says why.
    Failed { error: String },
}

impl Row {
    pub fn compared(
        benchmark: &str,
        configuration: &str,
        baseline_name: &str,
        baseline: &Measurement,
        appshot: &Measurement,
    ) -> Row {
        debug_assert_eq!(baseline.unit, appshot.unit);
        Row {
            benchmark: benchmark.into(),
            configuration: configuration.into(),
            result: RowResult::Compared {
                unit: appshot.unit,
                baseline_name: baseline_name.into(),
                baseline: baseline.summary,
                appshot: appshot.summary,
                ratio: appshot.summary.median / baseline.summary.median,
            },
        }
    }

    pub fn alone(benchmark: &str, configuration: &str, appshot: &Measurement, peer: &str) -> Row {
        Row {
            benchmark: benchmark.into(),
            configuration: configuration.into(),
            result: RowResult::Alone {
                unit: appshot.unit,
                appshot: appshot.summary,
                peer: peer.into(),
            },
        }
    }

    pub fn failed(benchmark: &str, configuration: &str, error: &str) -> Row {
        Row {
            benchmark: benchmark.into(),
            configuration: configuration.into(),
            result: RowResult::Failed {
                error: error.into(),
            },
        }
    }

    fn cells(&self) -> [String; 6] {
        let (base, app, ratio, spread) = match &self.result {
            RowResult::Compared {
                unit,
                baseline_name,
                baseline,
                appshot,
                ratio,
            } => (
                format_value(baseline.median, *unit),
                format_value(appshot.median, *unit),
                sig3(*ratio),
                format!(
                    "{baseline_name} {}, appshot {}",
                    range(baseline, *unit),
                    range(appshot, *unit)
                ),
            ),
            // Never a silently empty peer column: the reason is in the row.
            RowResult::Alone {
                unit,
                appshot,
                peer,
            } => (
                "—".into(),
                format_value(appshot.median, *unit),
                "—".into(),
                format!("appshot {}; no peer: {peer}", range(appshot, *unit)),
            ),
            RowResult::Failed { .. } => dash("FAILED"),
        };
        [
            self.benchmark.clone(),
            self.configuration.clone(),
            base,
            app,
            ratio,
            spread,
        ]
    }
}

fn dash(appshot: &str) -> (String, String, String, String) {
    ("—".into(), appshot.into(), "—".into(), "—".into())
}

/// A markdown table with padded columns, readable as it is in a terminal.
/// Figures are right-aligned.
pub fn render(rows: &[Row]) -> String {
    let mut grid: Vec<[String; 6]> = vec![HEADER.map(String::from)];
    grid.extend(rows.iter().map(Row::cells));
    let widths: Vec<usize> = (0..6)
        .map(|c| {
            grid.iter()
                .map(|r| r[c].chars().count())
                .max()
                .unwrap_or(0)
                .max(3)
        })
        .collect();
    let right = |c: usize| (2..=4).contains(&c);
    let line = |cells: Vec<String>| format!("| {} |\n", cells.join(" | "));
    let mut out = String::new();
    for (i, r) in grid.iter().enumerate() {
        out += &line(
            r.iter()
                .enumerate()
                .map(|(c, cell)| pad(cell, widths[c], right(c)))
                .collect(),
        );
        if i == 0 {
            out += &line(
                (0..6)
                    .map(|c| {
                        let dashes = "-".repeat(widths[c] - 1);
                        if right(c) {
                            format!("{dashes}:")
                        } else {
                            format!("{dashes}-")
                        }
                    })
                    .collect(),
            );
        }
    }
    out
}

fn pad(cell: &str, width: usize, right: bool) -> String {
    let fill = " ".repeat(width - cell.chars().count());
    if right {
        format!("{fill}{cell}")
    } else {
        format!("{cell}{fill}")
    }
}

/// A figure with its unit, to three significant digits; rates get k/M.
pub fn format_value(v: f64, unit: Unit) -> String {
    format!("{} {}", number(v, unit), unit.label())
}

fn range(s: &Summary, unit: Unit) -> String {
    format!("{}–{}", number(s.min, unit), number(s.max, unit))
}

fn number(v: f64, unit: Unit) -> String {
    match unit {
        Unit::ConnsPerSec | Unit::RequestsPerSec if v >= 1e6 => format!("{}M", sig3(v / 1e6)),
        Unit::ConnsPerSec | Unit::RequestsPerSec if v >= 1e3 => format!("{}k", sig3(v / 1e3)),
        _ => sig3(v),
    }
}

/// Three significant digits, never in exponent notation.
pub fn sig3(v: f64) -> String {
    let a = v.abs();
    if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else if a >= 0.1 || a == 0.0 || !a.is_finite() {
        format!("{v:.3}")
    } else {
        // Below 0.1: as many decimals as three significant digits take.
        let decimals = (2 - a.log10().floor() as i32).clamp(3, 12) as usize;
        format!("{v:.decimals$}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::summarize;

    fn measurement(unit: Unit, samples: &[f64]) -> Measurement {
        Measurement {
            benchmark: "b".into(),
            configuration: "c".into(),
            unit,
            warmup: vec![],
            samples: samples.to_vec(),
            summary: summarize(samples).unwrap(),
        }
    }

    #[test]
    fn numbers_have_three_significant_digits_and_rate_suffixes() {
        assert_eq!(sig3(0.27912), "0.279");
        assert_eq!(sig3(18.738), "18.7");
        assert_eq!(sig3(1.5), "1.50");
        assert_eq!(sig3(512.4), "512");
        assert_eq!(sig3(0.0156), "0.0156");
        assert_eq!(sig3(0.0000622), "0.0000622");
        assert_eq!(sig3(0.0), "0.000");
        assert_eq!(format_value(23203.2, Unit::ConnsPerSec), "23.2k conn/s");
        assert_eq!(
            format_value(1_234_567.0, Unit::RequestsPerSec),
            "1.23M req/s"
        );
        assert_eq!(format_value(45.31, Unit::GbitPerSec), "45.3 Gbit/s");
        assert_eq!(format_value(512.0, Unit::ConnsPerSec), "512 conn/s");
        assert_eq!(format_value(0.279, Unit::MicrosPerCall), "0.279 µs");
    }

    #[test]
    fn compared_row_has_ratio_and_both_spreads() {
        let native = measurement(Unit::ConnsPerSec, &[20_000.0, 25_000.0, 24_000.0]);
        let appshot = measurement(Unit::ConnsPerSec, &[5_000.0, 6_000.0, 4_000.0]);
        let row = Row::compared("connection setup", "same AID", "native", &native, &appshot);
        assert_eq!(
            row.cells(),
            [
                "connection setup",
                "same AID",
                "24.0k conn/s",
                "5.00k conn/s",
                "0.208",
                "native 20.0k–25.0k, appshot 4.00k–6.00k",
            ]
        );
    }

    #[test]
    fn a_row_without_peer_says_why() {
        let appshot = measurement(Unit::Millis, &[9.0, 12.5, 10.0]);
        let row = Row::alone("clone", "256 MiB", &appshot, "criu: not installed");
        assert_eq!(
            row.cells(),
            [
                "clone",
                "256 MiB",
                "—",
                "10.0 ms",
                "—",
                "appshot 9.00–12.5; no peer: criu: not installed"
            ]
        );
        let json = serde_json::to_value(&row).unwrap();
        assert_eq!(json["result"]["status"], "alone");
        assert_eq!(json["result"]["peer"], "criu: not installed");
        assert_eq!(format_value(256.1, Unit::MiB), "256 MiB");
    }

    #[test]
    fn table_is_aligned_markdown_with_the_fixed_header() {
        let native = measurement(Unit::MicrosPerCall, &[0.25, 0.3, 0.28]);
        let appshot = measurement(Unit::MicrosPerCall, &[18.0, 19.0, 20.0]);
        let rows = vec![
            Row::compared(
                "notified syscall",
                "getsockname()",
                "native",
                &native,
                &appshot,
            ),
            Row::alone(
                "clone",
                "256 MiB",
                &measurement(Unit::Millis, &[9.0]),
                "none",
            ),
            Row::failed("iperf3", "appshot", "boom"),
        ];
        let table = render(&rows);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 5);
        assert!(lines[0].starts_with("| benchmark "));
        assert!(lines[0].contains("| ratio (appshot/native) |"));
        assert!(lines[1].starts_with("| ---"));
        assert!(lines[1].contains(": |"), "figures are right-aligned");
        assert!(lines[2].contains("0.280 µs"));
        assert!(lines[2].contains("19.0 µs"));
        assert!(lines[2].contains(" 67.9 |"));
        assert!(lines[3].contains("| 9.00 ms |"));
        assert!(lines[3].contains("no peer: none"), "{}", lines[3]);
        assert!(lines[4].contains("FAILED"));
        // Every line has the same width and the same number of columns.
        let width = lines[0].chars().count();
        for l in &lines {
            assert_eq!(l.chars().count(), width, "{l}");
            assert_eq!(l.matches(" | ").count(), 5, "{l}");
        }
    }
}
