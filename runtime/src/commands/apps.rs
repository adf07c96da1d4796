//! Host-wide application configs: the configurator supplies, for a given
//! application pathname, its AID, ports and source rules without help from
//! the application. Each `*.toml` in the apps directory names the
//! `executable` it applies to; `run` without `--config` uses the one whose
//! executable is the command's.

use std::path::{Path, PathBuf};

use appshot_configurator::AppConfig;

use crate::error::{FileOp, RuntimeError};

/// Where the host's application configs live (`APPSHOT_APPS_DIR`
/// overrides it, for tests and unusual layouts).
pub const DEFAULT_DIR: &str = "/etc/appshot/apps.d";
pub const DIR_ENV: &str = "APPSHOT_APPS_DIR";

pub fn dir() -> PathBuf {
    std::env::var_os(DIR_ENV).map_or_else(|| PathBuf::from(DEFAULT_DIR), PathBuf::from)
}

/// The `*.toml` files of `dir`, sorted; none if it does not exist.
pub fn files(dir: &Path) -> Result<Vec<PathBuf>, RuntimeError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(RuntimeError::file(FileOp::Read, dir, e)),
    };
    let mut files: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    Ok(files)
}

/// A path as the kernel resolves it (symlinks followed), when it exists.
fn resolved(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

/// The configs of `files` that name an executable, by its resolved path.
/// Two files claiming one executable are refused, naming both.
pub fn claims(files: &[PathBuf]) -> Result<Vec<(PathBuf, PathBuf, AppConfig)>, RuntimeError> {
    let mut claimed: Vec<(PathBuf, PathBuf, AppConfig)> = Vec::new();
    for file in files {
        let config = AppConfig::load(file)?;
        let Some(exe) = config.executable.as_deref().map(resolved) else {
            continue;
        };
        if let Some((_, first, _)) = claimed.iter().find(|(e, _, _)| *e == exe) {
            return Err(RuntimeError::AppClaimedTwice {
                executable: exe,
                first: first.clone(),
                second: file.clone(),
            });
        }
        claimed.push((exe, file.clone(), config));
    }
    Ok(claimed)
}

/// The program `command` runs, found like `execvp` does.
fn program_path(command: &str) -> Option<PathBuf> {
    if command.contains('/') {
        return Some(resolved(Path::new(command)));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(command))
        .find(|p| p.is_file())
        .map(|p| resolved(&p))
}

/// The host-wide config of the program `command` runs, with its file.
pub fn for_command(command: &str) -> Result<Option<(PathBuf, AppConfig)>, RuntimeError> {
    let Some(program) = program_path(command) else {
        return Ok(None);
    };
    Ok(claims(&files(&dir())?)?
        .into_iter()
        .find(|(exe, _, _)| *exe == program)
        .map(|(_, file, config)| (file, config)))
}
