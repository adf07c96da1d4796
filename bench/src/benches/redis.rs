//! redis-benchmark SET and GET against redis-server, both native or both
//! under appshot with one AID, without and with pipelining (-P 16).

use std::time::Duration;

use anyhow::{anyhow, Context};

use super::servers::native_server;
use super::{argv, Client, Ctx, Outcome};
use crate::measure::{interleaved, Unit};

pub const TITLE: &str = "redis-benchmark";
const AID: &str = "a";
const TIMEOUT: Duration = Duration::from_secs(600);

pub fn run(ctx: &mut Ctx<'_>) -> anyhow::Result<Outcome> {
    let logs = ctx.logs();
    let server = |port: u16, dir: &str| {
        // No persistence: the figure is the network path and redis, not
        // the disk.
        argv([
            "redis-server",
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            dir,
        ])
    };
    // A working directory each, though nothing is written to them.
    let dir = |name: &str| -> anyhow::Result<String> {
        let d = ctx.work.join("redis").join(name);
        std::fs::create_dir_all(&d)?;
        Ok(d.display().to_string())
    };

    let native_port = ctx.ports.take()?;
    let _native = native_server(
        native_port,
        &server(native_port, &dir("native")?),
        "native redis-server",
        &logs,
    )?;
    let virtual_port = ctx.ports.take()?;
    let _instance = ctx
        .appshot
        .server(AID, virtual_port, &server(virtual_port, &dir("appshot")?))
        .context("starting redis-server under appshot")?;

    let mut out = Outcome::default();
    let cases = [
        (1, ctx.plan.redis_requests),
        (16, ctx.plan.redis_pipelined_requests),
    ];
    for (pipeline, requests) in cases {
        for test in ["SET", "GET"] {
            let args = |port: u16| {
                argv([
                    "redis-benchmark",
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &port.to_string(),
                    "-q",
                    "--csv",
                    "-t",
                    &test.to_lowercase(),
                    "-n",
                    &requests.to_string(),
                    "-P",
                    &pipeline.to_string(),
                ])
            };
            let client = Client {
                appshot: ctx.appshot,
                aid: AID,
                timeout: TIMEOUT,
                figure: move |csv: &str| rps(csv, test),
            };
            let trials = vec![
                client.native("native", args(native_port), "redis-benchmark (native)"),
                client.appshot(args(virtual_port), "redis-benchmark under appshot"),
            ];
            let benchmark = format!("redis {test}");
            let m = interleaved(&benchmark, Unit::RequestsPerSec, ctx.plan, trials)?;
            let configuration = if pipeline == 1 {
                "50 clients, not pipelined; same AID".to_string()
            } else {
                format!("50 clients, pipelined -P {pipeline}; same AID")
            };
            out.add_against_native(&benchmark, &configuration, m);
        }
    }
    Ok(out)
}

/// Requests per second of `test` in `redis-benchmark -q --csv` output:
/// `"SET","52219.32",…`, after a header line in redis 7.
fn rps(csv: &str, test: &str) -> anyhow::Result<f64> {
    csv.lines()
        .find_map(|line| {
            let mut fields = line.split(',').map(|f| f.trim().trim_matches('"'));
            (fields.next()? == test).then(|| fields.next())?
        })
        .ok_or_else(|| anyhow!("no {test} row in redis-benchmark output: {csv:?}"))?
        .parse()
        .with_context(|| format!("{test} rps in redis-benchmark output: {csv:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rps_is_read_from_the_named_row() {
        let redis7 = "\"test\",\"rps\",\"avg_latency_ms\"\n\"SET\",\"52219.32\",\"0.679\"\n\"GET\",\"78740.16\",\"0.362\"\n";
        assert_eq!(rps(redis7, "SET").unwrap(), 52219.32);
        assert_eq!(rps(redis7, "GET").unwrap(), 78740.16);
        assert_eq!(rps("\"GET\",\"1000.5\"\n", "GET").unwrap(), 1000.5);
        assert!(rps(redis7, "LPUSH").is_err());
        assert!(rps("\"SET\",\"n/a\"\n", "SET").is_err());
    }
}
