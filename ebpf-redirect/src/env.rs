//! What the machine must offer: privileges, a cgroup v2 mount, bpffs. Each check names the fix.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;
const BPF_FS_MAGIC: i64 = 0xcafe4a11;
const CGROUP2_SUPER_MAGIC: i64 = 0x63677270;

/// What [`preflight`] found.
#[derive(Debug, Clone)]
pub struct Preflight {
    pub euid: u32,
    pub cap_eff: u64,
    /// The cgroup2 mount points (from /proc/self/mountinfo).
    pub cgroup2_mounts: Vec<PathBuf>,
    pub kernel_btf: bool,
    pub bpffs_mounted: bool,
}

fn cap_eff() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0)
}

/// Looks at the machine without changing anything.
pub fn preflight() -> Preflight {
    Preflight {
        // SAFETY: geteuid has no preconditions.
        euid: unsafe { libc::geteuid() },
        cap_eff: cap_eff(),
        cgroup2_mounts: cgroup2_mounts(),
        kernel_btf: Path::new("/sys/kernel/btf/vmlinux").exists(),
        bpffs_mounted: fs_magic(Path::new("/sys/fs/bpf")) == Some(BPF_FS_MAGIC),
    }
}

impl Preflight {
    /// True with CAP_BPF (or CAP_SYS_ADMIN) and CAP_NET_ADMIN.
    pub fn privileged(&self) -> bool {
        let has = |c: u32| self.cap_eff & (1u64 << c) != 0;
        (has(CAP_BPF) || has(CAP_SYS_ADMIN)) && has(CAP_NET_ADMIN)
    }

    /// Why this machine/process cannot attach, if it cannot.
    pub fn problem(&self) -> Option<Error> {
        if !self.privileged() {
            return Some(Error::NotPrivileged {
                euid: self.euid,
                cap_eff: self.cap_eff,
            });
        }
        if self.cgroup2_mounts.is_empty() {
            return Some(Error::NoCgroup2);
        }
        None
    }
}

pub(crate) fn require_privileges() -> Result<()> {
    let p = preflight();
    if !p.privileged() {
        return Err(Error::NotPrivileged {
            euid: p.euid,
            cap_eff: p.cap_eff,
        });
    }
    Ok(())
}

pub(crate) fn btf_state() -> &'static str {
    if Path::new("/sys/kernel/btf/vmlinux").exists() {
        "present"
    } else {
        "absent"
    }
}

fn unescape_mountinfo(s: &str) -> String {
    // mountinfo escapes space, tab, newline and backslash as \ooo (octal).
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && let Some(v) = std::str::from_utf8(&b[i + 1..i + 4])
                .ok()
                .and_then(|o| u8::from_str_radix(o, 8).ok())
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Mount points of type cgroup2, parsed from a mountinfo text.
pub(crate) fn parse_cgroup2_mounts(mountinfo: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let mount = pre.split_whitespace().nth(4)?;
            (post.split_whitespace().next()? == "cgroup2")
                .then(|| PathBuf::from(unescape_mountinfo(mount)))
        })
        .collect()
}

fn cgroup2_mounts() -> Vec<PathBuf> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|s| parse_cgroup2_mounts(&s))
        .unwrap_or_default()
}

fn fs_magic(p: &Path) -> Option<i64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).ok()?;
    // SAFETY: statfs writes into a zeroed struct we own; c is a valid NUL-terminated path.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        (libc::statfs(c.as_ptr(), &mut st) == 0).then_some(st.f_type as i64)
    }
}

/// Checks that `dir` is a cgroup v2 directory and returns (mount point, path below it).
pub(crate) fn cgroup_relative(dir: &Path) -> Result<(PathBuf, String)> {
    let mounts = cgroup2_mounts();
    if mounts.is_empty() {
        return Err(Error::NoCgroup2);
    }
    let not = || Error::NotCgroup2 {
        path: dir.to_path_buf(),
        mounts: mounts
            .iter()
            .map(|m| m.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
    };
    let canon = dir.canonicalize().map_err(|_| not())?;
    if fs_magic(&canon) != Some(CGROUP2_SUPER_MAGIC) {
        return Err(not());
    }
    let mount = mounts
        .iter()
        .filter(|m| canon.starts_with(m))
        .max_by_key(|m| m.as_os_str().len())
        .ok_or_else(not)?;
    let rel = canon
        .strip_prefix(mount)
        .unwrap()
        .to_string_lossy()
        .trim_matches('/')
        .to_string();
    Ok((mount.clone(), rel))
}

/// The cgroup v2 path of this process, from a `/proc/self/cgroup` text (the `0::/path` line).
pub(crate) fn parse_own_cgroup(proc_cgroup: &str) -> Option<String> {
    proc_cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| p.trim().to_string())
}

