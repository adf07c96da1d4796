//! Snapshot, restore and clone of an instance holding N MiB of touched,
//! non-zero memory (bench/probes/memhold.c, blocked in accept on a virtual
//! port), with CRIU 4.x as the peer (benches/criu.rs: the same workload run
//! natively). Without a working CRIU the rows say why, and with CI=true
//! the benchmark fails.
//!
//! Each run, for each size in turn:
//! 1. a fresh instance; `appshot snapshot --leave-running` twice: how long
//!    it was frozen the second time. The first snapshot is kept apart (in
//!    results.json only): on this project's VMs it also pays for the page
//!    cache's fresh memory, which the VM has returned to its host, and
//!    takes up to 3 times longer at 1 GiB; the snapshots after it reuse the
//!    page cache freed by deleting the image before;
//!    Then a second instance whose probe writes 1% of its pages a second
//!    (`memhold serve … MIB 1`), under a different AID on the same port:
//!    `appshot snapshot --leave-running` twice again, and how long the
//!    second one froze it. Its memory is copied while it runs (pre-copy);
//!    CRIU's figure beside it is the idle process's (CRIU freezes for its
//!    whole dump whatever the process writes);
//! 2. `appshot snapshot` (the instance stops): the command's wall time (the
//!    row, beside `criu dump`'s), the dump time appshot reports, image size;
//! 3. `appshot restore IMAGE --detach`: wall time from the command's start
//!    until a supervised client of the AID, already retrying its connect,
//!    gets its first answer; and the supervisor's "restore work done ms=";
//!    then `appshot restore IMAGE --lazy --detach` the same way (its memory
//!    served on fault and prefetched in the background), against CRIU's
//!    `criu restore --lazy-pages` and its eager restore; both restored
//!    instances then answer the checksum of their whole memory;
//! 4. `appshot clone TEMPLATE --aid X --detach` of a template of the same
//!    size (taken once, before the runs): the same two figures.
//!
//! For the 256 MiB template, 5 clones at once also give the memory each
//! adds: the sum of their Pss over 5, and their private pages, against
//! the RSS of the instance the template was taken from; then the first
//! clone's first write to each page (a fault that copies the template's
//! page) against a native process's copy-on-write fault after fork
//! (`memhold cow`); and a clone of it started with `--pool 0` (no instance
//! shell: its supervisor and namespace init started for it), timed to its
//! first answer like step 4's clone, which claimed a shell in the same
//! round. For the smallest template, `appshot clone --count 100` gives the wall time of starting
//! 100 clones from one command (each then checked to answer).
//!
//! Every original, restored and cloned process must answer the checksum of
//! its whole memory, which the bench computes itself (`expected_sum`): a
//! broken restore fails the benchmark instead of producing a figure. The
//! images live in a temporary directory removed whatever happens, and every
//! instance is stopped by its guard.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};

use super::criu::{self, CriuRun};
use super::{argv, Ctx, Outcome};
use crate::appshot::{Appshot, Instance};
use crate::measure::{warmup_mark, Measurement, Unit};
use crate::probes::{self, MEMHOLD};
use crate::procs::{self, Lines};
use crate::table::Row;

pub const TITLE: &str = "snapshot/restore/clone";
pub const HOST: &str = "127.0.0.1";
const TIMEOUT: Duration = Duration::from_secs(300);
/// How long a client waits for the instance of its AID to appear.
pub const WAIT_MS: u64 = 120_000;
/// How long a client waits to be told "refused" by the first connect.
pub const START: Duration = Duration::from_secs(30);
const MEMORY_MIB: u64 = 256;
const MEMORY_CLONES: u32 = 5;
/// Pages the writing instance writes a second, in percent of its memory.
const WRITE_PERCENT: u32 = 1;
/// The clones of one `appshot clone --count`.
const COUNT_CLONES: u32 = 100;

/// One run's figures for one size.
#[derive(Default)]
struct RunFigures {
    dump_ms: f64,
    dump_wall_ms: f64,
    image_mib: f64,
    memory_mib: f64,
    frozen_ms: f64,
    frozen_dump_ms: f64,
    first_frozen_ms: f64,
    frozen_writing_ms: f64,
    /// The full snapshot an incremental one is then taken on, and that one.
    parent_ms: f64,
    parent_mib: f64,
    incremental_ms: f64,
    incremental_mib: f64,
    restore_answer_ms: f64,
    restore_cmd_ms: f64,
    restore_work_ms: f64,
    lazy_answer_ms: f64,
    clone_answer_ms: f64,
    clone_cmd_ms: f64,
    clone_work_ms: f64,
}

struct Figure {
    benchmark: &'static str,
    /// After "N MiB".
    what: &'static str,
    unit: Unit,
    get: fn(&RunFigures) -> f64,
    /// A table row; the others are kept in results.json only.
    row: bool,
    /// The same figure for CRIU, when it works.
    peer: Option<fn(&CriuRun) -> f64>,
}

