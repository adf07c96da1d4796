//! Puts the git commit the binary was built from into `--version`.
//! From a tarball (no `.git`, or no git) it says `unknown`, unless the
//! packager gives it in `APPSHOT_COMMIT`.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let text = text.trim();
    (out.status.success() && !text.is_empty()).then(|| text.to_string())
}

fn main() {
    println!("cargo:rerun-if-env-changed=APPSHOT_COMMIT");
    let commit = std::env::var("APPSHOT_COMMIT")
        .ok()
        .or_else(|| git(&["rev-parse", "--short=12", "HEAD"]));
    // Run again when HEAD moves (a commit, a checkout); in a worktree HEAD
    // is in its own git dir, the refs in the common one. (Uncommitted
    // changes are not marked: this script does not rerun on every edit.)
    for dir in ["--git-dir", "--git-common-dir"] {
        if let Some(path) = git(&["rev-parse", "--path-format=absolute", dir]) {
            for file in ["HEAD", "refs", "packed-refs"] {
                let p = std::path::Path::new(&path).join(file);
                if p.exists() {
                    println!("cargo:rerun-if-changed={}", p.display());
                }
            }
        }
    }
    println!(
        "cargo:rustc-env=APPSHOT_COMMIT={}",
        commit.as_deref().unwrap_or("unknown")
    );
}
