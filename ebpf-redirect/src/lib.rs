//! meshgate-ebpf: the eBPF programs that steer a workload's connections into its sidecar and
//! enforce L3/L4 fallback rules, and their loader.
//!
//! The programs are C (`src/bpf/redirect.bpf.c`), compiled by clang in `build.rs` and loaded with
//! aya 0.14. Everything is pinned under bpffs, `/sys/fs/bpf/meshgate/<cgroup-name>/`, so the
//! attachment outlives the process that made it (never fail open) and a later process finds it:
//!
//! | pin | what |
//! |---|---|
//! | `link_connect4`, `link_connect6` | `cgroup/connect4`/`6` on the app cgroup: exempt, redirect to `127.0.0.1:<outbound>` (recording the original destination), allow (allowlist), or deny (`EPERM`) |
//! | `link_sendmsg4`, `link_sendmsg6` | the same decision for unconnected UDP (`sendto`): allow or deny, never redirect |
//! | `link_sockops` | moves the original destination from socket cookie to 4-tuple when the connection is up, and puts the pod's local hops into `local_socks` |
//! | `link_sockops_sidecar` | the same program on the sidecar's cgroup, for the sidecar's ends of the local hops; one of the two links is left out when one cgroup contains the other (the program must run once per socket) |
//! | `link_getsockopt` | on the sidecar's cgroup: answers `getsockopt(SOL_IP, SO_ORIGINAL_DST)` |
//! | `link_ingress` | `cgroup_skb/ingress` on the app cgroup: the app's ports accept only loopback (the local sidecar) |
//! | `config`, `policy`, `app_ports`, `meta` | configuration (rewritten in place by a repeated `attach`) |
//! | `counters`, `port_counters` | verdict counters; read them with [`Counters::read_pinned`] |
//! | `orig_by_cookie`, `orig_by_tuple` | original destinations of redirected connections |
//! | `local_socks`, `local_tcp` | local acceleration: the local hops' sockets (an `sk_msg` program attached to this map passes what one end sends straight into the other end's receive queue), and, in socket-local storage, the hops' sockets that stay on TCP |
//!
//! **Local acceleration** ([`AttachConfig::accelerate_local`], on by default): the two hops of a
//! request that never leave the pod, app → sidecar's outbound listener and sidecar → app port,
//! both over IPv4 loopback, skip the kernel's TCP/IP stack: a message sent on one end is queued on
//! the other end's socket directly (a sockhash and `bpf_msg_redirect_hash`, as Cilium's and
//! Merbridge's socket-level acceleration). Nothing about what the sidecar sees or decides
//! changes; the kernel's work per message does. A connection whose peer socket is not found (not
//! in this pod's cgroups, or not yet established) stays on TCP for its whole life, so bytes are
//! never reordered between the two paths.
//!
//! The sidecar's own sockets are exempt **by cgroup**: the sidecar runs in a different cgroup than
//! the app (the programs on the app cgroup never see it), and its cgroup id is also checked inside
//! the programs, so attaching to a parent cgroup that contains the sidecar does not loop either.
//! Or **by uid** ([`AttachConfig::sidecar_uid`], Istio's 1337): for a sidecar that shares the
//! app's cgroup, e.g. when attaching to a Kubernetes pod cgroup from an init container.

use std::collections::BTreeSet;
use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap, Map, MapData};
use aya::programs::{CgroupSkb, CgroupSockAddr, CgroupSockopt, SkMsg, SockOps};

mod env;
mod rules;
pub mod sandbox;
mod sys;

pub use env::{Preflight, own_pod_cgroup, preflight};
pub use rules::{PolicyRules, PolicyRulesError, Rule, from_policy, loopback};

/// Where everything is pinned: one directory per attached cgroup.
pub const PIN_ROOT: &str = "/sys/fs/bpf/meshgate";

static OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/redirect.bpf.o"));

const F_LOOPBACK_EXEMPT: u32 = 1;
const F_ENFORCE_EGRESS: u32 = 2;
const F_ENFORCE_INGRESS: u32 = 4;
const F_ACCEL_LOCAL: u32 = 8;

const K_EXEMPT: u8 = 1;
const K_MESH: u8 = 2;
const K_ALLOW: u8 = 3;

/// Everything that goes wrong, each naming the cause and the fix.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "not privileged: loading and attaching eBPF programs needs root, or CAP_BPF + CAP_NET_ADMIN \
         (CAP_SYS_ADMIN on kernels < 5.8) (euid={euid}, CapEff={cap_eff:#x}); fix: run as root, or \
         grant them, e.g. `setcap cap_bpf,cap_net_admin,cap_sys_admin+ep meshgate`"
    )]
    NotPrivileged { euid: u32, cap_eff: u64 },
    #[error(
        "no cgroup v2 mount (no `cgroup2` entry in /proc/self/mountinfo); fix: mount it \
         (`mount -t cgroup2 none /sys/fs/cgroup/unified`) or boot with systemd.unified_cgroup_hierarchy=1"
    )]
    NoCgroup2,
    #[error(
        "{path} is not a cgroup v2 directory (cgroup2 is mounted at {mounts}); fix: pass a \
         directory under the cgroup2 mount (create it with mkdir and move the workload into it)"
    )]
    NotCgroup2 { path: PathBuf, mounts: String },
    #[error(
        "bpffs is not mounted at /sys/fs/bpf and mounting it failed ({source}); fix: \
         `mount -t bpf bpf /sys/fs/bpf`"
    )]
    NoBpffs { source: io::Error },
    #[error(
        "cgroup {cgroup} already has a {hook} program attached by someone else (program id \
         {prog_id}, name {name:?}); meshgate will not stack a second redirect on it. Fix: detach it \
         (`bpftool cgroup detach {cgroup} {hook} id {prog_id}`), or if it is a meshgate attach \
         whose pins were removed, the same command clears it"
    )]
    AttachedByOther {
        cgroup: PathBuf,
        hook: &'static str,
        prog_id: u32,
        name: String,
    },
    #[error(
        "pin directory {pin_dir} belongs to another cgroup ({other}, id {other_id}), not {cgroup} \
         (id {cgroup_id}); fix: `meshgate redirect detach --cgroup {other}` first"
    )]
    PinDirTaken {
        pin_dir: PathBuf,
        cgroup: PathBuf,
        cgroup_id: u64,
        other: String,
        other_id: u64,
    },
    #[error("cannot find this process's pod cgroup (--pod): {0}")]
    PodCgroup(String),
    #[error("nothing is attached for {cgroup} (no pins in {pin_dir})")]
    NotAttached { cgroup: PathBuf, pin_dir: PathBuf },
    #[error(
        "loading the eBPF programs failed: {detail}\n(kernel BTF /sys/kernel/btf/vmlinux: {btf}; \
         these programs need no kernel BTF. If the message names BTF, the kernel refused the \
         object's own BTF: fix: a kernel with CONFIG_DEBUG_INFO_BTF=y and >= 5.9)"
    )]
    Load { detail: String, btf: &'static str },
    #[error("{what}: {source}")]
    Sys { what: String, source: io::Error },
    #[error("invalid configuration: {0}")]
    Config(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

fn sys_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
    let what = what.into();
    move |source| Error::Sys { what, source }
}

fn map_err(what: &str) -> impl FnOnce(aya::maps::MapError) -> Error + '_ {
    move |e| Error::Sys {
        what: format!("map {what}"),
        source: io::Error::other(e.to_string()),
    }
}