/// In table order: each figure for every size, so its trend with size
/// reads down the column. One figure a line: benchmark, what follows
/// "N MiB", unit, the figure, and for a table row CRIU's figure (if any).
#[rustfmt::skip]
const FIGURES: &[Figure] = &[
    row("snapshot", "process, then stopped: wall time of `appshot snapshot` / `criu dump`", Unit::Millis, |f| f.dump_wall_ms, Some(|c| c.dump_ms)),
    row("snapshot", "process: image size", Unit::MiB, |f| f.image_mib, Some(|c| c.image_mib)),
    row("snapshot --leave-running", "process: time frozen (as each reports it)", Unit::Millis, |f| f.frozen_ms, Some(|c| c.frozen_ms)),
    row("snapshot --leave-running", "process writing 1% of its pages a second: time frozen after pre-copy (CRIU: idle process)", Unit::Millis, |f| f.frozen_writing_ms, Some(|c| c.frozen_ms)),
    row("restore", "image, warm page cache: wall time to first answer", Unit::Millis, |f| f.restore_answer_ms, Some(|c| c.restore_answer_ms)),
    row("restore --lazy", "image, warm page cache: wall time to first answer (CRIU: restore --lazy-pages)", Unit::Millis, |f| f.lazy_answer_ms, Some(|c| c.lazy_answer_ms)),
    row("restore --lazy", "image, warm page cache: wall time to first answer (CRIU: eager restore)", Unit::Millis, |f| f.lazy_answer_ms, Some(|c| c.restore_answer_ms)),
    row("clone", "template: supervisor's restore work", Unit::Millis, |f| f.clone_work_ms, None),
    row("clone", "template: wall time to first answer", Unit::Millis, |f| f.clone_answer_ms, None),
    kept("snapshot", "process, then stopped: dump time appshot reports", Unit::Millis, |f| f.dump_ms),
    kept("restore", "image: supervisor's restore work", Unit::Millis, |f| f.restore_work_ms),
    kept("snapshot", "process: memory saved", Unit::MiB, |f| f.memory_mib),
    kept("snapshot --leave-running", "process: dump time", Unit::Millis, |f| f.frozen_dump_ms),
    kept("snapshot --leave-running", "process: time frozen, first snapshot after start (fresh page-cache memory)", Unit::Millis, |f| f.first_frozen_ms),
    kept("restore", "image: wall time of `appshot restore --detach`", Unit::Millis, |f| f.restore_cmd_ms),
    kept("clone", "template: wall time of `appshot clone --detach`", Unit::Millis, |f| f.clone_cmd_ms),
];

/// A table row, beside CRIU's figure where it has one.
const fn row(
    benchmark: &'static str,
    what: &'static str,
    unit: Unit,
    get: fn(&RunFigures) -> f64,
    peer: Option<fn(&CriuRun) -> f64>,
) -> Figure {
    Figure {
        benchmark,
        what,
        unit,
        get,
        row: true,
        peer,
    }
}

/// A figure kept in results.json only.
const fn kept(
    benchmark: &'static str,
    what: &'static str,
    unit: Unit,
    get: fn(&RunFigures) -> f64,
) -> Figure {
    Figure {
        row: false,
        ..row(benchmark, what, unit, get, None)
    }
}

/// One workload size: its port, its template and its runs.
struct Size {
    mib: u64,
    /// The virtual port of its instances.
    port: u16,
    /// CRIU's native process's port.
    native_port: u16,
    /// What `sum` must answer.
    expected: String,
    template: PathBuf,
    /// Of the instance the template was taken from.
    template_rss_mib: f64,
    runs: Vec<RunFigures>,
    criu: Vec<CriuRun>,
}

