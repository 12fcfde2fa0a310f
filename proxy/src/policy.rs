//! The sidecar's policy source: a directory of policy-as-code files (and an optional static
//! services file), validated and compiled into the `PolicySnapshot` the authorization layer reads.
//!
//! Files are polled (and re-read at once on SIGHUP) rather than watched with inotify, for the same
//! reasons as the identity files: bind mounts and ConfigMap symlink swaps defeat inotify. A change
//! that fails validation is refused with `file:line: reason` in the log and the previous snapshot
//! stays in force; before the first valid load the sidecar denies everything and is not ready.
//! The control-plane issue adds a streamed source behind the same `PolicyState`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::{ArcSwap, ArcSwapOption};
use meshgate_ca::SpiffeId;
use meshgate_policy::{LoadErrors, PolicySet, PolicySnapshot, load_dir, parse_file};

use crate::metrics::Metrics;

/// The policy in force and how it got there.
pub struct PolicyState {
    /// What the authorization layer reads per request.
    pub snapshot: Arc<ArcSwap<PolicySnapshot>>,
    /// The last valid set (services, dump).
    pub set: ArcSwapOption<PolicySet>,
    /// Bumped at every swap, so long-lived L4 connections can re-check their authorization.
    swaps: tokio::sync::watch::Sender<u64>,
    disconnected_since: Mutex<Option<std::time::Instant>>,
    /// The control-plane stream as the admin `/config` shows it (`None` for file sources).
    stream: Mutex<Option<StreamStatus>>,
    loaded: AtomicBool,
    last_error: Mutex<Option<String>>,
}

impl PolicyState {
    /// Deny-all until the first valid policy arrives.
    pub fn new(workload: &SpiffeId) -> Self {
        Self {
            snapshot: Arc::new(ArcSwap::from_pointee(PolicySnapshot::deny_all(workload))),
            set: ArcSwapOption::empty(),
            swaps: tokio::sync::watch::channel(0).0,
            disconnected_since: Mutex::new(None),
            stream: Mutex::new(None),
            loaded: AtomicBool::new(false),
            last_error: Mutex::new(None),
        }
    }

    /// Notifies at every policy swap.
    pub fn swaps(&self) -> tokio::sync::watch::Receiver<u64> {
        self.swaps.subscribe()
    }

    /// True once a valid policy has been loaded.
    pub fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }

    /// The control-plane stream's state (`None` when policy comes from files).
    pub fn stream_status(&self) -> Option<StreamStatus> {
        self.stream.lock().expect("stream status lock").clone()
    }

    /// The last refused update's reasons, if the latest attempt failed.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().expect("policy error lock").clone()
    }
}

/// The control-plane stream of a sidecar, for the admin `/config` page: which replica it is
/// connected to, and how its failovers went.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct StreamStatus {
    /// The `--control-plane` URLs, as given.
    pub urls: Vec<String>,
    /// The replica the stream is open with (`address (url)`), `None` while disconnected.
    pub connected_to: Option<String>,
    /// Streams re-established after a loss.
    pub reconnects: u64,
    /// Time from the last loss to the first snapshot answered after it, in milliseconds.
    pub last_reconnect_ms: Option<u64>,
}

/// Where policy files live.
#[derive(Debug, Clone)]
pub struct PolicyFiles {
    pub dir: PathBuf,
    /// A static list of `Service` documents, until the control plane serves them.
    pub services: Option<PathBuf>,
}

/// What identifies one version of a file without reading it: path, where its symlinks lead,
/// mtime, size and inode (an atomic rename-over changes the inode even within one coarse mtime
/// tick; a ConfigMap update re-points `..data`, which changes where every key's link leads).
type Stamp = (PathBuf, Option<PathBuf>, Option<SystemTime>, u64, u64);

fn stamp_of(path: PathBuf, meta: Option<&std::fs::Metadata>) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    let modified = meta.and_then(|m| m.modified().ok());
    let target = std::fs::canonicalize(&path).ok().filter(|t| *t != path);
    (
        path,
        target,
        modified,
        meta.map_or(0, |m| m.len()),
        meta.map_or(0, |m| m.ino()),
    )
}