/// What `meshgate redirect attach` sets up.
#[derive(Debug, Clone)]
pub struct AttachConfig {
    /// The app's cgroup v2 directory: its connects are redirected, its ports guarded.
    pub cgroup: PathBuf,
    /// The sidecar's cgroup (gets the `SO_ORIGINAL_DST` program; its sockets are never
    /// redirected). Default: the parent of `cgroup` (the pod, holding app and sidecar).
    pub sidecar_cgroup: Option<PathBuf>,
    /// The sidecar's outbound listener port on 127.0.0.1.
    pub outbound_port: u16,
    /// The sidecar's inbound (mTLS) port, for the record.
    pub inbound_port: u16,
    /// The app's ports: reachable only over loopback (from the local sidecar).
    pub app_ports: Vec<u16>,
    /// Destinations reached directly without any check (control plane, CA, …).
    pub exempt: Vec<Rule>,
    /// Exempt 127.0.0.0/8 and ::1 (default true).
    pub exempt_loopback: bool,
    /// Mesh destinations: redirected to the sidecar.
    pub mesh: Vec<Rule>,
    /// Egress allowlist for non-mesh destinations (direct, no sidecar).
    pub egress_allow: Vec<Rule>,
    /// Deny (EPERM) non-mesh destinations that are not allowlisted (default true).
    pub enforce_egress: bool,
    /// Drop packets to the app's ports that do not come over loopback (default true).
    pub enforce_ingress: bool,
    /// Sockets of tasks running as this uid are the sidecar's: never redirected or enforced
    /// (Istio's 1337 convention). With it, `sidecar_cgroup` may equal `cgroup` (a pod cgroup
    /// holding both app and sidecar).
    pub sidecar_uid: Option<u32>,
    /// Local acceleration of the pod's loopback hops between the app and its sidecar (default
    /// true; see the crate documentation). Takes effect for connections established after it is
    /// set: turning it off leaves the accelerated connections as they are until they close.
    pub accelerate_local: bool,
}

impl AttachConfig {
    pub fn new(cgroup: impl Into<PathBuf>, outbound_port: u16, inbound_port: u16) -> Self {
        AttachConfig {
            cgroup: cgroup.into(),
            sidecar_cgroup: None,
            outbound_port,
            inbound_port,
            app_ports: Vec::new(),
            exempt: Vec::new(),
            exempt_loopback: true,
            mesh: Vec::new(),
            egress_allow: Vec::new(),
            enforce_egress: true,
            enforce_ingress: true,
            sidecar_uid: None,
            accelerate_local: true,
        }
    }
}

/// The outcome of [`attach`].
#[derive(Debug, Clone)]
pub struct Attached {
    pub pin_dir: PathBuf,
    /// True when the programs were already attached (pins found) and only the configuration was
    /// rewritten.
    pub reused: bool,
    pub elapsed: Duration,
    /// Why local acceleration could not be loaded (a kernel older than 5.15), when it could not:
    /// everything else is attached, and the local hops stay on TCP.
    pub local_accel_unavailable: Option<String>,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct RawConfig {
    cgroup_id: u64,
    sidecar_cgroup_id: u64,
    outbound_port: u16,
    inbound_port: u16,
    flags: u32,
    /// u32::MAX = no sidecar uid.
    sidecar_uid: u32,
    pad: u32,
}
// SAFETY: plain old data, repr(C), no padding (8 + 8 + 2 + 2 + 4 + 4 + 4 = 32).
unsafe impl aya::Pod for RawConfig {}

#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
struct PolicyData {
    kind: u8,
    pad: u8,
    port_be: u16,
    addr: [u8; 16],
}
// SAFETY: plain old data, repr(C), 20 bytes, no padding.
unsafe impl aya::Pod for PolicyData {}

#[repr(C)]
#[derive(Clone, Copy)]
struct Meta {
    cgroup: [u8; 256],
    sidecar_cgroup: [u8; 256],
}
// SAFETY: plain old data.
unsafe impl aya::Pod for Meta {}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct PortKey {
    port: u16,
    verdict: u8,
    pad: u8,
}
// SAFETY: plain old data, 4 bytes.
unsafe impl aya::Pod for PortKey {}

/// Where a program's link attaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    /// The app's cgroup.
    App,
    /// The sidecar's cgroup.
    Sidecar,
    /// sockops, which must run once for every socket of both app and sidecar: on the app's
    /// cgroup, unless the sidecar's cgroup contains it (then [`Target::SockopsSidecar`] covers
    /// both; running twice would put a socket into the sockhash twice).
    SockopsApp,
    /// sockops on the sidecar's cgroup, unless the app's cgroup is or contains it.
    SockopsSidecar,
}

/// How the app's and the sidecar's cgroups lie in the cgroup tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Nesting {
    /// One cgroup for both (a sidecar exempt by uid).
    Same,
    /// The sidecar's cgroup contains the app's (the default: the pod, holding the app).
    SidecarAbove,
    /// The app's cgroup contains the sidecar's.
    AppAbove,
    /// Neither contains the other.
    Apart,
}

impl Nesting {
    /// From the two cgroups' paths (below the cgroup2 mount, or both absolute).
    fn of(app: &Path, sidecar: &Path) -> Self {
        if app == sidecar {
            Nesting::Same
        } else if app.starts_with(sidecar) {
            Nesting::SidecarAbove
        } else if sidecar.starts_with(app) {
            Nesting::AppAbove
        } else {
            Nesting::Apart
        }
    }
}