pub fn run(ctx: &mut Ctx<'_>) -> anyhow::Result<Outcome> {
    let appshot = ctx.appshot;
    let probe = MEMHOLD.build(ctx.work)?.display().to_string();
    // Every image in here, removed with it whatever happens.
    let images = tempfile::Builder::new()
        .prefix("images.")
        .tempdir_in(ctx.work)
        .context("creating the image directory")?;
    let dir = images.path();
    let peer = criu::usable();
    match &peer {
        Ok(version) => eprintln!("  {TITLE}: peer: {} (criu {version})", criu::binary()),
        Err(why) => {
            eprintln!("  {TITLE}: WARNING: no CRIU figures: {why}");
            if super::in_ci() {
                bail!("CI=true and no CRIU peer: {why}");
            }
        }
    }

    let mut sizes = Vec::new();
    for &mib in &ctx.plan.snapshot_sizes_mib {
        let size = Size::new(
            appshot,
            &probe,
            dir,
            mib,
            ctx.ports.take()?,
            ctx.ports.take()?,
        )
        .with_context(|| format!("{TITLE} / {mib} MiB: taking the template"))?;
        sizes.push(size);
    }

    // Linked before any clone: a new link changes the image's ctime, and
    // with it the identity appshot knows a rewritten template by (it would
    // build the template's holder again).
    let no_pool = match sizes.iter().find(|s| s.mib == MEMORY_MIB) {
        Some(size) => {
            let copy = dir.join(format!("template-{MEMORY_MIB}-no-pool.img"));
            std::fs::hard_link(&size.template, &copy).with_context(|| {
                format!("linking {} to {}", size.template.display(), copy.display())
            })?;
            Some(copy)
        }
        None => None,
    };

    let warmup = ctx.plan.warmup;
    let total = warmup + ctx.plan.snapshot_runs;
    let mut memory: Vec<CloneMemory> = Vec::new();
    let mut count_ms: Vec<f64> = Vec::new();
    // Of the MEMORY_MIB template's clones: one with no instance shell, to
    // set beside the same round's clone claimed from the pool.
    let mut fresh_ms: Vec<f64> = Vec::new();
    let mut claimed_ms: Vec<f64> = Vec::new();
    let smallest = sizes.iter().map(|s| s.mib).min();
    for round in 0..total {
        for size in &mut sizes {
            procs::check_interrupted()?;
            let failed = || {
                format!(
                    "{TITLE} / {} MiB: run {} of {total} failed",
                    size.mib,
                    round + 1
                )
            };
            let f = one_run(appshot, &probe, dir, size, round).with_context(failed)?;
            eprintln!(
                "  {TITLE} / {} MiB: run {}/{total}{}: dump {:.0} ms (image {:.1} MiB), frozen {:.0} ms (first snapshot {:.0} ms, writing {WRITE_PERCENT}%/s {:.0} ms), incremental {:.1} ms (image {:.2} MiB) on a full {:.0} ms ({:.1} MiB), restore {:.0} ms to first answer (work {:.1} ms), lazy restore {:.1} ms to first answer, clone {:.1} ms to first answer (work {:.1} ms)",
                size.mib,
                round + 1,
                warmup_mark(round, warmup),
                f.dump_ms,
                f.image_mib,
                f.frozen_ms,
                f.first_frozen_ms,
                f.frozen_writing_ms,
                f.incremental_ms,
                f.incremental_mib,
                f.parent_ms,
                f.parent_mib,
                f.restore_answer_ms,
                f.restore_work_ms,
                f.lazy_answer_ms,
                f.clone_answer_ms,
                f.clone_work_ms,
            );
            size.runs.push(f);
            if peer.is_ok() {
                let c = criu::one_run(
                    &probe,
                    dir,
                    size.mib,
                    size.native_port,
                    &size.expected,
                    round,
                )
                .with_context(failed)
                .context("criu (the peer)")?;
                eprintln!(
                    "  {TITLE} / {} MiB: run {}/{total}{}: criu dump {:.0} ms (images {:.1} MiB), frozen {:.0} ms (dump --leave-running {:.0} ms), restore {:.0} ms to first answer, lazy restore {:.0} ms",
                    size.mib, round + 1, warmup_mark(round, warmup), c.dump_ms, c.image_mib, c.frozen_ms, c.leave_running_wall_ms, c.restore_answer_ms, c.lazy_answer_ms
                );
                size.criu.push(c);
            }
            if size.mib == MEMORY_MIB {
                let m = clone_memory(appshot, &probe, size, round).with_context(|| {
                    format!("{TITLE} / {MEMORY_CLONES} clones of {MEMORY_MIB} MiB: run {} of {total} failed", round + 1)
                })?;
                eprintln!(
                    "  {TITLE} / {MEMORY_CLONES} clones of {MEMORY_MIB} MiB: run {}/{total}{}: Pss {:.1} MiB and private {:.3} MiB per clone (template RSS {:.1} MiB); first write to a template page {:.2} µs (fork's copy-on-write {:.2} µs)",
                    round + 1, warmup_mark(round, warmup), m.pss_mib, m.private_mib, size.template_rss_mib, m.write_us, m.cow_us
                );
                memory.push(m);
                let copy = no_pool.as_deref().expect("linked for this size");
                let ms = fresh_clone(appshot, &probe, copy, size, round).with_context(|| {
                    format!(
                        "{TITLE} / clone --pool 0 of {MEMORY_MIB} MiB: run {} of {total} failed",
                        round + 1
                    )
                })?;
                let claimed = size.runs.last().map_or(f64::NAN, |f| f.clone_answer_ms);
                eprintln!(
                    "  {TITLE} / clone of {MEMORY_MIB} MiB: run {}/{total}{}: {claimed:.1} ms to first answer claimed from the pool, {ms:.1} ms with --pool 0",
                    round + 1, warmup_mark(round, warmup)
                );
                fresh_ms.push(ms);
                claimed_ms.push(claimed);
            }
            if Some(size.mib) == smallest {
                let ms = clone_count(appshot, &probe, size, round).with_context(|| {
                    format!("{TITLE} / clone --count {COUNT_CLONES} of {} MiB: run {} of {total} failed", size.mib, round + 1)
                })?;
                eprintln!(
                    "  {TITLE} / clone --count {COUNT_CLONES} of {} MiB: run {}/{total}{}: {ms:.0} ms",
                    size.mib, round + 1, warmup_mark(round, warmup)
                );
                count_ms.push(ms);
            }
        }
    }

    let mut out = Outcome::default();
    for fig in FIGURES {
        for size in &sizes {
            let configuration = format!("{} MiB {}", size.mib, fig.what);
            let values = size.runs.iter().map(fig.get).collect();
            let m =
                Measurement::from_runs(fig.benchmark, &configuration, fig.unit, values, warmup)?;
            if fig.row {
                match (&peer, fig.peer) {
                    (Ok(_), Some(get)) => {
                        let values = size.criu.iter().map(get).collect();
                        let c = Measurement::from_runs(
                            fig.benchmark,
                            &format!("{configuration} (criu)"),
                            fig.unit,
                            values,
                            warmup,
                        )?;
                        out.rows
                            .push(Row::compared(fig.benchmark, &configuration, "criu", &c, &m));
                        out.measurements.push(c);
                    }
                    (Ok(_), None) => out.rows.push(Row::alone(
                        fig.benchmark,
                        &configuration,
                        &m,
                        "CRIU has no clone",
                    )),
                    (Err(why), _) => {
                        out.rows
                            .push(Row::alone(fig.benchmark, &configuration, &m, why))
                    }
                }
            }
            out.measurements.push(m);
        }
    }
    // The incremental snapshot against the full one it was taken on.
    for size in &sizes {
        for (what, unit, parent, child) in [
            (
                "time",
                Unit::Millis,
                (|f: &RunFigures| f.parent_ms) as fn(&RunFigures) -> f64,
                (|f: &RunFigures| f.incremental_ms) as fn(&RunFigures) -> f64,
            ),
            (
                "image size",
                Unit::MiB,
                |f| f.parent_mib,
                |f| f.incremental_mib,
            ),
        ] {
            let configuration = format!(
                "{} MiB process writing {WRITE_PERCENT}% of its pages a second, 1 s after a full snapshot: incremental snapshot {what}; peer: the full snapshot (--leave-running --track)",
                size.mib
            );
            let runs = |get: fn(&RunFigures) -> f64| size.runs.iter().map(get).collect();
            let full = Measurement::from_runs(
                "snapshot --parent",
                &format!("{configuration} (full)"),
                unit,
                runs(parent),
                warmup,
            )?;
            let m = Measurement::from_runs(
                "snapshot --parent",
                &configuration,
                unit,
                runs(child),
                warmup,
            )?;
            out.rows.push(Row::compared(
                "snapshot --parent",
                &configuration,
                "full snapshot",
                &full,
                &m,
            ));
            out.measurements.push(full);
            out.measurements.push(m);
        }
    }
    if let Some(mib) = smallest {
        let configuration = format!(
            "--count {COUNT_CLONES} of a {mib} MiB template: total time (wall time of one `appshot clone --count {COUNT_CLONES}`)"
        );
        let m = Measurement::from_runs("clone", &configuration, Unit::Millis, count_ms, warmup)?;
        out.rows
            .push(Row::alone("clone", &configuration, &m, "CRIU has no clone"));
        out.measurements.push(m);
    }
    if sizes.iter().any(|s| s.mib == MEMORY_MIB) {
        let configuration = format!(
            "{MEMORY_MIB} MiB template: wall time to first answer, the clone claimed from the pool; peer: its start with no instance shell (`--pool 0`, a copy of the template), same round"
        );
        let fresh = Measurement::from_runs(
            "clone",
            &format!("{configuration} (--pool 0)"),
            Unit::Millis,
            fresh_ms,
            warmup,
        )?;
        let claimed =
            Measurement::from_runs("clone", &configuration, Unit::Millis, claimed_ms, warmup)?;
        out.rows.push(Row::compared(
            "clone",
            &configuration,
            "--pool 0",
            &fresh,
            &claimed,
        ));
        out.measurements.extend([fresh, claimed]);
    }
    if let Some(size) = sizes.iter().find(|s| s.mib == MEMORY_MIB) {
        let template = Measurement::from_runs(
            "clone memory",
            &format!("RSS of the {MEMORY_MIB} MiB instance the template was taken from"),
            Unit::MiB,
            vec![size.template_rss_mib],
            0,
        )?;
        for (what, get) in [
            (
                "Pss per clone",
                (|m: &CloneMemory| m.pss_mib) as fn(&CloneMemory) -> f64,
            ),
            ("private memory per clone", |m| m.private_mib),
        ] {
            let configuration = format!(
                "{MEMORY_CLONES} clones of a {MEMORY_MIB} MiB template: {what}; peer: template's RSS"
            );
            let m = Measurement::from_runs(
                "clone memory",
                &configuration,
                Unit::MiB,
                memory.iter().map(get).collect(),
                warmup,
            )?;
            out.rows.push(Row::compared(
                "clone memory",
                &configuration,
                "template RSS",
                &template,
                &m,
            ));
            out.measurements.push(m);
        }
        out.measurements.push(template);
        let runs = |get: fn(&CloneMemory) -> f64| memory.iter().map(get).collect();
        let configuration = format!(
            "first write to each page of a {MEMORY_MIB} MiB template in a clone, per page; peer: copy-on-write fault after fork (native)"
        );
        let cow = Measurement::from_runs(
            "clone page fault",
            &format!("{configuration} (fork)"),
            Unit::MicrosPerPage,
            runs(|m| m.cow_us),
            warmup,
        )?;
        let write = Measurement::from_runs(
            "clone page fault",
            &configuration,
            Unit::MicrosPerPage,
            runs(|m| m.write_us),
            warmup,
        )?;
        out.rows.push(Row::compared(
            "clone page fault",
            &configuration,
            "fork copy-on-write",
            &cow,
            &write,
        ));
        out.measurements.extend([cow, write]);
    }
    Ok(out)
}

