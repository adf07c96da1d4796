//! Compiles the eBPF program in `bpf/` with clang (Debian's `clang` and
//! `libbpf-dev`, which `scripts/test.sh` and `scripts/demo.sh` install).

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").expect("target arch");
    // <linux/bpf.h> includes <asm/types.h>, which Debian keeps under the
    // host's multiarch directory; `-target bpf` does not look there.
    let multiarch = format!("/usr/include/{arch}-linux-gnu");
    let src = "bpf/udproutes.bpf.c";
    println!("cargo:rerun-if-changed={src}");
    let status = Command::new("clang")
        // v3: the connect programs' round-robin counter is an atomic
        // fetch-and-add, whose result older instruction sets cannot use.
        .args([
            "-O2", "-g", "-Wall", "-Werror", "-target", "bpf", "-mcpu=v3",
        ])
        .arg("-I")
        .arg(&multiarch)
        .args(["-c", src, "-o"])
        .arg(out.join("udproutes.bpf.o"))
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("clang {src}: {s}"),
        Err(e) => panic!(
            "running clang for {src}: {e} (install Debian's clang and libbpf-dev: scripts/test.sh does)"
        ),
    }
}
