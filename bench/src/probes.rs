//! The C probes, built with gcc into the bench's temporary directory. Their
//! sources, and the header the serving ones share, are compiled into the
//! bench binary, so it runs from any working directory.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::procs;

pub const SYSCALL_COST: Probe = Probe {
    name: "syscall_cost",
    source: include_str!("../probes/syscall_cost.c"),
};

pub const NOTIFY_FLOOR: Probe = Probe {
    name: "notify_floor",
    source: include_str!("../probes/notify_floor.c"),
};

pub const CONNRATE: Probe = Probe {
    name: "connrate",
    source: include_str!("../probes/connrate.c"),
};

pub const MEMHOLD: Probe = Probe {
    name: "memhold",
    source: include_str!("../probes/memhold.c"),
};

pub const UDPRR: Probe = Probe {
    name: "udprr",
    source: include_str!("../probes/udprr.c"),
};

/// `#include "common.h"`: written next to every probe's source, where gcc
/// looks for a quoted include first.
const COMMON_H: &str = include_str!("../probes/common.h");

pub struct Probe {
    pub name: &'static str,
    pub source: &'static str,
}

impl Probe {
    /// Compiles the probe into `dir` and returns the binary's absolute path.
    pub fn build(&self, dir: &Path) -> anyhow::Result<PathBuf> {
        let src = dir.join(format!("{}.c", self.name));
        let bin = dir.join(self.name);
        std::fs::write(dir.join("common.h"), COMMON_H)?;
        std::fs::write(&src, self.source)?;
        procs::run(
            Command::new("gcc")
                .args(["-O2", "-Wall", "-Wextra", "-Werror", "-o"])
                .arg(&bin)
                .arg(&src),
            &format!("gcc of bench/probes/{}.c", self.name),
            Duration::from_secs(120),
        )?;
        Ok(bin)
    }
}

/// The value of `KEY=<number>` in a probe's output.
pub fn parse_value(output: &str, key: &str) -> anyhow::Result<f64> {
    output
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .ok_or_else(|| anyhow::anyhow!("no `{key}=` in the probe's output: {output:?}"))?
        .trim()
        .parse()
        .map_err(|e| anyhow::anyhow!("`{key}=` in {output:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_found_by_key() {
        assert_eq!(
            parse_value("ns_per_call=279.102\n", "ns_per_call").unwrap(),
            279.102
        );
        assert_eq!(
            parse_value("noise\nconns_per_s=5763.2\n", "conns_per_s").unwrap(),
            5763.2
        );
        assert!(parse_value("conns_per_s=\n", "conns_per_s").is_err());
        assert!(parse_value("", "conns_per_s").is_err());
    }
}