impl Size {
    /// Starts an instance of `mib` MiB, checks its answer, notes its RSS and
    /// takes the template of its size from it (which stops it).
    fn new(
        appshot: &Appshot,
        probe: &str,
        dir: &Path,
        mib: u64,
        port: u16,
        native_port: u16,
    ) -> anyhow::Result<Size> {
        let expected = format!("mib={mib} sum={:016x}", expected_sum(mib));
        let aid = format!("t{mib}");
        let instance = appshot.server(&aid, port, &serve(probe, port, mib))?;
        let what = format!("instance {} ({mib} MiB)", instance.name());
        verify(appshot, probe, &aid, port, &expected, &what)?;
        let rollup = smaps_rollup(instance.app_pid()?)?;
        let template_rss_mib = kib(&rollup, "Rss")? as f64 / 1024.0;
        let template = dir.join(format!("template-{mib}.img"));
        take_snapshot(appshot, &instance, &template, &["--template"], &what)?;
        Ok(Size {
            mib,
            port,
            native_port,
            expected,
            template,
            template_rss_mib,
            runs: Vec::new(),
            criu: Vec::new(),
        })
    }

    /// `verify` of the instance of `aid`, one of this size's.
    fn verify(&self, appshot: &Appshot, probe: &str, aid: &str, what: &str) -> anyhow::Result<()> {
        verify(appshot, probe, aid, self.port, &self.expected, what)
    }
}

