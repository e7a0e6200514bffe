//! Compiles the BPF programs under `ebpf/` with clang into `$OUT_DIR/<name>.o`, with BTF (`-g`),
//! so that aya can load them and the ABI layout test can read their type information.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

/// One BPF object per attach point (docs/development.md: one `.c` per attach point).
const PROGRAMS: &[&str] = &["pod_veth", "host", "lb", "lb_xdp", "sock"];

/// The clang the project installs (scripts/bootstrap.sh); `SLIPWAY_CLANG` overrides it.
const DEFAULT_CLANG: &str = "clang-19";

fn main() {
    let manifest =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let ebpf = manifest.join("../ebpf");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let clang = env::var("SLIPWAY_CLANG").unwrap_or_else(|_| DEFAULT_CLANG.to_owned());

    println!("cargo:rerun-if-env-changed=SLIPWAY_CLANG");
    println!("cargo:rerun-if-changed={}", ebpf.display());
    for program in PROGRAMS {
        compile(&clang, &ebpf, program, &out);
    }
}

fn compile(clang: &str, ebpf: &Path, program: &str, out: &Path) {
    let source = ebpf.join(format!("{program}.c"));
    let object = out.join(format!("{program}.o"));
    let status = Command::new(clang)
        .args([
            "-O2",
            "-g",
            "-target",
            "bpf",
            "-std=gnu11",
            "-Wall",
            "-Werror",
        ])
        .arg("-D__TARGET_ARCH_x86")
        .arg(format!("-I{}", ebpf.join("include").display()))
        // linux/types.h pulls in asm/types.h, which Debian keeps under the multiarch directory.
        .arg("-I/usr/include/x86_64-linux-gnu")
        .arg("-c")
        .arg(&source)
        .arg("-o")
        .arg(&object)
        .status();
    match status {
        Ok(status) if status.success() => {}
        Ok(status) => panic!("{clang} failed to compile {} ({status})", source.display()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => panic!(
            "`{clang}` not found: the BPF programs are built with clang. Install the Debian \
             package clang-19 (scripts/bootstrap.sh does), or point SLIPWAY_CLANG at a clang \
             that targets bpf."
        ),
        Err(err) => panic!("could not run {clang}: {err}"),
    }
}