/// The programs attached to cgroups: (object name, pin name, hook name for messages, attach
/// type, where).
const PROGRAMS: [(&str, &str, &str, u32, Target); 8] = [
    (
        "mg_connect4",
        "link_connect4",
        "connect4",
        sys::ATTACH_CONNECT4,
        Target::App,
    ),
    (
        "mg_connect6",
        "link_connect6",
        "connect6",
        sys::ATTACH_CONNECT6,
        Target::App,
    ),
    (
        "mg_sendmsg4",
        "link_sendmsg4",
        "sendmsg4",
        sys::ATTACH_SENDMSG4,
        Target::App,
    ),
    (
        "mg_sendmsg6",
        "link_sendmsg6",
        "sendmsg6",
        sys::ATTACH_SENDMSG6,
        Target::App,
    ),
    (
        "mg_sockops",
        "link_sockops",
        "sock_ops",
        sys::ATTACH_SOCK_OPS,
        Target::SockopsApp,
    ),
    (
        "mg_sockops",
        "link_sockops_sidecar",
        "sock_ops_sidecar",
        sys::ATTACH_SOCK_OPS,
        Target::SockopsSidecar,
    ),
    (
        "mg_ingress",
        "link_ingress",
        "ingress",
        sys::ATTACH_INGRESS,
        Target::App,
    ),
    (
        "mg_getsockopt",
        "link_getsockopt",
        "getsockopt",
        sys::ATTACH_GETSOCKOPT,
        Target::Sidecar,
    ),
];

const MAPS: [&str; 10] = [
    "config",
    "policy",
    "app_ports",
    "meta",
    "counters",
    "port_counters",
    "orig_by_cookie",
    "orig_by_tuple",
    "local_socks",
    "local_tcp",
];

/// The local acceleration program, attached to the map `local_socks` (not a link: an attachment
/// to a map lasts as long as the map, which is pinned).
const LOCAL_MSG: &str = "mg_local_msg";

/// The sockops program with local acceleration, loaded in place of `mg_sockops` where the
/// kernel accepts it (>= 5.15).
const SOCKOPS_ACCEL: &str = "mg_sockops_accel";

/// The pin directory for a cgroup: its path below the cgroup2 mount, `/` replaced by `_`.
pub fn pin_dir_for(cgroup: &Path) -> Result<PathBuf> {
    let (_, rel) = env::cgroup_relative(cgroup)?;
    let name = if rel.is_empty() {
        "root".to_string()
    } else {
        rel.replace('/', "_")
    };
    Ok(Path::new(PIN_ROOT).join(name))
}

fn cgroup_id(dir: &Path) -> Result<u64> {
    Ok(std::fs::metadata(dir)
        .map_err(sys_err(format!("cgroup {}", dir.display())))?
        .ino())
}

fn open_dir(dir: &Path) -> Result<File> {
    File::open(dir).map_err(sys_err(format!("open cgroup {}", dir.display())))
}

fn pinned_map(pin_dir: &Path, name: &str) -> Result<Map> {
    let data = MapData::from_pin(pin_dir.join(name)).map_err(map_err(name))?;
    Map::from_map_data(data).map_err(map_err(name))
}

fn policy_entries(cfg: &AttachConfig) -> Vec<(u32, PolicyData)> {
    let mut out = BTreeSet::new();
    let mut add = |kind: u8, rules: &[Rule]| {
        for r in rules {
            let (addr, bits) = r.mapped();
            out.insert((
                32 + bits,
                PolicyData {
                    kind,
                    pad: 0,
                    port_be: r.port.to_be(),
                    addr,
                },
            ));
        }
    };
    add(K_EXEMPT, &cfg.exempt);
    add(K_MESH, &cfg.mesh);
    add(K_ALLOW, &cfg.egress_allow);
    out.into_iter().collect()
}

fn path_bytes(p: &Path) -> [u8; 256] {
    let mut out = [0u8; 256];
    let s = p.to_string_lossy();
    let n = s.len().min(255);
    out[..n].copy_from_slice(&s.as_bytes()[..n]);
    out
}