fn one_run(
    appshot: &Appshot,
    probe: &str,
    dir: &Path,
    size: &Size,
    round: usize,
) -> anyhow::Result<RunFigures> {
    let mib = size.mib;
    let mut f = RunFigures::default();
    let aid = format!("s{mib}-{round}");
    let instance = appshot.server(&aid, size.port, &serve(probe, size.port, mib))?;
    let what = format!("instance {} ({mib} MiB)", instance.name());
    size.verify(appshot, probe, &aid, &what)?;

    let image = dir.join(format!("{aid}.img"));
    let leave_running = || -> anyhow::Result<SnapshotLine> {
        let (line, _) = take_snapshot(appshot, &instance, &image, &["--leave-running"], &what)?;
        remove(&image)?;
        Ok(line)
    };
    f.first_frozen_ms = leave_running()?.frozen_ms;
    let line = leave_running()?;
    (f.frozen_ms, f.frozen_dump_ms) = (line.frozen_ms, line.dump_ms);
    let after_leave_running = format!("{what} after its --leave-running snapshot");
    size.verify(appshot, probe, &aid, &after_leave_running)?;
    f.frozen_writing_ms = frozen_writing(appshot, probe, dir, size, round)?;
    (
        f.parent_ms,
        f.parent_mib,
        f.incremental_ms,
        f.incremental_mib,
    ) = incremental(appshot, probe, dir, size, round)?;

    let (line, took) = take_snapshot(appshot, &instance, &image, &[], &what)?;
    f.dump_wall_ms = millis(took);
    (f.dump_ms, f.image_mib, f.memory_mib) = (line.dump_ms, line.image_mib, line.memory_mib);
    drop(instance);

    let name = appshot.name(&format!("restored{mib}"));
    let (answer_ms, (restored, took)) =
        time_to_answer(appshot, probe, &aid, size.port, mib, "the restore", || {
            appshot.restore(&image, &name)
        })?;
    (f.restore_answer_ms, f.restore_cmd_ms) = (answer_ms, millis(took));
    f.restore_work_ms = check_started(appshot, probe, size, &restored, &aid, false)?;
    drop(restored);

    let name = appshot.name(&format!("lazy{mib}"));
    let (answer_ms, (lazy, _)) = time_to_answer(
        appshot,
        probe,
        &aid,
        size.port,
        mib,
        "the lazy restore",
        || appshot.restore_with(&image, &name, &["--lazy"]),
    )?;
    f.lazy_answer_ms = answer_ms;
    size.verify(appshot, probe, &aid, &format!("{what}, restored lazily"))?;
    drop(lazy);
    remove(&image)?;

    let clone_aid = format!("c{mib}-{round}");
    let (answer_ms, (clones, took)) = time_to_answer(
        appshot,
        probe,
        &clone_aid,
        size.port,
        mib,
        "the clone",
        || appshot.clone_template(&size.template, &clone_aid, 1),
    )?;
    (f.clone_answer_ms, f.clone_cmd_ms) = (answer_ms, millis(took));
    f.clone_work_ms = check_started(appshot, probe, size, &clones[0], &clone_aid, true)?;
    Ok(f)
}

/// How long `snapshot --leave-running` froze an instance that writes
/// [`WRITE_PERCENT`] % of its pages a second (the second snapshot of it,
/// like the idle instance's figure); its memory must still answer the
/// checksum afterwards.
fn frozen_writing(
    appshot: &Appshot,
    probe: &str,
    dir: &Path,
    size: &Size,
    round: usize,
) -> anyhow::Result<f64> {
    let mib = size.mib;
    let aid = format!("w{mib}-{round}");
    let mut argv = serve(probe, size.port, mib);
    argv.push(WRITE_PERCENT.to_string());
    let instance = appshot.server(&aid, size.port, &argv)?;
    let what = format!("writing instance {} ({mib} MiB)", instance.name());
    size.verify(appshot, probe, &aid, &what)?;
    let image = dir.join(format!("{aid}.img"));
    let mut frozen = 0.0;
    for _ in 0..2 {
        let (line, _) = take_snapshot(appshot, &instance, &image, &["--leave-running"], &what)?;
        remove(&image)?;
        frozen = line.frozen_ms;
    }
    size.verify(appshot, probe, &aid, &format!("{what} after its snapshots"))?;
    Ok(frozen)
}

/// The wall time to first answer of a clone of the template started with
/// `--pool 0`: its supervisor and namespace init started for it, as
/// before instance shells. It clones `copy`, a hard link of the template
/// under another name, which is another template to appshot (its own
/// holder and pool, the pool 0), so the pool of the template itself is
/// left as it is.
fn fresh_clone(
    appshot: &Appshot,
    probe: &str,
    copy: &Path,
    size: &Size,
    round: usize,
) -> anyhow::Result<f64> {
    let mib = size.mib;
    let aid = format!("f{mib}-{round}");
    let (answer_ms, (clones, _)) = time_to_answer(
        appshot,
        probe,
        &aid,
        size.port,
        mib,
        "the clone with --pool 0",
        || appshot.clone_template_with(copy, &aid, 1, &["--pool", "0"]),
    )?;
    check_started(appshot, probe, size, &clones[0], &aid, true)?;
    Ok(answer_ms)
}

/// Starts 5 clones of the template, has each read all of its memory, and
/// returns the memory each adds: (sum of Pss / 5, private per clone), MiB.
fn clone_memory(
    appshot: &Appshot,
    probe: &str,
    size: &Size,
    round: usize,
) -> anyhow::Result<CloneMemory> {
    let aid = format!("m{round}");
    let (clones, _) = appshot.clone_template(&size.template, &aid, MEMORY_CLONES)?;
    for (i, clone) in clones.iter().enumerate() {
        // `--count N` names the clones AID-1 … AID-N, as their AIDs.
        let clone_aid = format!("{aid}-{}", i + 1);
        if clone.name() != clone_aid {
            bail!(
                "clone {i} of `appshot clone --aid {aid} --count {MEMORY_CLONES}` is named {}, not {clone_aid}",
                clone.name()
            );
        }
        let what = format!("clone {clone_aid} ({} MiB)", size.mib);
        size.verify(appshot, probe, &clone_aid, &what)?;
    }
    let (mut pss, mut private) = (0, 0);
    for clone in &clones {
        let rollup = smaps_rollup(clone.app_pid()?)?;
        pss += kib(&rollup, "Pss")?;
        private += kib(&rollup, "Private_Clean")? + kib(&rollup, "Private_Dirty")?;
    }
    let per_clone = |kib: u64| kib as f64 / 1024.0 / f64::from(MEMORY_CLONES);
    // After the memory is read: the first clone's first write to each of
    // the template's pages, and an ordinary process's copy-on-write after
    // fork, the fault a clone (a fork of its template's holder) takes.
    let first = format!("{aid}-1");
    let out = procs::run(
        &mut appshot.foreground(&first, &ask(probe, size.port, "write", 10_000)),
        &format!("write query to clone {first}"),
        TIMEOUT,
    )?;
    let write_us = out
        .lines()
        .find_map(|l| l.strip_prefix("answer "))
        .and_then(|a| {
            a.split_whitespace()
                .find_map(|t| t.strip_prefix("write_ns_per_page="))
        })
        .and_then(|v| v.parse::<f64>().ok())
        .ok_or_else(|| anyhow!("no write_ns_per_page= in clone {first}'s answer: {out:?}"))?
        / 1e3;
    let out = procs::run(
        &mut procs::command(&argv([probe, "cow", &size.mib.to_string()])),
        &format!("memhold cow {} (native)", size.mib),
        TIMEOUT,
    )?;
    let cow_us = probes::parse_value(&out, "cow_ns_per_page")? / 1e3;
    Ok(CloneMemory {
        pss_mib: per_clone(pss),
        private_mib: per_clone(private),
        write_us,
        cow_us,
    })
}

