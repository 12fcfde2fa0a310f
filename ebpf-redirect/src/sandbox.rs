//! Network namespaces and cgroup v2 directories for running workloads "like pods" on one machine:
//! the sandbox of `meshgate demo --with-ebpf` and of the privileged eBPF tests.
//!
//! A [`Sandbox`] named `N` owns, and only creates:
//! - the cgroup directory `<cgroup2 mount>/N` and everything below it ([`Sandbox::cgroup`]),
//! - the network namespaces `N-<suffix>` ([`Sandbox::netns`]) and the links inside them,
//! - a lock file (`/run/meshgate-N.lock` unless told otherwise), held (flock) while the sandbox
//!   lives, so two processes never use the same names at once.
//!
//! Whatever a run leaves behind (it crashed or was killed) is removed when the next sandbox of the
//! same name is created: the lock is free, so nothing else uses those names. [`Sandbox::cleanup`]
//! (and `Drop`, if it was not called) removes everything, in an order that works: the processes in
//! its cgroups are killed, the eBPF attachments of its cgroups are detached (also those of cgroups
//! already gone), the namespaces are deleted (their veths and bridges go with them), the cgroups
//! are removed leaves first, then the lock file.
//!
//! Processes enter a pod with [`enter`]: the cgroup first (through `cgroup.procs`), then the
//! network namespace (`setns`), not with `ip netns exec`, which would hide the cgroup2 mount.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Where `ip netns` keeps its named namespaces.
pub const NETNS_DIR: &str = "/run/netns";

/// Everything that goes wrong, each naming the cause and the fix.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The sandbox name or a namespace suffix would not make a plain file name.
    #[error(
        "`{name}` is not a usable sandbox or namespace name; fix: use letters, digits, `-` and `_` only"
    )]
    InvalidName { name: String },
    /// There is no cgroup v2 to create the cgroups in.
    #[error(
        "no cgroup v2 mount (no `cgroup2` entry in /proc/self/mountinfo); fix: mount it \
         (`mount -t cgroup2 none /sys/fs/cgroup/unified`) or boot with systemd.unified_cgroup_hierarchy=1"
    )]
    NoCgroup2,
    /// Another process uses a sandbox of the same name.
    #[error(
        "another process is using the sandbox `{name}` (it holds {lock}); fix: stop it first \
         (Ctrl-C), or wait until it ends"
    )]
    Busy { name: String, lock: PathBuf },
    /// A file or directory operation failed.
    #[error("cannot {action} {path}: {source}; fix: run as root on a host with cgroup v2 and /run")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    /// An `ip` command failed (or could not run).
    #[error(
        "network setup failed: `{command}`: {detail}; fix: install iproute2 (`apt-get install \
         iproute2`) and run as root"
    )]
    Ip { command: String, detail: String },
    /// A previous run of the same sandbox left things that cannot be removed.
    #[error(
        "a previous run left things behind that cannot be removed: {}; fix: remove them by hand \
         (`ip netns del`, `meshgate redirect detach --cgroup`, `rmdir`)",
        left.join(", ")
    )]
    Leftovers { left: Vec<String> },
    /// [`Sandbox::cleanup`] could not remove everything.
    #[error(
        "cleanup incomplete: {}; fix: remove them by hand (`ip netns del`, `meshgate redirect \
         detach --cgroup`, `rmdir`)",
        left.join(", ")
    )]
    Incomplete { left: Vec<String> },
}

fn valid_name(name: &str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidName { name: name.into() })
    }
}

/// The namespaces, cgroups and eBPF attachments of one named sandbox; removed on
/// [`Sandbox::cleanup`] or drop.
#[derive(Debug)]
pub struct Sandbox {
    name: String,
    cg_root: PathBuf,
    lock_path: PathBuf,
    lock: Option<File>,
    cleaned_leftovers: bool,
    done: bool,
}

impl Sandbox {
    /// Takes the sandbox `name` (its lock, `/run/meshgate-<name>.lock`), removes what an earlier
    /// run of it left behind, and creates its cgroup root `<cgroup2 mount>/<name>`.
    pub fn create(name: &str) -> Result<Sandbox, Error> {
        Sandbox::create_with_lock(name, format!("/run/meshgate-{name}.lock"))
    }