fn str_from(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// Writes configuration into the maps (fresh or pinned). New entries go in before stale ones are
/// removed, so a re-attach never opens a window with an empty policy.
fn write_config(
    maps: &mut dyn FnMut(&str) -> Result<Map>,
    cfg: &AttachConfig,
    cgroup_id: u64,
    sidecar: &Path,
    sidecar_id: u64,
) -> Result<()> {
    let mut flags = 0;
    if cfg.exempt_loopback {
        flags |= F_LOOPBACK_EXEMPT;
    }
    if cfg.enforce_egress {
        flags |= F_ENFORCE_EGRESS;
    }
    if cfg.enforce_ingress {
        flags |= F_ENFORCE_INGRESS;
    }
    if cfg.accelerate_local {
        flags |= F_ACCEL_LOCAL;
    }
    let raw = RawConfig {
        cgroup_id,
        sidecar_cgroup_id: sidecar_id,
        outbound_port: cfg.outbound_port,
        inbound_port: cfg.inbound_port,
        flags,
        sidecar_uid: cfg.sidecar_uid.unwrap_or(u32::MAX),
        pad: 0,
    };

    let mut policy: LpmTrie<MapData, PolicyData, u32> =
        LpmTrie::try_from(maps("policy")?).map_err(map_err("policy"))?;
    let want = policy_entries(cfg);
    for (bits, data) in &want {
        policy
            .insert(&Key::new(*bits, *data), 1, 0)
            .map_err(map_err("policy"))?;
    }
    let stale: Vec<Key<PolicyData>> = policy
        .keys()
        .filter_map(|k| k.ok())
        .filter(|k| !want.contains(&(k.prefix_len(), k.data())))
        .collect();
    for k in stale {
        policy.remove(&k).map_err(map_err("policy"))?;
    }

    let mut ports: HashMap<MapData, u16, u8> =
        HashMap::try_from(maps("app_ports")?).map_err(map_err("app_ports"))?;
    for p in &cfg.app_ports {
        ports.insert(p, 1, 0).map_err(map_err("app_ports"))?;
    }
    let stale: Vec<u16> = ports
        .keys()
        .filter_map(|k| k.ok())
        .filter(|k| !cfg.app_ports.contains(k))
        .collect();
    for k in stale {
        ports.remove(&k).map_err(map_err("app_ports"))?;
    }

    let mut meta: Array<MapData, Meta> = Array::try_from(maps("meta")?).map_err(map_err("meta"))?;
    meta.set(
        0,
        Meta {
            cgroup: path_bytes(&cfg.cgroup),
            sidecar_cgroup: path_bytes(sidecar),
        },
        0,
    )
    .map_err(map_err("meta"))?;

    // Last: the config flips the programs from "deny everything" (no config) to enforcing this.
    let mut config: Array<MapData, RawConfig> =
        Array::try_from(maps("config")?).map_err(map_err("config"))?;
    config.set(0, raw, 0).map_err(map_err("config"))?;
    Ok(())
}

fn validate(cfg: &AttachConfig) -> Result<()> {
    if cfg.outbound_port == 0 {
        return Err(Error::Config("--outbound-port must not be 0".into()));
    }
    if cfg.app_ports.contains(&cfg.outbound_port) || cfg.app_ports.contains(&cfg.inbound_port) {
        return Err(Error::Config(
            "the sidecar's ports cannot be app ports (the sidecar would lock itself out)".into(),
        ));
    }
    if cfg.sidecar_uid == Some(u32::MAX) {
        return Err(Error::Config(format!(
            "--sidecar-uid {} is reserved (it means \"no sidecar uid\")",
            u32::MAX
        )));
    }
    if cfg.app_ports.len() > 256 {
        return Err(Error::Config("at most 256 app ports".into()));
    }
    if policy_entries(cfg).len() > 4096 {
        return Err(Error::Config(
            "at most 4096 exempt/mesh/allowlist entries".into(),
        ));
    }
    Ok(())
}

/// One of our links as pinned.
struct PinnedLink {
    hook: &'static str,
    target: Target,
    /// `(link id, program id)`, None when the pin is missing.
    ids: Option<(u32, u32)>,
}

/// Ids of our programs, from the pinned links (empty for links that are missing).
fn pinned_prog_ids(pin_dir: &Path) -> Vec<PinnedLink> {
    PROGRAMS
        .iter()
        .map(|(_, pin, hook, _, target)| PinnedLink {
            hook,
            target: *target,
            ids: sys::obj_get(&pin_dir.join(pin))
                .and_then(sys::link_ids)
                .ok(),
        })
        .collect()
}

/// Refuses when a redirect hook of `cgroup` holds a program that is not ours.
fn check_foreign(cgroup: &Path, ours: &[u32]) -> Result<()> {
    let fd = open_dir(cgroup)?;
    for (_, _, hook, attach_type, target) in PROGRAMS {
        if target != Target::App || !matches!(hook, "connect4" | "connect6") {
            continue;
        }
        let ids = sys::prog_query(fd.as_fd(), attach_type).map_err(sys_err(format!(
            "query {hook} programs on {}",
            cgroup.display()
        )))?;
        if let Some(id) = ids.into_iter().find(|id| !ours.contains(id)) {
            return Err(Error::AttachedByOther {
                cgroup: cgroup.to_path_buf(),
                hook,
                prog_id: id,
                name: sys::prog_name(id),
            });
        }
    }
    Ok(())
}

/// Loads and attaches the programs to `cfg.cgroup` (and the sidecar's cgroup), pins everything
/// under [`pin_dir_for`], and writes the configuration. Idempotent: when the pins exist already
/// (a previous `attach`, from this or another process), only the configuration is rewritten.
pub fn attach(cfg: &AttachConfig) -> Result<Attached> {
    let started = Instant::now();
    env::require_privileges()?;
    validate(cfg)?;
    let cgroup = cfg.cgroup.clone();
    let app_rel = env::cgroup_relative(&cgroup)?;
    let sidecar = match &cfg.sidecar_cgroup {
        Some(s) => s.clone(),
        None => cgroup.parent().map(Path::to_path_buf).ok_or_else(|| {
            Error::Config("the cgroup has no parent: pass --sidecar-cgroup".into())
        })?,
    };
    let sidecar_rel = env::cgroup_relative(&sidecar)?;
    let same = sidecar_rel == app_rel;
    let nesting = Nesting::of(
        Path::new(&format!("/{}", app_rel.1)),
        Path::new(&format!("/{}", sidecar_rel.1)),
    );
    if cfg.sidecar_cgroup.is_some() && same && cfg.sidecar_uid.is_none() {
        return Err(Error::Config(
            "--sidecar-cgroup must differ from --cgroup (the sidecar's own connects would be \
             redirected to itself): run the sidecar in its own cgroup, or exempt it by uid \
             with --sidecar-uid (e.g. 1337)"
                .into(),
        ));
    }
    let cgroup_id = cgroup_id(&cgroup)?;
    // Same cgroup (exempt by uid only): a cgroup-id match would exempt the app too.
    let sidecar_id = if cfg.sidecar_cgroup.is_some() && !same {
        cgroup_id_of_sidecar(&sidecar)?
    } else {
        0
    };
    env::ensure_bpffs()?;
    let pin_dir = pin_dir_for(&cgroup)?;

    if pin_dir.join("config").exists() {
        let config: Array<MapData, RawConfig> = Array::try_from(pinned_map(&pin_dir, "config")?)
            .map_err(|e| {
                Error::Config(format!(
                    "the pins in {} have another layout ({e}): made by another meshgate version; \
                     fix: `meshgate redirect detach --cgroup {}`, then attach again",
                    pin_dir.display(),
                    cgroup.display()
                ))
            })?;
        let existing = config.get(&0, 0).map_err(map_err("config"))?;
        if existing.cgroup_id != cgroup_id && existing.cgroup_id != 0 {
            let meta = read_meta(&pin_dir).unwrap_or_default();
            return Err(Error::PinDirTaken {
                pin_dir,
                cgroup,
                cgroup_id,
                other: meta.0,
                other_id: existing.cgroup_id,
            });
        }
        if !pin_dir.join("local_socks").exists() {
            // Pins of a meshgate without local acceleration. Not replaced here: detaching
            // them would let the workload's connects go direct for a moment.
            return Err(Error::Config(format!(
                "the pins in {} were made by an older meshgate (no local acceleration maps); \
                 fix: `meshgate redirect detach --cgroup {}`, then attach again",
                pin_dir.display(),
                cgroup.display()
            )));
        }
        let links = pinned_prog_ids(&pin_dir);
        if links
            .iter()
            .all(|l| l.ids.is_some() || !needed(l.target, nesting))
        {
            let ours: Vec<u32> = links.iter().filter_map(|l| l.ids.map(|i| i.1)).collect();
            check_foreign(&cgroup, &ours)?;
            write_config(
                &mut |name| pinned_map(&pin_dir, name),
                cfg,
                cgroup_id,
                &sidecar,
                sidecar_id,
            )?;
            drop(config);
            return Ok(Attached {
                pin_dir,
                reused: true,
                elapsed: started.elapsed(),
                local_accel_unavailable: None,
            });
        }
        // A partial attach (interrupted): clear it and start over.
        remove_pins(&pin_dir)?;
    }
    check_foreign(&cgroup, &[])?;

    let mut ebpf = aya::EbpfLoader::new().load(OBJ).map_err(|e| Error::Load {
        detail: format!("{e:#}"),
        btf: env::btf_state(),
    })?;
    std::fs::create_dir_all(&pin_dir).map_err(sys_err(format!("mkdir {}", pin_dir.display())))?;
    let result = (|| {
        for name in MAPS {
            let map = ebpf
                .map(name)
                .ok_or_else(|| Error::Config(format!("map {name} missing from the object")))?;
            map.pin(pin_dir.join(name)).map_err(|e| Error::Sys {
                what: format!("pin map {name} in {}", pin_dir.display()),
                source: io::Error::other(e.to_string()),
            })?;
        }
        write_config(
            &mut |name| pinned_map(&pin_dir, name),
            cfg,
            cgroup_id,
            &sidecar,
            sidecar_id,
        )
    })();
    if let Err(e) = result {
        let _ = remove_pins(&pin_dir);
        return Err(e);
    }

    let app_fd = open_dir(&cgroup)?;
    let sidecar_fd = open_dir(&sidecar)?;
    let result = (|| {
        // Local acceleration's programs need Linux >= 5.15 (the network namespace cookie in
        // sockops and sk_msg). Without them, the sockops program without acceleration: the rest
        // works as on any kernel >= 5.7.
        let (sockops, local_msg, unavailable) = match load_program(&mut ebpf, SOCKOPS_ACCEL)
            .and_then(|sockops| Ok((sockops, load_program(&mut ebpf, LOCAL_MSG)?)))
        {
            Ok((sockops, msg)) => (sockops, Some(msg), None),
            Err(e) => (
                load_program(&mut ebpf, "mg_sockops")?,
                None,
                Some(format!(
                    "local acceleration not loaded (needs Linux >= 5.15): {}",
                    e.to_string().lines().next().unwrap_or_default()
                )),
            ),
        };
        for (prog, pin, hook, attach_type, target) in PROGRAMS {
            if !needed(target, nesting) {
                continue;
            }
            // sockops is attached at up to two places: loaded once.
            let fd = if prog == "mg_sockops" {
                sockops.try_clone().map_err(sys_err("dup program fd"))?
            } else {
                load_program(&mut ebpf, prog)?
            };
            let (target_fd, target_dir) = match target {
                Target::App | Target::SockopsApp => (app_fd.as_fd(), &cgroup),
                Target::Sidecar | Target::SockopsSidecar => (sidecar_fd.as_fd(), &sidecar),
            };
            let link = sys::link_create(&fd, target_fd, attach_type).map_err(|e| {
                let hint = if e.raw_os_error() == Some(libc::EINVAL) && hook == "sock_ops" {
                    " (kernel too old for bpf links, needs >= 5.7)"
                } else {
                    ""
                };
                Error::Sys {
                    what: format!("attach {hook} to {}{hint}", target_dir.display()),
                    source: e,
                }
            })?;
            sys::obj_pin(&link, &pin_dir.join(pin))
                .map_err(sys_err(format!("pin {pin} in {}", pin_dir.display())))?;
        }
        // Local acceleration: the sk_msg program on the pinned sockhash (the map keeps it).
        match local_msg {
            Some(msg) => {
                let socks = sys::obj_get(&pin_dir.join("local_socks"))
                    .map_err(sys_err(format!("open {}/local_socks", pin_dir.display())))?;
                sys::prog_attach(&msg, &socks, sys::ATTACH_SK_MSG_VERDICT).map_err(|e| {
                    Error::Sys {
                        what: "attach the local acceleration program (sk_msg) to its sockhash"
                            .into(),
                        source: e,
                    }
                })?;
            }
            None => {
                // The configuration says what runs: acceleration off.
                let mut off = cfg.clone();
                off.accelerate_local = false;
                write_config(
                    &mut |name| pinned_map(&pin_dir, name),
                    &off,
                    cgroup_id,
                    &sidecar,
                    sidecar_id,
                )?;
            }
        }
        Ok(unavailable)
    })();
    let local_accel_unavailable = match result {
        Ok(unavailable) => unavailable,
        Err(e) => {
            let _ = remove_pins(&pin_dir);
            return Err(e);
        }
    };
    Ok(Attached {
        pin_dir,
        reused: false,
        elapsed: started.elapsed(),
        local_accel_unavailable,
    })
}

/// Whether a program's link is attached, given how the two cgroups nest: sockops once per
/// socket (see [`Target::SockopsApp`]).
fn needed(target: Target, nesting: Nesting) -> bool {
    match target {
        Target::App | Target::Sidecar => true,
        Target::SockopsApp => nesting != Nesting::SidecarAbove,
        Target::SockopsSidecar => matches!(nesting, Nesting::SidecarAbove | Nesting::Apart),
    }
}

fn cgroup_id_of_sidecar(dir: &Path) -> Result<u64> {
    cgroup_id(dir)
}

/// Loads one program of the object (by its C function name); the fd to attach it with.
fn load_program(ebpf: &mut aya::Ebpf, prog: &str) -> Result<std::os::fd::OwnedFd> {
    let p = ebpf
        .program_mut(prog)
        .ok_or_else(|| Error::Config(format!("program {prog} missing from the object")))?;
    match p {
        aya::programs::Program::CgroupSockAddr(p) => {
            load_fd(p, CgroupSockAddr::load, CgroupSockAddr::fd)
        }
        aya::programs::Program::SockOps(p) => load_fd(p, SockOps::load, SockOps::fd),
        aya::programs::Program::CgroupSkb(p) => load_fd(p, CgroupSkb::load, CgroupSkb::fd),
        aya::programs::Program::CgroupSockopt(p) => {
            load_fd(p, CgroupSockopt::load, CgroupSockopt::fd)
        }
        aya::programs::Program::SkMsg(p) => load_fd(p, SkMsg::load, SkMsg::fd),
        _ => Err(Error::Config(format!("unexpected program type for {prog}"))),
    }
}

fn load_fd<P>(
    p: &mut P,
    load: fn(&mut P) -> Result<(), aya::programs::ProgramError>,
    fd: fn(&P) -> Result<&aya::programs::ProgramFd, aya::programs::ProgramError>,
) -> Result<std::os::fd::OwnedFd> {
    load(p).map_err(|e| Error::Load {
        detail: program_error(e),
        btf: env::btf_state(),
    })?;
    let fd = fd(p).map_err(|e| Error::Load {
        detail: program_error(e),
        btf: env::btf_state(),
    })?;
    fd.as_fd()
        .try_clone_to_owned()
        .map_err(sys_err("dup program fd"))
}

fn program_error(e: aya::programs::ProgramError) -> String {
    // For LoadError the Display form carries the whole verifier log.
    e.to_string()
}

fn remove_pins(pin_dir: &Path) -> Result<()> {
    // Links first, detached synchronously (an unpinned link is released asynchronously, so
    // without this a detach could return while traffic is still being redirected).
    for (_, pin, _, _, _) in PROGRAMS {
        let p = pin_dir.join(pin);
        if p.exists() {
            if let Ok(link) = sys::obj_get(&p) {
                let _ = sys::link_detach(&link);
            }
            std::fs::remove_file(&p).map_err(sys_err(format!("unpin {}", p.display())))?;
        }
    }
    for name in MAPS {
        let p = pin_dir.join(name);
        if p.exists() {
            std::fs::remove_file(&p).map_err(sys_err(format!("unpin {}", p.display())))?;
        }
    }
    if pin_dir.exists() {
        std::fs::remove_dir(pin_dir).map_err(sys_err(format!("rmdir {}", pin_dir.display())))?;
    }
    Ok(())
}

/// Detaches everything attached for `cgroup` (removes the pins, which detaches the links and
/// frees the maps). Works when the cgroup directory itself is already gone.
pub fn detach(cgroup: &Path) -> Result<PathBuf> {
    env::require_privileges()?;
    env::ensure_bpffs()?;
    let pin_dir = match pin_dir_for(cgroup) {
        Ok(d) => d,
        // The cgroup was removed: fall back to the name it had.
        Err(_) => find_by_meta(cgroup)?.ok_or_else(|| Error::NotAttached {
            cgroup: cgroup.to_path_buf(),
            pin_dir: PathBuf::from(PIN_ROOT),
        })?,
    };
    if !pin_dir.exists() {
        return Err(Error::NotAttached {
            cgroup: cgroup.to_path_buf(),
            pin_dir,
        });
    }
    remove_pins(&pin_dir)?;
    Ok(pin_dir)
}

fn find_by_meta(cgroup: &Path) -> Result<Option<PathBuf>> {
    let Ok(entries) = std::fs::read_dir(PIN_ROOT) else {
        return Ok(None);
    };
    for e in entries.flatten() {
        if let Ok((path, _)) = read_meta(&e.path())
            && Path::new(&path) == cgroup
        {
            return Ok(Some(e.path()));
        }
    }
    Ok(None)
}

fn read_meta(pin_dir: &Path) -> Result<(String, String)> {
    let meta: Array<MapData, Meta> =
        Array::try_from(pinned_map(pin_dir, "meta")?).map_err(map_err("meta"))?;
    let m = meta.get(&0, 0).map_err(map_err("meta"))?;
    Ok((str_from(&m.cgroup), str_from(&m.sidecar_cgroup)))
}

/// The verdict a per-port counter counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Verdict {
    Redirected,
    Allowed,
    Exempt,
    DeniedEgress,
    DeniedIngress,
    DeniedIpv6,
    DeniedUdpMesh,
}