/// What one round of [`clone_memory`] measured.
struct CloneMemory {
    pss_mib: f64,
    private_mib: f64,
    /// A clone's first write to a template page, µs per page.
    write_us: f64,
    /// A native copy-on-write fault after fork, µs per page.
    cow_us: f64,
}

/// Starts 100 clones of the template with one `appshot clone --count`,
/// checks that each answers its own AID with the template's checksum, and
/// returns the command's wall time, ms.
fn clone_count(appshot: &Appshot, probe: &str, size: &Size, round: usize) -> anyhow::Result<f64> {
    let aid = format!("n{round}");
    let (clones, took) = appshot.clone_template(&size.template, &aid, COUNT_CLONES)?;
    for clone in &clones {
        let what = format!("clone {} ({} MiB)", clone.name(), size.mib);
        // `--count N` names the clones AID-1 … AID-N, as their AIDs.
        size.verify(appshot, probe, clone.name(), &what)?;
    }
    Ok(millis(took))
}

/// Starts a supervised client of `aid` that retries its connect until an
/// instance of the AID answers, runs `start` (the restore or clone) once
/// the client has been refused, and returns the milliseconds from just
/// before `start` to the client's first answer, with what `start` returned.
fn time_to_answer<T>(
    appshot: &Appshot,
    probe: &str,
    aid: &str,
    port: u16,
    mib: u64,
    what: &str,
    start: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<(f64, T)> {
    let client = ask(probe, port, "ping", WAIT_MS);
    let mut client = Lines::spawn(
        &mut appshot.foreground(aid, &client),
        &format!("client of AID {aid} waiting for {what}"),
    )?;
    first_answer(&mut client, mib, what, start)
}

/// The waiting half of `time_to_answer`, for any client running
/// `memhold ask … ping`.
pub fn first_answer<T>(
    client: &mut Lines,
    mib: u64,
    what: &str,
    start: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<(f64, T)> {
    let want = format!("answer mib={mib}");
    first_answer_that(client, what, |line| line == want, start)
}

/// `first_answer` for any server: the client's line after "waiting" must
/// satisfy `good` ("answer …" and what the server should say).
pub fn first_answer_that<T>(
    client: &mut Lines,
    what: &str,
    good: impl Fn(&str) -> bool,
    start: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<(f64, T)> {
    let (_, first) = client.next_line(START)?;
    if first != "waiting" {
        bail!("a client was answered ({first:?}) before {what} started: something else serves its port");
    }
    let t0 = Instant::now();
    let started = start()?;
    let (t1, line) = client.next_line(TIMEOUT)?;
    if !good(&line) {
        bail!("after {what}, the client got the wrong answer: {line:?}");
    }
    client.wait_success(TIMEOUT)?;
    Ok((millis(t1.saturating_duration_since(t0)), started))
}

/// Asks the instance of `aid` for the checksum of its memory; fails unless
/// it is `expected`.
fn verify(
    appshot: &Appshot,
    probe: &str,
    aid: &str,
    port: u16,
    expected: &str,
    what: &str,
) -> anyhow::Result<()> {
    let out = procs::run(
        &mut appshot.foreground(aid, &ask(probe, port, "sum", 10_000)),
        &format!("checksum query to {what}"),
        TIMEOUT,
    )?;
    check_answer(&out, expected, what)
}

/// An incremental snapshot after [`WRITE_PERCENT`] % of the pages were
/// written: an instance writing that much a second, `snapshot
/// --leave-running --track` of it (the parent), a second later `snapshot
/// --leave-running --parent`; then a stopping incremental snapshot on that
/// one, restored, must answer the checksum of its whole memory. Returns the
/// parent's time and image size, and the first incremental one's.
fn incremental(
    appshot: &Appshot,
    probe: &str,
    dir: &Path,
    size: &Size,
    round: usize,
) -> anyhow::Result<(f64, f64, f64, f64)> {
    let mib = size.mib;
    let aid = format!("i{mib}-{round}");
    let mut argv = serve(probe, size.port, mib);
    argv.push(WRITE_PERCENT.to_string());
    let instance = appshot.server(&aid, size.port, &argv)?;
    let what = format!("writing instance {} ({mib} MiB)", instance.name());
    size.verify(appshot, probe, &aid, &what)?;
    let [parent, child, last] =
        ["parent", "child", "last"].map(|n| dir.join(format!("{aid}-{n}.img")));
    let flags = ["--leave-running", "--track"];
    let (full, _) = take_snapshot(appshot, &instance, &parent, &flags, &what)?;
    std::thread::sleep(Duration::from_secs(1));
    let on = |p: &Path| p.display().to_string();
    let flags = ["--leave-running", "--parent", &on(&parent)];
    let (inc, _) = take_snapshot(appshot, &instance, &child, &flags, &what)?;
    take_snapshot(appshot, &instance, &last, &["--parent", &on(&child)], &what)?;
    drop(instance);
    let (restored, _) = appshot.restore(&last, &appshot.name(&format!("inc{mib}")))?;
    size.verify(
        appshot,
        probe,
        &aid,
        &format!("{what} restored from its chain"),
    )?;
    drop(restored);
    for image in [&parent, &child, &last] {
        remove(image)?;
    }
    Ok((full.dump_ms, full.image_mib, inc.dump_ms, inc.image_mib))
}

/// `appshot snapshot` of `instance` (`what`) to `image` with `flags`: the
/// figures of its line and the command's wall time. Fails unless it left
/// the instance running exactly when `flags` has `--leave-running`.
pub fn take_snapshot(
    appshot: &Appshot,
    instance: &Instance<'_>,
    image: &Path,
    flags: &[&str],
    what: &str,
) -> anyhow::Result<(SnapshotLine, Duration)> {
    let after = if flags.contains(&"--leave-running") {
        After::LeftRunning
    } else {
        After::Stopped
    };
    let started = Instant::now();
    let out = appshot.snapshot(instance.name(), image, flags)?;
    let took = started.elapsed();
    let line = parse_snapshot(&out)?;
    if line.after != after {
        let command = ["appshot snapshot"].iter().chain(flags).copied();
        let did_not = match after {
            After::Stopped => "stop it",
            After::LeftRunning => "leave it running",
        };
        bail!(
            "`{}` of {what} did not {did_not}: {out:?}",
            command.collect::<Vec<_>>().join(" ")
        );
    }
    Ok((line, took))
}

pub fn check_answer(out: &str, expected: &str, what: &str) -> anyhow::Result<()> {
    let answer = out
        .lines()
        .find_map(|l| l.strip_prefix("answer "))
        .ok_or_else(|| anyhow!("no answer from {what}: {out:?}"))?;
    if answer != expected {
        bail!(
            "{what} answered {answer:?}, expected {expected:?}: its memory is not what was saved"
        );
    }
    Ok(())
}

pub fn serve(probe: &str, port: u16, mib: u64) -> Vec<String> {
    argv([probe, "serve", HOST, &port.to_string(), &mib.to_string()])
}

pub fn ask(probe: &str, port: u16, request: &str, wait_ms: u64) -> Vec<String> {
    argv([
        probe,
        "ask",
        HOST,
        &port.to_string(),
        request,
        &wait_ms.to_string(),
    ])
}

pub fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub fn remove(path: &Path) -> anyhow::Result<()> {
    std::fs::remove_file(path).with_context(|| format!("removing {}", path.display()))
}

pub fn smaps_rollup(pid: u32) -> anyhow::Result<String> {
    let path = format!("/proc/{pid}/smaps_rollup");
    std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))
}

/// The value of `KEY:   N kB` in /proc/PID/smaps_rollup.
pub fn kib(rollup: &str, key: &str) -> anyhow::Result<u64> {
    rollup
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k == key).then(|| v.trim().strip_suffix(" kB"))?
        })
        .ok_or_else(|| anyhow!("no `{key}: … kB` in smaps_rollup: {rollup:?}"))?
        .trim()
        .parse()
        .with_context(|| format!("`{key}` in smaps_rollup"))
}

