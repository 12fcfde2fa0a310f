//! Test harness: starts real meshgate parts on ephemeral loopback ports so each test reads like a
//! scenario. Everything is real: certificates from a real CA directory, TLS over real sockets.
#![allow(dead_code)]

pub mod attack;
pub mod k8s;
pub mod mesh;
pub mod otlp;
pub mod privileged;
pub mod recorder;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use meshgate_ca::authority::ca_server_id;
use meshgate_ca::limits::ConnectionLimits;
use meshgate_ca::service::{CaServer, ServeOptions};
use meshgate_ca::tls::{self, CertResolver, ExpectedServer};
use meshgate_ca::{CaDir, SpiffeId, TrustBundle, TrustDomain};
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// For a raw HTTP/1.1 test app: the next request head read from `tcp`, with what came after it
/// (the start of a body, the next request) left in `buf` for the caller; `None` once the peer
/// closes or fails. Apps that must misbehave in precise ways (answer before the body, never
/// read it, drop a connection mid-request) are written over this instead of over hyper.
pub async fn next_request_head(
    tcp: &mut tokio::net::TcpStream,
    buf: &mut Vec<u8>,
) -> Option<String> {
    use tokio::io::AsyncReadExt;
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            buf.drain(..end + 4);
            return Some(head);
        }
        let mut chunk = [0u8; 16 * 1024];
        match tcp.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// One heavy or privileged test at a time in this process. All integration tests share one test
/// binary, so libtest runs them as threads of one process; the tests that start whole meshes
/// under load, run the real CLI's demo, build a Docker image or create network namespaces and
/// attach eBPF programs hold this for their whole run, so they never overlap each other (light
/// tests still run alongside). A `tokio` mutex: no poisoning (a failed test releases it as it
/// unwinds), and async tests can hold it across `.await`.
static HEAVY: std::sync::LazyLock<tokio::sync::Mutex<()>> =
    std::sync::LazyLock::new(|| tokio::sync::Mutex::new(()));

/// Takes the heavy-test lock in a plain `#[test]` (never call it inside an async runtime).
pub fn heavy() -> tokio::sync::MutexGuard<'static, ()> {
    HEAVY.blocking_lock()
}

/// Takes the heavy-test lock in a `#[tokio::test]`.
pub async fn heavy_async() -> tokio::sync::MutexGuard<'static, ()> {
    HEAVY.lock().await
}

/// A lock shared by every test process on this machine, for tests that use machine-wide names
/// (the compose test: one Docker daemon, a fixed project name, image tag and cgroup paths). Two
/// test runs at once (two worktrees, a CI clone) would otherwise tear down each other's
/// containers; the second one waits. Released when the returned file is dropped (or the
/// process exits).
pub async fn machine_lock(name: &str) -> std::fs::File {
    let path = std::env::temp_dir().join(format!("meshgate-test-{name}.lock"));
    tokio::task::spawn_blocking(move || {
        use std::os::fd::AsRawFd;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("lock file {}: {e}", path.display()));
        // SAFETY: flock on a descriptor this function owns; it blocks until the lock is free.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(
            rc,
            0,
            "flock {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
        file
    })
    .await
    .expect("lock task")
}

/// The repository's root (the workspace of the `meshgate` package).
pub fn repo() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The `meshgate` binary under test: the one cargo built for this test run, or the one
/// `MESHGATE_TEST_BIN` names, so the suite can run against the shipped build
/// (`MESHGATE_TEST_BIN=target/pgo/release/meshgate`: profile-guided, `scripts/release-build.sh`).
pub fn meshgate_bin() -> &'static str {
    static BIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BIN.get_or_init(|| match std::env::var("MESHGATE_TEST_BIN") {
        Ok(path) if !path.is_empty() => {
            let path = std::fs::canonicalize(&path).unwrap_or_else(|e| {
                panic!("MESHGATE_TEST_BIN={path}: {e}; build it first (scripts/release-build.sh)")
            });
            path.to_string_lossy().into_owned()
        }
        _ => env!("CARGO_BIN_EXE_meshgate").to_owned(),
    })
}