/// Stamps the files `load_dir` reads, walked the way it walks them: entries starting with `.`
/// skipped (`.git`, editor files, a ConfigMap mount's `..data` and timestamped directories),
/// symlinked directories not followed (no loops), symlinked files followed.
fn yaml_stamps(dir: &Path, out: &mut Vec<Stamp>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let path = entry.path();
        let Ok(file_type) = entry.file_type() else {
            continue;
        };
        if file_type.is_dir() {
            yaml_stamps(&path, out);
            continue;
        }
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if meta.is_file() && path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            out.push(stamp_of(path, Some(&meta)));
        }
    }
}

impl PolicyFiles {
    fn stamp(&self) -> Vec<Stamp> {
        let mut out = Vec::new();
        yaml_stamps(&self.dir, &mut out);
        if let Some(s) = &self.services {
            out.push(stamp_of(s.clone(), std::fs::metadata(s).ok().as_ref()));
        }
        out.sort();
        out
    }

    fn load(&self) -> Result<PolicySet, LoadErrors> {
        let mut set = load_dir(&self.dir)?;
        if let Some(services) = &self.services {
            parse_file(services, &mut set)?;
        }
        Ok(set)
    }

    /// Loads once (before returning), then calls `on_load` again whenever the files change or
    /// SIGHUP arrives.
    pub fn watch(
        self,
        interval: Duration,
        on_load: impl Fn(Result<PolicySet, LoadErrors>) + Send + Sync + 'static,
    ) {
        // Stamp before loading: a change landing between the two is then seen by the first poll.
        let mut seen = self.stamp();
        on_load(self.load());
        tokio::spawn(async move {
            let mut hangup =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
            loop {
                let forced = tokio::select! {
                    _ = tokio::time::sleep(interval) => false,
                    Some(_) = async { match hangup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => true,
                };
                let now = self.stamp();
                if forced || now != seen {
                    seen = now;
                    on_load(self.load());
                }
            }
        });
    }
}

/// Where the sidecar's policy comes from; both feed the same [`PolicyState`].
#[derive(Debug, Clone)]
pub enum PolicySource {
    /// A directory (plus optional services file) on disk.
    Files(PolicyFiles),
    /// The control plane's stream: one or more replicas (`https://host:15010`, each entry
    /// possibly a comma-separated list; a name resolving to several addresses is several
    /// replicas).
    ControlPlane { urls: Vec<String> },
}

impl PolicyState {
    /// Compiles and swaps in `set` (unless it is the version in force), then runs `on_update`.
    /// The one place a policy takes effect, whatever its source.
    pub fn install(
        &self,
        set: PolicySet,
        workload: &SpiffeId,
        metrics: &Metrics,
        on_update: &(impl Fn(&PolicySet) + ?Sized),
    ) {
        let current = self.snapshot.load();
        let unchanged = self.is_loaded() && current.version() == set.version;
        *self.last_error.lock().expect("policy error lock") = None;
        if !unchanged {
            let snapshot = PolicySnapshot::compile(&set, workload);
            tracing::info!(event = "policy.swapped", version = %set.version, previous = %current.version(), "policy snapshot in force");
            self.snapshot.store(Arc::new(snapshot));
            metrics.policy_swaps.inc();
            self.swaps.send_modify(|n| *n += 1);
            metrics.set_policy_version(&set.version);
        }
        on_update(&set);
        self.set.store(Some(Arc::new(set)));
        self.loaded.store(true, Ordering::Release);
    }

    /// Records a refused update; the policy in force stays.
    pub fn refuse(&self, errors: &LoadErrors, metrics: &Metrics) {
        metrics.policy_rejected.inc();
        for e in &errors.0 {
            tracing::error!(event = "policy.rejected", file = %e.file.display(), line = e.line, reason = %e.reason, "policy update refused; the previous policy stays in force");
        }
        *self.last_error.lock().expect("policy error lock") = Some(errors.to_string());
    }

    /// Whether the control-plane stream is up (`None` for file sources) and since when it is
    /// down, for `policy_stale_seconds`.
    pub fn set_connected(&self, connected: bool) {
        let mut since = self.disconnected_since.lock().expect("lock");
        *since = if connected {
            None
        } else {
            since.or(Some(std::time::Instant::now()))
        };
    }