/// memhold's fill: word `i` of its memory.
fn pattern(i: u64) -> u64 {
    let mut z = i.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    if z == 0 {
        1
    } else {
        z
    }
}

/// What memhold's `sum` answers for `mib` MiB: the wrapping sum over the
/// words of word[i] * (2i + 1).
fn expected_sum(mib: u64) -> u64 {
    let words = mib << 20 >> 3;
    (0..words).fold(0u64, |sum, i| {
        sum.wrapping_add(pattern(i).wrapping_mul(2 * i + 1))
    })
}

#[derive(Debug, PartialEq)]
pub enum After {
    Stopped,
    LeftRunning,
}

/// The figures of `appshot snapshot`'s line.
#[derive(Debug, PartialEq)]
pub struct SnapshotLine {
    pub memory_mib: f64,
    pub image_mib: f64,
    pub dump_ms: f64,
    pub frozen_ms: f64,
    pub after: After,
}

/// Parses `snapshot of NAME written to PATH: 256.1 MiB of memory, image
/// 256.1 MiB, 1366 ms (frozen 1372 ms); instance left running`.
fn parse_snapshot(out: &str) -> anyhow::Result<SnapshotLine> {
    let bad = || anyhow!("unexpected `appshot snapshot` output: {out:?}");
    let line = out
        .lines()
        .find(|l| l.starts_with("snapshot of "))
        .ok_or_else(bad)?;
    // The figures follow the path's last ": "; they hold none themselves.
    let (_, figures) = line.rsplit_once(": ").ok_or_else(bad)?;
    let (figures, after) = figures.split_once("; instance ").ok_or_else(bad)?;
    let after = match after.trim() {
        "stopped" => After::Stopped,
        "left running" => After::LeftRunning,
        _ => return Err(bad()),
    };
    let mut parts = figures.split(", ");
    let mut number = |prefix: &str, suffix: &str| -> anyhow::Result<(f64, String)> {
        let part = parts.next().ok_or_else(bad)?;
        let rest = part.strip_prefix(prefix).ok_or_else(bad)?;
        let (n, tail) = rest.split_once(suffix).ok_or_else(bad)?;
        Ok((n.trim().parse().map_err(|_| bad())?, tail.to_string()))
    };
    let (memory_mib, _) = number("", " MiB of memory")?;
    let (image_mib, _) = number("image ", " MiB")?;
    let (dump_ms, tail) = number("", " ms (frozen ")?;
    let frozen_ms = tail
        .strip_suffix(" ms)")
        .and_then(|n| n.trim().parse().ok())
        .ok_or_else(bad)?;
    Ok(SnapshotLine {
        memory_mib,
        image_mib,
        dump_ms,
        frozen_ms,
        after,
    })
}

