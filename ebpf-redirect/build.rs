//! Compiles the eBPF programs (`src/bpf/redirect.bpf.c`) with clang into `$OUT_DIR/redirect.bpf.o`.
//!
//! C + Debian's clang rather than Rust eBPF (aya-ebpf): the Rust route needs nightly, rust-src,
//! llvm-22-dev and a bpf-linker build (minutes of extra CI and two MSRV pins); this needs only
//! `apt-get install clang libbpf-dev` and compiles in well under a second on the stable toolchain.
//! Building needs no privileges; only loading does.

use std::path::PathBuf;
use std::process::Command;

const FIX: &str = "install them with `apt-get install clang libbpf-dev` (or point BPF_CLANG at a clang that targets bpf)";

fn main() {
    let src = "src/bpf/redirect.bpf.c";
    println!("cargo:rerun-if-changed={src}");
    println!("cargo:rerun-if-env-changed=BPF_CLANG");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR")).join("redirect.bpf.o");
    let clang = std::env::var("BPF_CLANG").unwrap_or_else(|_| "clang".into());
    let arch = match std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() {
        Ok("x86_64") => "x86_64",
        Ok("aarch64") => "aarch64",
        Ok(other) => other,
        Err(_) => "x86_64",
    }
    .to_string();
    let multiarch = format!("/usr/include/{arch}-linux-gnu");
    let result = Command::new(&clang)
        .args(["-O2", "-g", "-Wall", "-Werror", "-target", "bpf"])
        .arg(format!("-I{multiarch}"))
        .args(["-c", src, "-o"])
        .arg(&out)
        .output();
    match result {
        Err(e) => panic!(
            "meshgate-ebpf: cannot run `{clang}` to build the eBPF programs ({e}): clang and libbpf-dev are needed at build time; {FIX}"
        ),
        Ok(o) if !o.status.success() => {
            let stderr = String::from_utf8_lossy(&o.stderr);
            let hint = if stderr.contains("bpf_helpers.h") || stderr.contains("asm/types.h") {
                "the libbpf / kernel headers are missing"
            } else {
                "clang failed"
            };
            panic!("meshgate-ebpf: {hint} while compiling {src}; {FIX}\n{stderr}");
        }
        Ok(_) => {}
    }
}