impl Verdict {
    fn from_raw(v: u8) -> Option<Self> {
        Some(match v {
            0 => Verdict::Redirected,
            1 => Verdict::Allowed,
            2 => Verdict::Exempt,
            3 => Verdict::DeniedEgress,
            4 => Verdict::DeniedIngress,
            5 => Verdict::DeniedIpv6,
            6 => Verdict::DeniedUdpMesh,
            _ => return None,
        })
    }

    /// `redirected`, `allowed`, `exempt`, `denied_egress`, `denied_ingress`, `denied_ipv6`,
    /// `denied_udp_mesh` (stable: use them as metric label values).
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Redirected => "redirected",
            Verdict::Allowed => "allowed",
            Verdict::Exempt => "exempt",
            Verdict::DeniedEgress => "denied_egress",
            Verdict::DeniedIngress => "denied_ingress",
            Verdict::DeniedIpv6 => "denied_ipv6",
            Verdict::DeniedUdpMesh => "denied_udp_mesh",
        }
    }
}

/// One per-destination-port counter (for ingress drops: the app port).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortCount {
    pub port: u16,
    pub verdict: Verdict,
    pub count: u64,
}

/// A point-in-time copy of the counters of one attachment. Counters only grow (until detach).
///
/// Connect-time verdicts count connections (or UDP sends); `denied_ingress` counts dropped
/// packets (a client's SYN retransmissions each count).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CounterSnapshot {
    /// Connects rewritten to the sidecar's outbound listener.
    pub redirected: u64,
    /// Non-mesh destinations on the egress allowlist (direct), or all when egress is not enforced.
    pub allowed: u64,
    /// Exempt destinations (loopback, `--exempt`), direct.
    pub exempt: u64,
    /// Connects by the sidecar's own sockets (only seen when the sidecar is inside the cgroup).
    pub sidecar: u64,
    /// Refused with EPERM: not a mesh destination and not on the allowlist.
    pub denied_egress: u64,
    /// Dropped: packets to an app port that did not come from the local sidecar.
    pub denied_ingress: u64,
    /// Refused with EPERM: native IPv6 to a mesh destination (not redirected: never a bypass).
    pub denied_ipv6: u64,
    /// Refused with EPERM: UDP to a mesh destination (the sidecar carries TCP only).
    pub denied_udp_mesh: u64,
    /// `SO_ORIGINAL_DST` answered for the sidecar.
    pub origdst_hit: u64,
    /// `SO_ORIGINAL_DST` asked for a connection that was not redirected.
    pub origdst_miss: u64,
    /// Local acceleration: sockets of local hops put into the sockhash (two per connection).
    pub accel_sockets: u64,
    /// Local acceleration: sockets of local hops that could not be put there (the sockhash was full, or the socket is in another attachment's).
    pub accel_refused: u64,
    /// Local acceleration: messages passed from socket to socket.
    pub accel_messages: u64,
    /// Local acceleration: connections that stay on TCP because a message found no peer socket
    /// (the peer is outside this pod's cgroups, or was not established yet).
    pub accel_fallback: u64,
    /// Per destination port and verdict, sorted.
    pub per_port: Vec<PortCount>,
}