    /// [`Sandbox::create`] with the lock file at `lock_path` (for a program whose lock has a
    /// name of its own).
    pub fn create_with_lock(name: &str, lock_path: impl Into<PathBuf>) -> Result<Sandbox, Error> {
        valid_name(name)?;
        let mount = crate::preflight()
            .cgroup2_mounts
            .into_iter()
            .next()
            .ok_or(Error::NoCgroup2)?;
        let lock_path = lock_path.into();
        let lock = File::create(&lock_path).map_err(|source| Error::Io {
            action: "create the lock file",
            path: lock_path.clone(),
            source,
        })?;
        // SAFETY: flock on an fd we own.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(Error::Busy {
                name: name.into(),
                lock: lock_path,
            });
        }
        let mut sandbox = Sandbox {
            name: name.into(),
            cg_root: mount.join(name),
            lock_path,
            lock: Some(lock),
            cleaned_leftovers: false,
            done: false,
        };
        if sandbox.leftovers() {
            let left = sandbox.remove_everything();
            if !left.is_empty() {
                // Nothing was created by this run: keep the lock file, drop only the lock.
                sandbox.done = true;
                return Err(Error::Leftovers { left });
            }
            sandbox.cleaned_leftovers = true;
        }
        sandbox.cgroup("")?;
        Ok(sandbox)
    }

    /// The sandbox's name (the prefix of its namespaces, the name of its cgroup root).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// True when [`Sandbox::create`] found and removed what an earlier run left behind.
    pub fn cleaned_leftovers(&self) -> bool {
        self.cleaned_leftovers
    }

    /// `<cgroup2 mount>/<name>`: every cgroup of the sandbox is below it.
    pub fn cgroup_root(&self) -> &Path {
        &self.cg_root
    }

    /// Creates the cgroup `rel` (a relative path such as `web/app`) below the root, with its
    /// parents, and returns its path. Creating one that exists is fine.
    pub fn cgroup(&self, rel: &str) -> Result<PathBuf, Error> {
        let dir = self.cg_root.join(rel);
        if !dir.starts_with(&self.cg_root) || rel.split('/').any(|c| c == "..") {
            return Err(Error::InvalidName { name: rel.into() });
        }
        std::fs::create_dir_all(&dir).map_err(|source| Error::Io {
            action: "create cgroup",
            path: dir.clone(),
            source,
        })?;
        Ok(dir)
    }

    /// Creates the network namespace `<name>-<suffix>` with its loopback up; returns its name.
    pub fn netns(&self, suffix: &str) -> Result<String, Error> {
        valid_name(suffix)?;
        let ns = format!("{}-{suffix}", self.name);
        ip(&["netns", "add", &ns])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// A veth pair: `a.1` in namespace `a.0`, `b.1` in namespace `b.0`, both up.
    pub fn veth(&self, a: (&str, &str), b: (&str, &str)) -> Result<(), Error> {
        ip(&[
            "-n", a.0, "link", "add", a.1, "type", "veth", "peer", "name", b.1, "netns", b.0,
        ])?;
        ip(&["-n", a.0, "link", "set", a.1, "up"])?;
        ip(&["-n", b.0, "link", "set", b.1, "up"])
    }

    /// A bridge `bridge` in namespace `ns` with address `cidr` (e.g. `10.198.0.1/24`), up.
    pub fn bridge(&self, ns: &str, bridge: &str, cidr: &str) -> Result<(), Error> {
        ip(&["-n", ns, "link", "add", bridge, "type", "bridge"])?;
        self.addr(ns, bridge, cidr)?;
        ip(&["-n", ns, "link", "set", bridge, "up"])
    }

    /// Plugs `dev` (in namespace `ns`) into the bridge `bridge` of the same namespace.
    pub fn plug(&self, ns: &str, dev: &str, bridge: &str) -> Result<(), Error> {
        ip(&["-n", ns, "link", "set", dev, "master", bridge, "up"])
    }

    /// Adds the address `cidr` (e.g. `10.199.0.1/24`) to `dev` in namespace `ns`.
    pub fn addr(&self, ns: &str, dev: &str, cidr: &str) -> Result<(), Error> {
        ip(&["-n", ns, "addr", "add", cidr, "dev", dev])
    }

    /// Removes everything the sandbox (or an earlier run of it) created. Safe to call twice;
    /// `Drop` calls it when it was not called.
    pub fn cleanup(&mut self) -> Result<(), Error> {
        if self.done {
            return Ok(());
        }
        self.done = true;
        let left = self.remove_everything();
        drop(self.lock.take());
        let _ = std::fs::remove_file(&self.lock_path);
        if left.is_empty() {
            Ok(())
        } else {
            Err(Error::Incomplete { left })
        }
    }

    fn netns_prefix(&self) -> String {
        format!("{}-", self.name)
    }

    fn pin_prefix(&self) -> String {
        // The pin directory of a cgroup is its path below the mount with `/` as `_`.
        format!("{}_", self.name)
    }

    /// The namespaces of this name that exist.
    fn namespaces(&self) -> Vec<String> {
        let prefix = self.netns_prefix();
        names_in(Path::new(NETNS_DIR))
            .into_iter()
            .filter(|n| n.starts_with(&prefix))
            .collect()
    }

    /// The pin directories of this sandbox's cgroups that exist.
    fn pins(&self) -> Vec<String> {
        let prefix = self.pin_prefix();
        names_in(Path::new(crate::PIN_ROOT))
            .into_iter()
            .filter(|n| n.starts_with(&prefix) || *n == self.name)
            .collect()
    }

    fn leftovers(&self) -> bool {
        self.cg_root.exists() || !self.namespaces().is_empty() || !self.pins().is_empty()
    }

    /// Kills the processes in the cgroups, detaches their eBPF programs, deletes the namespaces
    /// and the cgroups. Safe when nothing exists. Returns what is still there afterwards.
    fn remove_everything(&self) -> Vec<String> {
        let mut left = Vec::new();
        // Deepest first: the order cgroups must be removed in.
        let mut cgroups = Vec::new();
        if self.cg_root.is_dir() {
            collect_dirs(&self.cg_root, &mut cgroups);
        }
        cgroups.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        // 1. Processes (this run's, a crashed run's, or anyone who joined the cgroups).
        for cg in &cgroups {
            kill_all(cg);
        }
        // 2. eBPF: every attachment on a cgroup of the sandbox, also of cgroups already gone.
        if !self.pins().is_empty() {
            let attached = crate::status_report(None)
                .map(|r| r.attachments)
                .unwrap_or_default();
            let mut errors = std::collections::HashMap::new();
            for a in attached {
                let cg = Path::new(&a.cgroup);
                if cg.starts_with(&self.cg_root) {
                    match crate::detach(cg) {
                        Ok(_) | Err(crate::Error::NotAttached { .. }) => {}
                        Err(e) => {
                            errors.insert(a.pin_dir, e.to_string());
                        }
                    }
                }
            }
            for pin in self.pins() {
                let p = Path::new(crate::PIN_ROOT).join(pin);
                left.push(match errors.get(&p) {
                    Some(e) => format!("eBPF pins {} ({e})", p.display()),
                    None => format!("eBPF pins {}", p.display()),
                });
            }
        }
        // 3. Network namespaces (their veths and bridges go with them).
        for ns in self.namespaces() {
            let _ = Command::new("ip").args(["netns", "del", &ns]).output();
            if Path::new(NETNS_DIR).join(&ns).exists() {
                left.push(format!("netns {ns}"));
            }
        }
        // 4. Cgroups, leaves first (a killed process leaves its cgroup a moment later).
        for d in cgroups {
            let until = Instant::now() + Duration::from_secs(3);
            while d.exists() && std::fs::remove_dir(&d).is_err() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(20));
            }
            if d.exists() {
                left.push(format!("cgroup {}", d.display()));
            }
        }
        left
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = self.cleanup();
    }
}

