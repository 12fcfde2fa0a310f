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