/// Checks an instance of `aid` that a restore or, when `clone`, a clone
/// started: its supervisor must say it restored a clone exactly when
/// `clone`, and its memory must be whole. Returns the supervisor's restore
/// work, ms.
fn check_started(
    appshot: &Appshot,
    probe: &str,
    size: &Size,
    instance: &Instance<'_>,
    aid: &str,
    clone: bool,
) -> anyhow::Result<f64> {
    let name = instance.name();
    let what = if clone { "clone" } else { "restored instance" };
    let work = restore_work(&instance.log()?, name)?;
    if work.clone != clone {
        let said = if work.clone {
            "restored a clone"
        } else {
            "did not restore a clone"
        };
        bail!("the supervisor of {what} {name} says it {said}");
    }
    let mib = size.mib;
    size.verify(appshot, probe, aid, &format!("{what} {name} ({mib} MiB)"))?;
    Ok(work.ms)
}

#[derive(Debug, PartialEq)]
struct RestoreWork {
    ms: f64,
    clone: bool,
}

/// The supervisor's `restore work done name=NAME ms=… clone=…` line.
fn restore_work(log: &str, name: &str) -> anyhow::Result<RestoreWork> {
    let field = |line: &str, key: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
            .map(str::to_string)
    };
    let line = log
        .lines()
        .find(|l| l.contains("restore work done") && field(l, "name").as_deref() == Some(name))
        .ok_or_else(|| {
            anyhow!(
                "no `restore work done name={name}` line in the supervisor's log{}",
                procs::tail("log", log)
            )
        })?;
    let bad = || anyhow!("unexpected restore line: {line:?}");
    Ok(RestoreWork {
        ms: field(line, "ms")
            .and_then(|v| v.parse().ok())
            .ok_or_else(bad)?,
        clone: match field(line, "clone").as_deref() {
            Some("true") => true,
            Some("false") => false,
            _ => return Err(bad()),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_lines_give_their_figures() {
        let stopped = "snapshot of m1 written to /tmp/mh/s.img: 256.1 MiB of memory, image 256.1 MiB, 1754 ms (frozen 1765 ms); instance stopped\n";
        assert_eq!(
            parse_snapshot(stopped).unwrap(),
            SnapshotLine {
                memory_mib: 256.1,
                image_mib: 256.1,
                dump_ms: 1754.0,
                frozen_ms: 1765.0,
                after: After::Stopped,
            }
        );
        // A path with ": " in it does not confuse the parser.
        let running = "snapshot of a-1 written to /tmp/odd: dir/lr.img: 64.0 MiB of memory, image 64.2 MiB, 80 ms (frozen 81 ms); instance left running";
        let line = parse_snapshot(running).unwrap();
        assert_eq!((line.image_mib, line.frozen_ms), (64.2, 81.0));
        assert_eq!(line.after, After::LeftRunning);
    }

    #[test]
    fn malformed_snapshot_lines_are_errors() {
        for bad in [
            "",
            "snapshot of x written to y: 1 MiB of memory, image 1 MiB, 3 ms; instance stopped",
            "snapshot of x written to y: 1 MiB of memory, image 1 MiB, 3 ms (frozen 4 ms); instance exploded",
            "snapshot of x written to y: lots of memory, image 1 MiB, 3 ms (frozen 4 ms); instance stopped",
            "snapshot of x written to y: 1 MiB of memory, 3 ms (frozen 4 ms); instance stopped",
        ] {
            assert!(parse_snapshot(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn restore_work_is_found_by_instance_name() {
        let log = "2026-11-21T12:54:07.248349Z  INFO appshot::multiplex: tcp 127.0.0.1:18555 -> real port 18555 instance=r1 aid=m1\n\
            2026-11-21T12:54:07.252574Z  INFO appshot::supervisor: restore work done name=r1 ms=393.10896699999995 clone=false\n\
            2026-11-21T12:54:07.253633Z  INFO appshot::supervisor: instance started name=r1 aid=m1 pid=1822\n";
        assert_eq!(
            restore_work(log, "r1").unwrap(),
            RestoreWork {
                ms: 393.10896699999995,
                clone: false
            }
        );
        assert!(restore_work(log, "r").is_err());
        let clone = "x INFO appshot::supervisor: restore work done name=c1 ms=13.85 clone=true";
        assert!(restore_work(clone, "c1").unwrap().clone);
        assert!(restore_work("restore work done name=c1 ms=abc clone=true", "c1").is_err());
    }

    #[test]
    fn smaps_rollup_values_are_read_by_key() {
        let rollup = "55a5d4582000-7ffd1b9e5000 ---p 00000000 00:00 0 [rollup]\nRss:              263200 kB\nPss:               52481 kB\nPss_Dirty:            20 kB\nPrivate_Clean:         0 kB\n";
        assert_eq!(kib(rollup, "Pss").unwrap(), 52481);
        assert_eq!(kib(rollup, "Private_Clean").unwrap(), 0);
        assert!(kib(rollup, "Private_Dirty").is_err());
    }

    #[test]
    fn expected_sums_match_the_c_probe() {
        // Answers of bench/probes/memhold.c built with gcc -O2.
        assert_eq!(pattern(0), 0xe220_a839_7b1d_cdaf, "splitmix64 of 0");
        assert_eq!(format!("{:016x}", expected_sum(1)), "12c99037e91aaf8a");
        assert_eq!(format!("{:016x}", expected_sum(64)), "8baaa827d5bcecd4");
    }

    #[test]
    fn answers_must_match_exactly() {
        let want = "mib=1 sum=12c99037e91aaf8a";
        assert!(check_answer("answer mib=1 sum=12c99037e91aaf8a\n", want, "x").is_ok());
        let err = check_answer("answer mib=1 sum=0000000000000000\n", want, "x").unwrap_err();
        assert!(err.to_string().contains("not what was saved"), "{err}");
        assert!(check_answer("waiting\n", want, "x").is_err());
    }
}