impl CounterSnapshot {
    /// `(verdict, count)` pairs of the totals, in a stable order; denials are the `denied_*`
    /// entries (label `reason` = the part after `denied_`).
    pub fn totals(&self) -> [(&'static str, u64); 10] {
        [
            ("redirected", self.redirected),
            ("allowed", self.allowed),
            ("exempt", self.exempt),
            ("sidecar", self.sidecar),
            ("denied_egress", self.denied_egress),
            ("denied_ingress", self.denied_ingress),
            ("denied_ipv6", self.denied_ipv6),
            ("denied_udp_mesh", self.denied_udp_mesh),
            ("origdst_hit", self.origdst_hit),
            ("origdst_miss", self.origdst_miss),
        ]
    }

    /// `(event, count)` pairs of the local acceleration counters, in a stable order.
    pub fn acceleration(&self) -> [(&'static str, u64); 4] {
        [
            ("sockets", self.accel_sockets),
            ("refused", self.accel_refused),
            ("messages", self.accel_messages),
            ("fallback", self.accel_fallback),
        ]
    }
}

/// Reading the counters of an attachment.
pub struct Counters;

impl Counters {
    /// Reads the pinned counter maps in `pin_dir` (e.g. `/sys/fs/bpf/meshgate/<name>`, see
    /// [`pin_dir_for`]). Needs read access to the pins (root or CAP_BPF); does not load anything.
    pub fn read_pinned(pin_dir: &Path) -> Result<CounterSnapshot> {
        let counters: Array<MapData, u64> =
            Array::try_from(pinned_map(pin_dir, "counters")?).map_err(map_err("counters"))?;
        let mut c = [0u64; 16];
        for (i, v) in c.iter_mut().enumerate() {
            *v = counters.get(&(i as u32), 0).map_err(map_err("counters"))?;
        }
        let ports: HashMap<MapData, PortKey, u64> =
            HashMap::try_from(pinned_map(pin_dir, "port_counters")?)
                .map_err(map_err("port_counters"))?;
        let mut per_port: Vec<PortCount> = ports
            .iter()
            .filter_map(|r| r.ok())
            .filter_map(|(k, count)| {
                Some(PortCount {
                    port: k.port,
                    verdict: Verdict::from_raw(k.verdict)?,
                    count,
                })
            })
            .collect();
        per_port.sort_by_key(|p| (p.port, p.verdict));
        Ok(CounterSnapshot {
            redirected: c[0],
            allowed: c[1],
            exempt: c[2],
            sidecar: c[3],
            denied_egress: c[4],
            denied_ingress: c[5],
            denied_ipv6: c[6],
            denied_udp_mesh: c[7],
            origdst_hit: c[8],
            origdst_miss: c[9],
            accel_sockets: c[10],
            accel_refused: c[11],
            accel_messages: c[12],
            accel_fallback: c[13],
            per_port,
        })
    }
}

/// One program link of an attachment.
#[derive(Debug, Clone)]
pub struct LinkStatus {
    pub hook: &'static str,
    /// `(link id, program id)`, or None if the pin is missing.
    pub ids: Option<(u32, u32)>,
    /// False for the sockops link that is not attached because the other covers both cgroups
    /// (one contains the other): missing is then expected.
    pub needed: bool,
}

/// What is attached for one cgroup.
#[derive(Debug, Clone)]
pub struct Attachment {
    pub pin_dir: PathBuf,
    pub cgroup: String,
    pub sidecar_cgroup: String,
    pub outbound_port: u16,
    pub inbound_port: u16,
    pub app_ports: Vec<u16>,
    /// Tasks with this uid are exempt (the sidecar), if set.
    pub sidecar_uid: Option<u32>,
    pub exempt_loopback: bool,
    pub enforce_egress: bool,
    pub enforce_ingress: bool,
    /// Local acceleration of new local hops (see [`AttachConfig::accelerate_local`]).
    pub accelerate_local: bool,
    /// `(kind, rule)` with kind `exempt`, `mesh` or `allow`.
    pub rules: Vec<(&'static str, Rule)>,
    pub links: Vec<LinkStatus>,
    pub counters: CounterSnapshot,
}

fn read_attachment(pin_dir: &Path) -> Result<Attachment> {
    let config: Array<MapData, RawConfig> =
        Array::try_from(pinned_map(pin_dir, "config")?).map_err(map_err("config"))?;
    let raw = config.get(&0, 0).map_err(map_err("config"))?;
    let (cgroup, sidecar_cgroup) = read_meta(pin_dir)?;
    let nesting = Nesting::of(Path::new(&cgroup), Path::new(&sidecar_cgroup));
    let ports: HashMap<MapData, u16, u8> =
        HashMap::try_from(pinned_map(pin_dir, "app_ports")?).map_err(map_err("app_ports"))?;
    let mut app_ports: Vec<u16> = ports.keys().filter_map(|k| k.ok()).collect();
    app_ports.sort();
    let policy: LpmTrie<MapData, PolicyData, u32> =
        LpmTrie::try_from(pinned_map(pin_dir, "policy")?).map_err(map_err("policy"))?;
    let mut rules: Vec<(&'static str, Rule)> = policy
        .keys()
        .filter_map(|k| k.ok())
        .filter_map(|k| {
            let d = k.data();
            let bits = k.prefix_len().checked_sub(32)?;
            let v6 = std::net::Ipv6Addr::from(d.addr);
            let net = match v6.to_ipv4_mapped() {
                Some(v4) if bits >= 96 => ipnet::IpNet::new(v4.into(), (bits - 96) as u8).ok()?,
                _ => ipnet::IpNet::new(v6.into(), bits as u8).ok()?,
            };
            let kind = match d.kind {
                K_EXEMPT => "exempt",
                K_MESH => "mesh",
                K_ALLOW => "allow",
                _ => return None,
            };
            Some((kind, Rule::new(net, u16::from_be(d.port_be))))
        })
        .collect();
    rules.sort();
    Ok(Attachment {
        pin_dir: pin_dir.to_path_buf(),
        cgroup,
        sidecar_cgroup,
        outbound_port: raw.outbound_port,
        inbound_port: raw.inbound_port,
        app_ports,
        sidecar_uid: (raw.sidecar_uid != u32::MAX).then_some(raw.sidecar_uid),
        exempt_loopback: raw.flags & F_LOOPBACK_EXEMPT != 0,
        enforce_egress: raw.flags & F_ENFORCE_EGRESS != 0,
        enforce_ingress: raw.flags & F_ENFORCE_INGRESS != 0,
        accelerate_local: raw.flags & F_ACCEL_LOCAL != 0,
        rules,
        links: pinned_prog_ids(pin_dir)
            .into_iter()
            .map(|l| LinkStatus {
                hook: l.hook,
                ids: l.ids,
                needed: needed(l.target, nesting),
            })
            .collect(),
        counters: Counters::read_pinned(pin_dir)?,
    })
}

/// What is attached: for one cgroup, or every meshgate attachment on this machine (those whose
/// pins cannot be read are left out; see [`status_report`]).
pub fn status(cgroup: Option<&Path>) -> Result<Vec<Attachment>> {
    Ok(status_report(cgroup)?.attachments)
}

/// [`status`] plus the pin directories that could not be read.
#[derive(Debug)]
pub struct StatusReport {
    pub attachments: Vec<Attachment>,
    /// Pin directories under [`PIN_ROOT`] that could not be read (e.g. made by another meshgate
    /// version with a different map layout), with the reason. Only without a cgroup.
    pub unreadable: Vec<(PathBuf, Error)>,
}

/// [`status`], also listing the pin directories it could not read instead of failing on them.
pub fn status_report(cgroup: Option<&Path>) -> Result<StatusReport> {
    env::require_privileges()?;
    match cgroup {
        Some(cg) => {
            let pin_dir = match pin_dir_for(cg) {
                Ok(d) => d,
                Err(_) => find_by_meta(cg)?.unwrap_or_else(|| PathBuf::from(PIN_ROOT).join("?")),
            };
            if !pin_dir.join("config").exists() {
                return Err(Error::NotAttached {
                    cgroup: cg.to_path_buf(),
                    pin_dir,
                });
            }
            Ok(StatusReport {
                attachments: vec![read_attachment(&pin_dir)?],
                unreadable: Vec::new(),
            })
        }
        None => {
            let mut out = StatusReport {
                attachments: Vec::new(),
                unreadable: Vec::new(),
            };
            let Ok(entries) = std::fs::read_dir(PIN_ROOT) else {
                return Ok(out);
            };
            let mut dirs: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
            dirs.sort();
            for d in dirs {
                match read_attachment(&d) {
                    Ok(a) => out.attachments.push(a),
                    Err(e) => out.unreadable.push((d, e)),
                }
            }
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// sock_ops must run exactly once for every socket of the app and of the sidecar: whichever
    /// cgroup contains the other takes it alone; apart, both.
    #[test]
    fn sockops_runs_once_per_socket_however_the_cgroups_nest() {
        let cases = [
            ("/pod/app", "/pod", Nesting::SidecarAbove, false, true),
            ("/pod", "/pod", Nesting::Same, true, false),
            ("/pod/app", "/pod/sidecar", Nesting::Apart, true, true),
            ("/pod", "/pod/sidecar", Nesting::AppAbove, true, false),
            // A common prefix of the name is not nesting.
            ("/pod-app", "/pod", Nesting::Apart, true, true),
        ];
        for (app, sidecar, nesting, on_app, on_sidecar) in cases {
            let n = Nesting::of(Path::new(app), Path::new(sidecar));
            assert_eq!(n, nesting, "{app} {sidecar}");
            assert_eq!(needed(Target::SockopsApp, n), on_app, "{app} {sidecar}");
            assert_eq!(
                needed(Target::SockopsSidecar, n),
                on_sidecar,
                "{app} {sidecar}"
            );
            assert!(needed(Target::App, n) && needed(Target::Sidecar, n));
        }
        // Every socket is covered once: with an ancestor, its link covers the other cgroup.
        let sockops: Vec<Target> = PROGRAMS
            .iter()
            .filter(|p| p.3 == sys::ATTACH_SOCK_OPS)
            .map(|p| p.4)
            .collect();
        assert_eq!(sockops, [Target::SockopsApp, Target::SockopsSidecar]);
    }

    #[test]
    fn layouts_match_the_c_structs() {
        assert_eq!(std::mem::size_of::<RawConfig>(), 32);
        assert_eq!(std::mem::size_of::<PolicyData>(), 20);
        assert_eq!(std::mem::size_of::<Key<PolicyData>>(), 24);
        assert_eq!(std::mem::size_of::<PortKey>(), 4);
        assert_eq!(std::mem::size_of::<Meta>(), 512);
    }

    #[test]
    fn object_is_embedded() {
        assert!(OBJ.len() > 1000);
        assert_eq!(&OBJ[..4], b"\x7fELF");
    }

    #[test]
    fn policy_entries_are_prefixed_by_kind_and_port() {
        let mut cfg = AttachConfig::new("/x", 15001, 15006);
        cfg.mesh.push("10.199.0.0/24".parse().unwrap());
        cfg.egress_allow.push("192.0.2.0/24:443".parse().unwrap());
        let e = policy_entries(&cfg);
        assert_eq!(e.len(), 2);
        let (bits, d) = e[0];
        assert_eq!(
            (bits, d.kind, u16::from_be(d.port_be)),
            (32 + 96 + 24, K_MESH, 0)
        );
        let (bits, d) = e[1];
        assert_eq!(
            (bits, d.kind, u16::from_be(d.port_be)),
            (32 + 96 + 24, K_ALLOW, 443)
        );
    }
}

#[cfg(test)]
mod prebuilt_tests {
    /// The committed object (used when clang is absent) stands in only for the source it was
    /// built from, and a build with the same clang reproduces it byte for byte.
    #[test]
    fn the_prebuilt_object_is_this_source_built() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/prebuilt");
        let refresh = "refresh it with `MESHGATE_BPF_REFRESH_PREBUILT=1 cargo build -p meshgate-ebpf` and commit prebuilt/";
        let recorded = std::fs::read_to_string(format!("{dir}/SOURCE_HASH")).unwrap();
        assert_eq!(
            recorded.trim(),
            env!("MESHGATE_BPF_SOURCE_HASH"),
            "src/bpf/redirect.bpf.c changed since prebuilt/redirect.bpf.o was made: {refresh}"
        );
        let built_with = env!("MESHGATE_BPF_BUILT_WITH");
        let prebuilt_with = std::fs::read_to_string(format!("{dir}/CLANG_VERSION")).unwrap();
        if built_with == prebuilt_with.trim() {
            let committed = std::fs::read(format!("{dir}/redirect.bpf.o")).unwrap();
            assert!(
                super::OBJ == committed.as_slice(),
                "{built_with} builds other bytes than prebuilt/redirect.bpf.o: {refresh}"
            );
        } else {
            eprintln!(
                "*** NOTE: built with {built_with:?}, prebuilt with {:?}: the source hash matches, the bytes were not compared",
                prebuilt_with.trim()
            );
        }
    }
}