    /// Records what happened to the control-plane stream: connection state, the replica in use,
    /// reconnect count and duration (metrics and `/config`).
    fn stream_event(&self, event: &meshgate_xds::client::StreamEvent, metrics: &Metrics) {
        use meshgate_xds::client::StreamEvent;
        let mut guard = self.stream.lock().expect("stream status lock");
        let status = guard.get_or_insert_with(StreamStatus::default);
        match event {
            StreamEvent::Connected { endpoint } => {
                status.connected_to = Some(endpoint.to_string());
                drop(guard);
                self.set_connected(true);
                metrics.control_plane_connected.set(1);
            }
            StreamEvent::Disconnected => {
                status.connected_to = None;
                drop(guard);
                self.set_connected(false);
                metrics.control_plane_connected.set(0);
            }
            StreamEvent::Reconnected { after, .. } => {
                status.reconnects += 1;
                status.last_reconnect_ms = Some(after.as_millis() as u64);
                metrics.control_plane_reconnects.inc();
                metrics
                    .control_plane_last_reconnect_seconds
                    .set(after.as_secs_f64());
            }
        }
    }

    /// Seconds since the control plane was last reachable (0 while connected or for files).
    pub fn stale_seconds(&self) -> f64 {
        self.disconnected_since
            .lock()
            .expect("lock")
            .map_or(0.0, |t| t.elapsed().as_secs_f64())
    }
}

impl PolicySource {
    /// Starts feeding `state`; `on_update` runs after each accepted update. `flow_reports`, with
    /// a control plane, sends the sidecar's flows on its stream, and `tap` offers it the live
    /// tap (both ignored with files).
    // One call wires the whole source; a parameter struct would only be unpacked here.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        self,
        flow_reports: Option<meshgate_xds::client::FlowReporter>,
        tap: Option<meshgate_xds::client::TapSource>,
        identity: &crate::identity::Identity,
        state: Arc<PolicyState>,
        metrics: Arc<Metrics>,
        interval: Duration,
        mut stop: tokio::sync::watch::Receiver<bool>,
        on_update: impl Fn(&PolicySet) + Send + Sync + 'static,
    ) -> Result<(), String> {
        let workload = identity.id().clone();
        match self {
            PolicySource::Files(files) => {
                files.watch(interval, move |loaded| match loaded {
                    Ok(set) => state.install(set, &workload, &metrics, &on_update),
                    Err(errors) => state.refuse(&errors, &metrics),
                });
            }
            PolicySource::ControlPlane { urls } => {
                let expected = workload
                    .trust_domain()
                    .workload_id("meshgate", "control-plane")
                    .expect("a fixed path under a valid trust domain");
                let tls = meshgate_ca::tls::mesh_client_config(
                    identity.bundle(),
                    meshgate_ca::tls::ExpectedServer::Exact(expected),
                    Some(identity.resolver()),
                    &[b"h2"],
                );
                let client = meshgate_xds::client::StreamClient::new(&urls, Arc::new(tls))
                    .map_err(|e| e.to_string())?
                    .reconnect_on(identity.svid_changes());
                let client = match flow_reports {
                    Some(reporter) => client.report_flows(reporter),
                    None => client,
                };
                let client = match tap {
                    Some(tap) => client.tap(tap),
                    None => client,
                };
                state.set_connected(false);
                *state.stream.lock().expect("stream status lock") = Some(StreamStatus {
                    urls: client.urls(),
                    ..StreamStatus::default()
                });
                let event_state = state.clone();
                let event_metrics = metrics.clone();
                let stream = client.run(
                    move |set| {
                        state.install(set, &workload, &metrics, &on_update);
                        Ok(())
                    },
                    move |event| event_state.stream_event(&event, &event_metrics),
                    Duration::from_millis(500),
                    Duration::from_secs(30),
                );
                // The stream ends with the sidecar: a sidecar that is stopping does not warn that
                // the control plane went away.
                tokio::spawn(async move {
                    tokio::select! {
                        () = stream => {}
                        _ = stop.wait_for(|stopping| *stopping) => {}
                    }
                });
            }
        }
        Ok(())
    }
}