/// Runs `ip ARGS`; an error names the command and what `ip` said.
pub fn ip(args: &[&str]) -> Result<(), Error> {
    let command = format!("ip {}", args.join(" "));
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| Error::Ip {
            command: command.clone(),
            detail: e.to_string(),
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Error::Ip {
            command,
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Makes `cmd` start inside a pod: in the cgroup `cgroup` first (so everything it does is
/// attributed to it), then in the network namespace `netns`, then (with `uid`) as that uid and
/// gid without supplementary groups. The child also gets its own process group (a Ctrl-C reaches
/// only the parent, which stops it in order) and is killed when the thread that spawned it exits.
pub fn enter(cmd: &mut Command, netns: &str, cgroup: &Path, uid: Option<u32>) -> Result<(), Error> {
    let procs_path = cgroup.join("cgroup.procs");
    let procs = CString::new(procs_path.to_string_lossy().into_owned()).map_err(|e| Error::Io {
        action: "use cgroup",
        path: procs_path.clone(),
        source: io::Error::new(io::ErrorKind::InvalidInput, e),
    })?;
    let ns_path = Path::new(NETNS_DIR).join(netns);
    let ns = File::open(&ns_path).map_err(|source| Error::Io {
        action: "open network namespace",
        path: ns_path,
        source,
    })?;
    // SAFETY: the closure only makes async-signal-safe calls (prctl, setpgid, open, write,
    // close, setns, setgroups, setgid, setuid) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            libc::setpgid(0, 0);
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
            if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                return Err(io::Error::last_os_error());
            }
            libc::close(fd);
            if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(io::Error::last_os_error());
            }
            if let Some(uid) = uid
                && (libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(uid) != 0
                    || libc::setuid(uid) != 0)
            {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

fn names_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// `dir` and every directory below it.
fn collect_dirs(dir: &Path, out: &mut Vec<PathBuf>) {
    out.push(dir.to_path_buf());
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                collect_dirs(&e.path(), out);
            }
        }
    }
}

/// Kills every process in the cgroup: `cgroup.kill` where the kernel has it (5.14+), SIGKILL to
/// each pid in `cgroup.procs` otherwise.
fn kill_all(cgroup: &Path) {
    let kill = cgroup.join("cgroup.kill");
    if kill.exists() {
        let _ = std::fs::write(&kill, "1");
    } else if let Ok(procs) = std::fs::read_to_string(cgroup.join("cgroup.procs")) {
        for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            // SAFETY: kill has no memory preconditions.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_plain() {
        for ok in ["mgdemo", "mgt123r", "a_b-c"] {
            assert!(valid_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a/b", "..", "a b", "ä"] {
            let e = valid_name(bad).unwrap_err().to_string();
            assert!(e.contains("fix:"), "{e}");
        }
    }

    #[test]
    fn errors_name_the_fix() {
        let e = Error::Incomplete {
            left: vec!["netns x-a".into(), "cgroup /c/x".into()],
        };
        assert!(
            e.to_string()
                .starts_with("cleanup incomplete: netns x-a, cgroup /c/x; fix:"),
            "{e}"
        );
    }
}
