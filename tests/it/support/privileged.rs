//! The rule of the privileged tests (eBPF, network namespaces, Docker): run where they can, skip
//! loudly where they cannot, and fail instead of skipping where CI says they must run.

use std::io::Write;
use std::process::{Command, Stdio};

/// One kind of privileged test and the variable that makes its skip a failure.
pub struct Gate {
    /// `require` in this variable turns a skip into a failure (`.ci/run` sets it).
    pub env: &'static str,
    pub what: &'static str,
    /// What a machine needs to run it.
    pub needs: &'static str,
}

/// The eBPF and network-namespace tests.
pub const EBPF: Gate = Gate {
    env: "EBPF_TESTS",
    what: "privileged eBPF test",
    needs: "run as root on Linux >= 5.9 with cgroup v2",
};

/// The compose demo test on a real Docker engine.
pub const COMPOSE: Gate = Gate {
    env: "COMPOSE_TESTS",
    what: "compose demo test",
    needs: "needs root, dockerd running, docker-compose and curl",
};

impl Gate {
    /// Skips (loudly) or, with `<env>=require`, fails.
    pub fn skip_or_fail(&self, reason: &str) {
        if std::env::var(self.env).as_deref() == Ok("require") {
            panic!("{} cannot run: {reason} ({}=require)", self.what, self.env);
        }
        // Straight to the process's stderr: libtest does not capture it, so a skip is always seen.
        let _ = writeln!(
            std::io::stderr(),
            "\n*** SKIPPED {}: {reason}\n*** {}; {}=require turns this into a failure\n",
            self.what,
            self.needs,
            self.env
        );
    }
}

/// True when `tool` is on PATH.
pub fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}
