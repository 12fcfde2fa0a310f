//! Compiles the eBPF programs (`src/bpf/redirect.bpf.c`) with clang into `$OUT_DIR/redirect.bpf.o`;
//! without clang, uses the object committed in `prebuilt/`.
//!
//! C + Debian's clang rather than Rust eBPF (aya-ebpf): the Rust route needs nightly, rust-src,
//! llvm-22-dev and a bpf-linker build (minutes of extra CI and two MSRV pins); this needs only
//! `apt-get install clang libbpf-dev` and compiles in well under a second on the stable toolchain.
//! Building needs no privileges; only loading does.
//!
//! The prebuilt object lets `cargo run -- demo` work on a machine with only a Rust toolchain. It
//! is used only while it was built from exactly the current source (`prebuilt/SOURCE_HASH`), so
//! a changed program can never run stale; a test checks that a clang build of the same version
//! gives the same bytes. `MESHGATE_BPF_REFRESH_PREBUILT=1 cargo build -p meshgate-ebpf` refreshes
//! it after the C source changed.

use std::path::{Path, PathBuf};
use std::process::Command;

const FIX: &str = "install them with `apt-get install clang libbpf-dev` (or point BPF_CLANG at a clang that targets bpf)";

/// FNV-1a 64: enough to tell whether the prebuilt object was made from this source.
fn source_hash(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

fn clang_version(clang: &str) -> Option<String> {
    let out = Command::new(clang).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    Some(text.lines().next()?.trim().to_string())
}

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("manifest dir"));
    let src = "src/bpf/redirect.bpf.c";
    let prebuilt = manifest.join("prebuilt");
    println!("cargo:rerun-if-changed={src}");
    println!("cargo:rerun-if-changed=prebuilt");
    println!("cargo:rerun-if-env-changed=BPF_CLANG");
    println!("cargo:rerun-if-env-changed=MESHGATE_BPF_REFRESH_PREBUILT");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR")).join("redirect.bpf.o");
    let hash = source_hash(&std::fs::read(manifest.join(src)).expect("the eBPF source"));
    println!("cargo:rustc-env=MESHGATE_BPF_SOURCE_HASH={hash}");
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
        // No build path in the object: the same source gives the same bytes anywhere.
        .arg(format!("-fdebug-prefix-map={}=.", manifest.display()))
        .args(["-c", src, "-o"])
        .arg(&out)
        .current_dir(&manifest)
        .output();
    let problem = match result {
        Err(e) => format!("cannot run `{clang}` ({e})"),
        Ok(o) if !o.status.success() => {
            let stderr = String::from_utf8_lossy(&o.stderr);
            let hint = if stderr.contains("bpf_helpers.h") || stderr.contains("asm/types.h") {
                "the libbpf / kernel headers are missing"
            } else {
                "clang failed"
            };
            format!("{hint} while compiling {src}:\n{stderr}")
        }
        Ok(_) => {
            let version = clang_version(&clang).unwrap_or_default();
            println!("cargo:rustc-env=MESHGATE_BPF_BUILT_WITH={version}");
            if std::env::var_os("MESHGATE_BPF_REFRESH_PREBUILT").is_some() {
                refresh_prebuilt(&prebuilt, &out, &hash, &version);
            }
            return;
        }
    };
    use_prebuilt(&prebuilt, &out, &hash, &problem);
}

/// Without a working clang: the committed object, if it was built from this very source.
fn use_prebuilt(prebuilt: &Path, out: &Path, hash: &str, problem: &str) {
    let recorded = std::fs::read_to_string(prebuilt.join("SOURCE_HASH")).unwrap_or_default();
    if recorded.trim() != hash {
        panic!(
            "meshgate-ebpf: {problem}\nand prebuilt/redirect.bpf.o was built from another version of the source, so it cannot stand in; clang and libbpf-dev are needed to build it: {FIX}"
        );
    }
    std::fs::copy(prebuilt.join("redirect.bpf.o"), out).expect("copy the prebuilt eBPF object");
    println!("cargo:rustc-env=MESHGATE_BPF_BUILT_WITH=prebuilt");
    println!(
        "cargo:warning=clang unavailable ({}): using the prebuilt eBPF object (built from this very source); to build it yourself, `apt-get install clang libbpf-dev`",
        problem.lines().next().unwrap_or(problem)
    );
}

fn refresh_prebuilt(prebuilt: &Path, built: &Path, hash: &str, version: &str) {
    std::fs::create_dir_all(prebuilt).expect("create prebuilt/");
    std::fs::copy(built, prebuilt.join("redirect.bpf.o")).expect("write prebuilt/redirect.bpf.o");
    std::fs::write(prebuilt.join("SOURCE_HASH"), format!("{hash}\n")).expect("write SOURCE_HASH");
    std::fs::write(prebuilt.join("CLANG_VERSION"), format!("{version}\n"))
        .expect("write CLANG_VERSION");
    println!("cargo:warning=refreshed prebuilt/redirect.bpf.o ({version}, source {hash})");
}