/// The pod cgroup of this process: the parent of its own cgroup v2 directory
/// (`/proc/self/cgroup` `0::/path` joined to the cgroup2 mount from `/proc/self/mountinfo`).
/// For an init container: the pod cgroup holds the app's and the sidecar's containers too.
pub fn own_pod_cgroup() -> Result<PathBuf> {
    let fix = "fix: mount the host cgroup2 and run with the host cgroup namespace (docker: \
               `--cgroupns=host -v /sys/fs/cgroup:/sys/fs/cgroup`), or pass --cgroup";
    let fail = |why: String| Error::PodCgroup(format!("{why}; {fix}"));
    let text = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| fail(format!("cannot read /proc/self/cgroup: {e}")))?;
    let own = parse_own_cgroup(&text)
        .ok_or_else(|| fail("no cgroup v2 entry (`0::/…`) in /proc/self/cgroup".into()))?;
    if own.contains("(deleted)") {
        return Err(fail(format!("this process's cgroup {own} was deleted")));
    }
    let mounts = cgroup2_mounts();
    if mounts.is_empty() {
        return Err(Error::NoCgroup2);
    }
    let rel = own.trim_start_matches('/');
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() }.to_string();
    let dir = mounts
        .iter()
        .map(|m| m.join(rel))
        .find(|d| {
            std::fs::read_to_string(d.join("cgroup.procs"))
                .is_ok_and(|procs| procs.lines().any(|l| l.trim() == pid))
        })
        .ok_or_else(|| {
            fail(format!(
                "this process's cgroup {own} (from /proc/self/cgroup) is not found under the \
                 cgroup2 mount {} with this process in it: a private cgroup namespace, or a \
                 cgroup2 mount of another namespace",
                mounts
                    .iter()
                    .map(|m| m.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
    if rel.is_empty() {
        return Err(fail(format!(
            "this process is in the root cgroup of {} (a private cgroup namespace shows \
             its root as `/`): it has no pod cgroup above it",
            dir.display()
        )));
    }
    Ok(dir
        .parent()
        .expect("a non-root path has a parent")
        .to_path_buf())
}

/// Makes sure bpffs is mounted at /sys/fs/bpf (mounting it if needed, as Cilium does).
pub(crate) fn ensure_bpffs() -> Result<()> {
    let root = Path::new("/sys/fs/bpf");
    if fs_magic(root) != Some(BPF_FS_MAGIC) {
        let _ = std::fs::create_dir_all(root);
        // SAFETY: constant NUL-terminated strings; mount has no memory preconditions.
        let rc = unsafe {
            libc::mount(
                c"bpf".as_ptr(),
                c"/sys/fs/bpf".as_ptr(),
                c"bpf".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            return Err(Error::NoBpffs {
                source: std::io::Error::last_os_error(),
            });
        }
    }
    std::fs::create_dir_all(crate::PIN_ROOT).map_err(|source| Error::Sys {
        what: format!("mkdir {}", crate::PIN_ROOT),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup_v2_line() {
        let hybrid = "12:cpu,cpuacct:/kubepods/pod1/c1\n1:name=systemd:/x\n0::/kubepods/pod1/c1\n";
        assert_eq!(
            parse_own_cgroup(hybrid).as_deref(),
            Some("/kubepods/pod1/c1")
        );
        assert_eq!(parse_own_cgroup("0::/\n").as_deref(), Some("/"));
        assert_eq!(parse_own_cgroup("3:cpu:/a\n"), None);
    }

    #[test]
    fn finds_cgroup2_in_a_hybrid_layout() {
        let mi = "25 30 0:23 / /sys/fs/cgroup rw,nosuid - tmpfs tmpfs ro,mode=755\n\
                  26 25 0:24 / /sys/fs/cgroup/unified rw,nosuid,nodev - cgroup2 cgroup2 rw\n\
                  27 25 0:25 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n\
                  28 30 0:26 / /mnt/with\\040space rw - cgroup2 none rw\n";
        assert_eq!(
            parse_cgroup2_mounts(mi),
            [
                PathBuf::from("/sys/fs/cgroup/unified"),
                PathBuf::from("/mnt/with space")
            ]
        );
    }
}