/// A command running the `meshgate` binary under test ([`meshgate_bin`]).
pub fn meshgate() -> Command {
    Command::new(meshgate_bin())
}

/// Runs a command and returns its output, panicking if it cannot start.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Runs a command off the async runtime (the CA under test shares the runtime).
pub async fn run_async(mut cmd: Command) -> Output {
    tokio::task::spawn_blocking(move || run(&mut cmd))
        .await
        .unwrap()
}

/// Text of stdout + stderr.
pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Fails the test loudly if an external tool the test needs is missing (CI installs them).
pub fn require_tool(name: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "this test needs `{name}` on PATH (CI installs it via .ci/run: apt-get install {name})"
    );
}

pub fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

/// A CA directory and, optionally, its HTTPS service running in this process.
pub struct TestCa {
    pub tmp: tempfile::TempDir,
    pub dir: PathBuf,
    pub td: TrustDomain,
    pub svid_ttl: Duration,
    /// Timeouts and caps of the service (production defaults unless a test shortens them).
    pub limits: ConnectionLimits,
    addr: Option<SocketAddr>,
    running: Option<(oneshot::Sender<()>, JoinHandle<()>)>,
}

impl TestCa {
    /// A fresh CA directory for `mesh.local` (not serving).
    pub fn init() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ca");
        let td = TrustDomain::new("mesh.local").unwrap();
        CaDir::new(&dir).init(&td, false).unwrap();
        Self {
            tmp,
            dir,
            td,
            svid_ttl: Duration::from_secs(3600),
            limits: ConnectionLimits::default(),
            addr: None,
            running: None,
        }
    }

    /// A fresh CA serving on an ephemeral loopback port.
    pub async fn start(svid_ttl: Duration) -> Self {
        let mut ca = Self::init();
        ca.svid_ttl = svid_ttl;
        ca.serve().await;
        ca
    }

    /// A fresh CA serving with the given timeouts and caps.
    pub async fn start_with_limits(svid_ttl: Duration, limits: ConnectionLimits) -> Self {
        let mut ca = Self::init();
        ca.svid_ttl = svid_ttl;
        ca.limits = limits;
        ca.serve().await;
        ca
    }

    /// (Re)starts the service, on the same port as before if it ran already.
    pub async fn serve(&mut self) {
        let listen = self.addr.unwrap_or_else(|| "127.0.0.1:0".parse().unwrap());
        let loaded = CaDir::new(&self.dir).open().unwrap();
        let server = CaServer::bind(
            loaded,
            listen,
            ServeOptions {
                svid_ttl: self.svid_ttl,
                serving_hosts: vec![],
                limits: self.limits.clone(),
                k8s: None,
            },
        )
        .await
        .unwrap();
        self.addr = Some(server.local_addr());
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async {
            let _ = rx.await;
        }));
        self.running = Some((tx, task));
    }

    /// Stops the service (the port is free again afterwards).
    pub async fn stop(&mut self) {
        if let Some((tx, task)) = self.running.take() {
            let _ = tx.send(());
            task.await.unwrap();
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr.expect("CA is not serving")
    }

    /// Points [`call`](Self::call) and [`url`](Self::url) at this CA directory served by another
    /// process (`meshgate ca serve --dir` on `addr`).
    pub fn served_by_process_at(&mut self, addr: SocketAddr) {
        self.addr = Some(addr);
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.addr())
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn bundle_pem(&self) -> Vec<u8> {
        std::fs::read(self.path("bundle.pem")).unwrap()
    }

    pub fn bundle(&self) -> TrustBundle {
        TrustBundle::from_pem(&self.bundle_pem()).unwrap()
    }

    /// Mints a join token with the CA's own code (as `meshgate ca token` does).
    pub fn token(&self, id: &SpiffeId, ttl: Duration, reusable: bool) -> String {
        CaDir::new(&self.dir)
            .token_key()
            .unwrap()
            .mint(id, ttl, reusable)
            .0
    }

    /// A certificate for `id` valid from a minute ago for an hour, written to `dir` as
    /// `<name>.pem` (the chain) and `<name>.key`: what curl presents with `--cert`/`--key`.
    pub fn write_client_cert(&self, id: &str, dir: &Path, name: &str) {
        let now = time::OffsetDateTime::now_utc();
        let leaf = self.sign_leaf(
            &self::id(id),
            now - time::Duration::minutes(1),
            now + time::Duration::hours(1),
        );
        write_chain(&dir.join(format!("{name}.pem")), &leaf.chain);
        std::fs::write(dir.join(format!("{name}.key")), leaf.key.serialize_pem()).unwrap();
    }

    /// Signs a leaf with this CA's intermediate and arbitrary validity (e.g. already expired),
    /// the way only someone holding the CA key could.
    pub fn sign_leaf(
        &self,
        id: &SpiffeId,
        not_before: time::OffsetDateTime,
        not_after: time::OffsetDateTime,
    ) -> Svid {
        self.sign_leaf_with_sans(
            vec![SanType::URI(id.as_str().to_string().try_into().unwrap())],
            not_before,
            not_after,
        )
    }

    /// A leaf chained to this CA with arbitrary SANs (e.g. none, or a URI that is not a SPIFFE
    /// ID): a certificate the chain check accepts but the identity check must not.
    pub fn sign_leaf_with_sans(
        &self,
        sans: Vec<SanType>,
        not_before: time::OffsetDateTime,
        not_after: time::OffsetDateTime,
    ) -> Svid {
        let int_pem = std::fs::read_to_string(self.path("intermediate.pem")).unwrap();
        let int_key =
            KeyPair::from_pem(&std::fs::read_to_string(self.path("intermediate.key")).unwrap())
                .unwrap();
        let issuer = rcgen::Issuer::from_ca_cert_pem(&int_pem, int_key).unwrap();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.subject_alt_names = sans;
        p.is_ca = rcgen::IsCa::ExplicitNoCa;
        p.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.not_before = not_before;
        p.not_after = not_after;
        let leaf = p.signed_by(&key, &issuer).unwrap();
        let int_der = meshgate_ca::cert::certs_from_pem(int_pem.as_bytes())
            .unwrap()
            .remove(0);
        Svid {
            chain: vec![leaf.der().clone(), int_der],
            key,
        }
    }

    /// Obtains a valid SVID through the API with a fresh token.
    pub async fn bootstrap(&self, id: &SpiffeId) -> Svid {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let csr = csr_pem(&key, &[id.as_str()]);
        let token = self.token(id, Duration::from_secs(60), false);
        let resp = self
            .call("POST", "/v1/svid", Some(&token), csr.into_bytes(), None)
            .await;
        assert_eq!(resp.status, 200, "{}", resp.body);
        let json = resp.json();
        Svid {
            chain: meshgate_ca::cert::certs_from_pem(json["svid_pem"].as_str().unwrap().as_bytes())
                .unwrap(),
            key,
        }
    }

    /// A TLS client of the running CA without a client certificate, verifying the CA as a
    /// workload would (by SPIFFE ID), for tests that speak raw HTTP/1.1 to it.
    pub fn anonymous_connector(&self) -> tokio_rustls::TlsConnector {
        tokio_rustls::TlsConnector::from(Arc::new(tls::mesh_client_config(
            Arc::new(ArcSwap::from_pointee(self.bundle())),
            ExpectedServer::Exact(ca_server_id(&self.td)),
            None,
            &[b"http/1.1"],
        )))
    }

    /// One HTTPS call to the running CA, verifying it as a workload would (by SPIFFE ID).
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        bearer: Option<&str>,
        body: Vec<u8>,
        client: Option<&Svid>,
    ) -> ApiResponse {
        self.call_from(None, method, path, bearer, body, client)
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    /// Like [`call`](Self::call), from a chosen loopback source address (any of 127.0.0.0/8,
    /// to act as another host), failing instead of panicking when the CA closes the connection.
    pub async fn call_from(
        &self,
        source: Option<std::net::IpAddr>,
        method: &str,
        path: &str,
        bearer: Option<&str>,
        body: Vec<u8>,
        client: Option<&Svid>,
    ) -> Result<ApiResponse, String> {
        let bundle = Arc::new(ArcSwap::from_pointee(self.bundle()));
        let resolver = client.map(|svid| {
            let r = Arc::new(CertResolver::default());
            r.publish(
                svid.chain.clone(),
                PrivatePkcs8KeyDer::from(svid.key.serialize_der()).into(),
            )
            .unwrap();
            r
        });
        let config = tls::mesh_client_config(
            bundle,
            ExpectedServer::Exact(ca_server_id(&self.td)),
            resolver,
            &[b"http/1.1"],
        );
        let tcp = connect_from(source, self.addr()).await;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(tls::mesh_server_name(), tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| format!("HTTP: {e}"))?;
        tokio::spawn(conn);
        let mut req = http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "ca");
        if let Some(t) = bearer {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let resp = sender
            .send_request(req.body(Full::new(Bytes::from(body))).unwrap())
            .await
            .map_err(|e| format!("request: {e}"))?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("response body: {e}"))?
            .to_bytes();
        Ok(ApiResponse {
            status,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }
}

/// The text of the log file `path` once `ready` holds for it, waiting up to 5 s: a process
/// writes its log from a background thread, at most every 10 ms, so a line logged just now may
/// not be in the file yet. Panics with the log's text if `ready` never holds.
pub async fn log_when(path: &Path, what: &str, ready: impl Fn(&str) -> bool) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if ready(&text) {
            return text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what} is not in {} after 5 s:\n{text}",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A TCP connection to `addr`, from `source` (a loopback address other than 127.0.0.1 looks like
/// another host to the server) or the default source.
pub async fn connect_from(
    source: Option<std::net::IpAddr>,
    addr: SocketAddr,
) -> tokio::net::TcpStream {
    match source {
        None => tokio::net::TcpStream::connect(addr).await.unwrap(),
        Some(ip) => {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind(SocketAddr::new(ip, 0)).unwrap();
            socket.connect(addr).await.unwrap()
        }
    }
}

impl Drop for TestCa {
    fn drop(&mut self) {
        if let Some((tx, _)) = self.running.take() {
            let _ = tx.send(());
        }
    }
}

/// A certificate chain and its key.
pub struct Svid {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: KeyPair,
}

/// Status and body of an API call.
#[derive(Debug)]
pub struct ApiResponse {
    pub status: u16,
    pub body: String,
}

impl ApiResponse {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    /// Asserts a refusal with this status and error code, and a message mentioning `words`.
    pub fn assert_refused(&self, status: u16, code: &str, words: &str) {
        assert_eq!(self.status, status, "{}", self.body);
        let json = self.json();
        assert_eq!(json["error"], code, "{}", self.body);
        let message = json["message"].as_str().unwrap();
        assert!(
            message.contains(words),
            "message {message:?} should mention {words:?}"
        );
    }
}

/// A CSR for `key` asking for the given URI SANs.
pub fn csr_pem(key: &KeyPair, uris: &[&str]) -> String {
    csr_with(key, uris, |_| {})
}

/// A CSR with extra requests set by `tweak` (CA:TRUE, DNS SANs, …).
pub fn csr_with(
    key: &KeyPair,
    uris: &[&str],
    tweak: impl FnOnce(&mut CertificateParams),
) -> String {
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.subject_alt_names = uris
        .iter()
        .map(|u| SanType::URI(u.to_string().try_into().unwrap()))
        .collect();
    tweak(&mut p);
    p.serialize_request(key).unwrap().pem().unwrap()
}

/// Writes PEM certs to a file.
pub fn write_chain(path: &Path, chain: &[CertificateDer<'_>]) {
    std::fs::write(path, meshgate_ca::cert::certs_to_pem(chain)).unwrap();
}

/// A free loopback port for something a test starts later (a process, a forward).
///
/// Why not "bind port 0 and release it": the kernel hands out that port from its ephemeral
/// range, the same range every client socket of every concurrently running test draws its
/// local port from, so between release and the later bind another test's connection can take
/// it (CI saw `AddrInUse` exactly so). Ports here come from 10000–19999, below the ephemeral
/// range (32768 and up by default; `demo` tests use 20000 and up), each handed out once per
/// process, starting at an offset derived from the process id so concurrent test binaries
/// start apart, and checked free by binding before they are returned.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 10_000;
    const SPAN: u32 = 10_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        (u64::from(std::process::id()) * 997 % u64::from(SPAN)) as u32,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..SPAN {
        let port = (FIRST + NEXT.fetch_add(1, Ordering::SeqCst) % SPAN) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {FIRST}..{}", FIRST + SPAN);
}

/// Issues an SVID for `id` with `meshgate ca issue` into `out` (svid.pem, key.pem, bundle.pem).
pub fn issue_files(ca: &TestCa, spiffe_id: &str, out: &Path) {
    let done = run(meshgate()
        .args(["ca", "issue", "--id", spiffe_id, "--dir"])
        .arg(&ca.dir)
        .arg("--out")
        .arg(out));
    assert!(done.status.success(), "{}", text(&done));
}

/// A real `meshgate proxy` process with a static identity from `files` (as written by
/// [`issue_files`]); killed on drop so a failed assertion never leaves it running.
pub struct ProxyProcess {
    pub child: Option<std::process::Child>,
    pub inbound: u16,
    pub admin: u16,
}

impl ProxyProcess {
    pub fn spawn(files: &Path, policies: &Path, app: &str, extra: &[&str]) -> Self {
        Self::spawn_with(files, policies, app, extra, &[], None)
    }

    /// Like [`spawn`](Self::spawn), with extra environment and stderr (the logs) sent to a file.
    pub fn spawn_with(
        files: &Path,
        policies: &Path,
        app: &str,
        extra: &[&str],
        env: &[(&str, &str)],
        log: Option<&Path>,
    ) -> Self {
        Self::spawn_on(
            files,
            policies,
            app,
            (free_port(), free_port()),
            extra,
            env,
            log,
        )
    }

    /// Like [`spawn_with`](Self::spawn_with), on given `(inbound, admin)` ports (e.g. those of a
    /// process that was killed, to restart "the same" sidecar).
    pub fn spawn_on(
        files: &Path,
        policies: &Path,
        app: &str,
        ports: (u16, u16),
        extra: &[&str],
        env: &[(&str, &str)],
        log: Option<&Path>,
    ) -> Self {
        let policy = [std::ffi::OsStr::new("--policy-dir"), policies.as_os_str()];
        Self::spawn_with_policy(files, &policy, app, ports, extra, env, log)
    }

    /// A sidecar streaming its policy from the control planes at `urls` (`--control-plane`,
    /// comma-separated), logging at info level to `log`.
    pub fn spawn_streaming(files: &Path, urls: &[String], app: &str, log: &Path) -> Self {
        let urls = urls.join(",");
        let policy = [std::ffi::OsStr::new("--control-plane"), urls.as_ref()];
        Self::spawn_with_policy(
            files,
            &policy,
            app,
            (free_port(), free_port()),
            &[],
            &[],
            Some(log),
        )
    }

    fn spawn_with_policy(
        files: &Path,
        policy: &[&std::ffi::OsStr],
        app: &str,
        (inbound, admin): (u16, u16),
        extra: &[&str],
        env: &[(&str, &str)],
        log: Option<&Path>,
    ) -> Self {
        let mut cmd = meshgate();
        cmd.envs(env.iter().copied());
        if let Some(log) = log {
            cmd.stderr(std::fs::File::create(log).unwrap());
        }
        let child = cmd
            .args(["proxy", "--app", app])
            .arg("--svid-cert")
            .arg(files.join("svid.pem"))
            .arg("--svid-key")
            .arg(files.join("key.pem"))
            .arg("--trust-bundle")
            .arg(files.join("bundle.pem"))
            .args(policy)
            .args(["--inbound", &format!("127.0.0.1:{inbound}")])
            .args(["--outbound", &format!("127.0.0.1:{}", free_port())])
            .args(["--admin", &format!("127.0.0.1:{admin}")])
            .args(extra)
            .env("MESHGATE_LOG", if log.is_some() { "info" } else { "warn" })
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        Self {
            child: Some(child),
            inbound,
            admin,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Waits until `GET /ready` answers 200.
    pub async fn ready(&self) {
        let url = format!("http://127.0.0.1:{}/ready", self.admin);
        for _ in 0..100 {
            // curl is a blocking child process: run it off the async runtime's worker threads.
            let url = url.clone();
            let up = tokio::task::spawn_blocking(move || {
                Command::new("curl")
                    .args(["-sf", &url])
                    .output()
                    .unwrap()
                    .status
                    .success()
            })
            .await
            .unwrap();
            if up {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("sidecar did not become ready");
    }

    /// Sends `signal` (e.g. "TERM", "HUP") to the process.
    pub fn signal(&self, signal: &str) {
        let sent = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(sent.success());
    }

    /// Waits for the process to exit and returns its status.
    pub async fn wait(mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        tokio::task::spawn_blocking(move || child.wait().unwrap())
            .await
            .unwrap()
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A TLS client config presenting `svid`, trusting `bundle`, and accepting only a server whose
/// SPIFFE ID is `expected` — what a sidecar's outbound side uses.
pub fn mesh_client(
    bundle: TrustBundle,
    svid: &Svid,
    expected: SpiffeId,
    alpn: &[&[u8]],
) -> Arc<rustls::ClientConfig> {
    let resolver = Arc::new(CertResolver::default());
    resolver
        .publish(
            svid.chain.clone(),
            PrivatePkcs8KeyDer::from(svid.key.serialize_der()).into(),
        )
        .unwrap();
    Arc::new(tls::mesh_client_config(
        Arc::new(ArcSwap::from_pointee(bundle)),
        ExpectedServer::Exact(expected),
        Some(resolver),
        alpn,
    ))
}

/// Times the first request on ten new mTLS connections to `addr` from a client that leaves
/// Nagle's algorithm on (the socket default), from the request's write to the response head;
/// each answer must be a 200. Sorted, shortest first.
///
/// meshgate's TLS servers send no session tickets, so after the client's Finished the server
/// has nothing to send; unless it acknowledges the Finished at once, the client's kernel holds
/// the request until the server's delayed ACK (at least 40 ms on Linux, `TCP_ATO_MIN`).
pub async fn nagle_first_answers(
    addr: SocketAddr,
    connector: &tokio_rustls::TlsConnector,
    request: &[u8],
) -> Vec<Duration> {
    use tokio::io::AsyncWriteExt;
    let mut took = Vec::new();
    for _ in 0..10 {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.set_nodelay(false).unwrap();
        let mut tls = connector
            .connect(tls::mesh_server_name(), tcp)
            .await
            .unwrap();
        let start = std::time::Instant::now();
        tls.write_all(request).await.unwrap();
        let head = attack::read_head(&mut tls).await;
        took.push(start.elapsed());
        assert_eq!(attack::status_of(&head), 200, "{head}");
    }
    took.sort();
    took
}

/// Not a performance measurement: the bug is a fixed kernel timer (≥ 40 ms), so the bound is
/// half of it, on the median of the connections, clear of scheduling noise on a busy machine.
pub fn assert_not_held_for_delayed_ack(took: &[Duration]) {
    assert!(
        took[took.len() / 2] < Duration::from_millis(20),
        "the first request on a new connection waited for a delayed ACK: {took:?}"
    );
}
