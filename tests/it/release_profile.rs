//! The release build's execution profile (profile-guided optimization, `pgo/`): the committed
//! profile must be one this toolchain reads. rustc takes a profile it cannot read with a mere
//! warning and builds without it, so a corrupt or foreign profile would only show as a slower
//! binary; `scripts/release-build.sh` refuses it, and these tests check both sides of that.

use std::process::Command;

use crate::support::repo;

fn check(profile: Option<&std::path::Path>) -> std::process::Output {
    let mut cmd = Command::new(repo().join("scripts/release-build.sh"));
    cmd.arg("--check").current_dir(repo());
    if let Some(p) = profile {
        cmd.env("PGO_PROFILE", p);
    }
    cmd.output().expect("run scripts/release-build.sh")
}

/// The committed profile is read by this rustc, and its provenance is recorded.
#[test]
fn the_committed_profile_is_read_by_this_toolchain() {
    let out = check(None);
    assert!(
        out.status.success(),
        "scripts/release-build.sh --check failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let source = std::fs::read_to_string(repo().join("pgo/profile-source.txt"))
        .expect("pgo/profile-source.txt records where the profile came from");
    for field in ["commit: ", "rustc: ", "llvm-profdata: "] {
        assert!(
            source.lines().any(|l| l.starts_with(field)),
            "pgo/profile-source.txt has no `{field}` line:\n{source}"
        );
    }
}

/// A profile rustc cannot read stops the build with the fix named, instead of a quiet build
/// without the optimization.
#[test]
fn an_unreadable_profile_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.profdata.gz");
    // Valid gzip around bytes that are no LLVM profile.
    let mut gz = Command::new("gzip")
        .arg("-c")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("gzip");
    {
        use std::io::Write;
        let mut stdin = gz.stdin.take().unwrap();
        stdin
            .write_all(&[0x5a; 4096])
            .expect("write to gzip's stdin");
    }
    let compressed = gz.wait_with_output().expect("gzip output");
    std::fs::write(&bad, compressed.stdout).unwrap();
    let out = check(Some(&bad));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a corrupt profile was accepted");
    assert!(
        stderr.contains("is not a profile this rustc") && stderr.contains("scripts/pgo-profile.sh"),
        "the refusal names neither the cause nor the fix:\n{stderr}"
    );
}

/// Packed relative relocations (DT_RELR): this toolchain's linker and C library take them (the
/// check links and runs a probe with `-z pack-relative-relocs`), so the shipped binary carries
/// ≈ 4 KiB of relocations instead of ≈ 376 KiB that the loader reads at every start and that
/// then stay resident in every sidecar (BENCHMARKS.md, twenty-fifth session).
#[test]
fn relative_relocations_are_packed_by_this_toolchain() {
    let out = check(None);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("relative relocations packed"),
        "scripts/release-build.sh --check does not pack relative relocations:\n{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The code layout (`pgo/symbol-order.txt`): this toolchain's linker lays out code by an ordering
/// file (the check links a probe in the reverse of its source order and reads the addresses back),
/// and the committed file is the script's output, not an empty or hand-made list. Without either,
/// the release build would quietly map twice the code pages in every sidecar.
#[test]
fn the_code_layout_is_applied_by_this_toolchains_linker() {
    let out = check(None);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("code layout of pgo/symbol-order.txt"),
        "scripts/release-build.sh --check does not apply the code layout:\n{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let order = std::fs::read_to_string(repo().join("pgo/symbol-order.txt"))
        .expect("pgo/symbol-order.txt is committed");
    assert!(
        order
            .lines()
            .any(|l| l.starts_with("# Written by scripts/symbol-order.sh from ")),
        "pgo/symbol-order.txt does not say where it came from"
    );
    let names: Vec<&str> = order.lines().filter(|l| !l.starts_with('#')).collect();
    let distinct: std::collections::HashSet<&str> = names.iter().copied().collect();
    assert!(
        names.len() > 500 && distinct.len() == names.len(),
        "pgo/symbol-order.txt holds {} names ({} distinct): record it with scripts/symbol-order.sh",
        names.len(),
        distinct.len()
    );
    // Symbols of the request path that every recording has: the HTTP/2 codec and the AEAD.
    for needle in ["2h25frame", "aesni_ctr32_ghash"] {
        assert!(
            names.iter().any(|n| n.contains(needle)),
            "pgo/symbol-order.txt names no `{needle}` symbol: record it with scripts/symbol-order.sh"
        );
    }
    assert!(
        names
            .iter()
            .all(|n| !n.is_empty() && !n.contains(char::is_whitespace)),
        "pgo/symbol-order.txt has a line that is no symbol name"
    );
}
