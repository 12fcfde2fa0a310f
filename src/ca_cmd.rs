//! `meshgate ca …` subcommands.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::parse_duration;
use clap::Subcommand;
use meshgate_ca::authority::MIN_SVID_TTL;
use meshgate_ca::k8s::K8sConfig;
use meshgate_ca::limits::ConnectionLimits;
use meshgate_ca::service::{CaServer, ServeOptions};
use meshgate_ca::{CaDir, SpiffeId, TrustBundle, TrustDomain, cert, fsutil};
use rustls_pki_types::UnixTime;

fn parse_id(s: &str) -> Result<SpiffeId, String> {
    SpiffeId::parse(s).map_err(|e| e.to_string())
}

fn parse_trust_domain(s: &str) -> Result<TrustDomain, String> {
    TrustDomain::new(s).map_err(|e| e.to_string())
}

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Create a root CA (ECDSA P-256, 10 years) and a signing intermediate (1 year) in DIR.
    #[command(after_help = "Example:\n  meshgate ca init --dir ./ca --trust-domain mesh.local")]
    Init {
        /// Directory of the CA (created; keys are written 0600).
        #[arg(long)]
        dir: PathBuf,
        /// Trust domain of every SPIFFE ID this CA issues.
        #[arg(long, default_value = "mesh.local", value_parser = parse_trust_domain)]
        trust_domain: TrustDomain,
        /// Replace an existing CA (every SVID it issued stops verifying).
        #[arg(long)]
        force: bool,
    },
    /// Issue an SVID offline: writes OUT/svid.pem (leaf + chain), OUT/key.pem, OUT/bundle.pem.
    #[command(
        after_help = "Example:\n  meshgate ca issue --dir ./ca --id spiffe://mesh.local/ns/shop/sa/web --out ./web --ttl 24h"
    )]
    Issue {
        /// Directory of the CA (`meshgate ca init`).
        #[arg(long)]
        dir: PathBuf,
        /// SPIFFE ID of the SVID, spiffe://TD/ns/NAMESPACE/sa/ACCOUNT.
        #[arg(long, value_parser = parse_id)]
        id: SpiffeId,
        /// Directory to write svid.pem, key.pem (0600) and bundle.pem into.
        #[arg(long)]
        out: PathBuf,
        /// Lifetime of the SVID.
        #[arg(long, default_value = "1h", value_parser = parse_duration)]
        ttl: Duration,
    },
    /// Mint a join token bound to one SPIFFE ID and print it on stdout.
    #[command(
        after_help = "Example:\n  meshgate ca token --dir ./ca --id spiffe://mesh.local/ns/shop/sa/web --ttl 10m"
    )]
    Token {
        /// Directory of the CA (`meshgate ca init`).
        #[arg(long)]
        dir: PathBuf,
        /// The only SPIFFE ID the token can bootstrap.
        #[arg(long, value_parser = parse_id)]
        id: SpiffeId,
        /// How long the token can be used.
        #[arg(long, default_value = "10m", value_parser = parse_duration)]
        ttl: Duration,
        /// Allow the token to bootstrap several workloads until it expires (default: single use).
        #[arg(long)]
        reusable: bool,
    },
    /// Serve the issuing API over HTTPS (POST /v1/svid, POST /v1/svid/renew, GET /v1/bundle).
    #[command(
        after_help = "Example:\n  meshgate ca serve --dir ./ca --listen 0.0.0.0:15012 --svid-ttl 1h"
    )]
    Serve {
        /// Directory of the CA (`meshgate ca init`, or created with --init-trust-domain).
        #[arg(long)]
        dir: PathBuf,
        /// Address of the HTTPS API.
        #[arg(long, default_value = "127.0.0.1:15012")]
        listen: SocketAddr,
        /// Lifetime of issued SVIDs (workloads renew at half-life).
        #[arg(long, default_value = "1h", value_parser = parse_duration)]
        svid_ttl: Duration,
        /// Extra DNS name or IP for the CA's serving certificate (repeatable), e.g. `--san ca`.
        #[arg(long = "san")]
        sans: Vec<String>,
        /// Create the CA in DIR for this trust domain first, unless DIR already holds one (for
        /// containers: the first start creates it, restarts reuse it).
        #[arg(long, value_parser = parse_trust_domain)]
        init_trust_domain: Option<TrustDomain>,
        /// Open connections at most; a quarter is kept for peers with a valid SVID (renewals).
        /// Keep it well under `ulimit -n`.
        #[arg(long, default_value_t = meshgate_ca::limits::DEFAULT_MAX_CONNECTIONS)]
        max_connections: usize,
        /// Unauthenticated connections per source IP at most.
        #[arg(long, default_value_t = meshgate_ca::limits::DEFAULT_MAX_CONNECTIONS_PER_IP)]
        max_connections_per_ip: usize,
        #[command(flatten)]
        bootstrap: BootstrapArgs,
        // Boxed: the Kubernetes flags would make every other variant as large.
        #[command(flatten)]
        k8s: Box<K8sArgs>,
    },
    /// Rotate the root: a new root and intermediate sign from now on; the bundle keeps the old
    /// roots until `--finish`, so nothing issued so far stops verifying and nothing restarts.
    #[command(
        after_help = "Example:\n  meshgate ca rotate --dir ./ca            # new root + intermediate, old roots kept in the bundle\n  meshgate ca rotate --dir ./ca --finish   # one SVID TTL later: drop the old roots"
    )]
    Rotate {
        /// Directory of the CA.
        #[arg(long)]
        dir: PathBuf,
        /// End the rotation: drop every root but the current one from the bundle (only after all
        /// SVIDs have been renewed, i.e. one SVID TTL after the rotation).
        #[arg(long)]
        finish: bool,
    },
    /// Print a certificate's SPIFFE ID, serial, validity and chain status.
    #[command(
        after_help = "Example:\n  meshgate ca inspect ./web/svid.pem --bundle ./ca/bundle.pem"
    )]
    Inspect {
        /// PEM file: leaf first, then any intermediates.
        cert: PathBuf,
        /// Roots to check the chain against (default: bundle.pem next to CERT, if present).
        #[arg(long)]
        bundle: Option<PathBuf>,
    },
}

/// Hands workloads what they need to join, through a directory they mount: the trust bundle
/// and one join token per identity. For docker-compose, where there is no Secret store; in
/// Kubernetes, pods use projected ServiceAccount tokens instead (`--k8s-issuer`).
#[derive(Debug, clap::Args)]
pub struct BootstrapArgs {
    /// Write BOOTSTRAP_DIR/bundle.pem and BOOTSTRAP_DIR/tokens/<ns>.<sa>.token for every
    /// --token-for at start (files readable by the CA's user only).
    #[arg(long, requires = "token_for")]
    bootstrap_dir: Option<PathBuf>,
    /// Identity to mint a join token for (repeatable). These tokens are reusable until they
    /// expire, so a restarted sidecar can join again: protect the directory like a Secret.
    #[arg(long, value_parser = parse_id, requires = "bootstrap_dir")]
    token_for: Vec<SpiffeId>,
    /// Lifetime of the tokens in the bootstrap directory.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    bootstrap_token_ttl: Duration,
}

/// Kubernetes ServiceAccount tokens as bootstrap credentials (instead of join tokens).
#[derive(Debug, clap::Args)]
pub struct K8sArgs {
    /// Accept Kubernetes projected ServiceAccount tokens at /v1/svid from this cluster: its
    /// service-account issuer, which tokens' `iss` must equal (e.g.
    /// https://kubernetes.default.svc.cluster.local; `kubectl get --raw
    /// /.well-known/openid-configuration` shows it). Issues spiffe://<td>/ns/<ns>/sa/<sa>.
    #[arg(long, value_name = "URL")]
    k8s_issuer: Option<String>,
    /// Audience the tokens must carry (the `audience` of the projected token volume).
    #[arg(long, value_name = "AUD", default_value = meshgate_ca::k8s::DEFAULT_AUDIENCE, requires = "k8s_issuer")]
    k8s_audience: String,
    /// The cluster's JWKS (signing keys) URL [default: `jwks_uri` of the OIDC discovery
    /// document at <issuer>/.well-known/openid-configuration].
    #[arg(long, value_name = "URL", requires = "k8s_issuer")]
    k8s_jwks_url: Option<String>,
    /// PEM roots to verify the discovery/JWKS server with [default: the in-cluster
    /// /var/run/secrets/kubernetes.io/serviceaccount/ca.crt when present].
    #[arg(long, value_name = "FILE", requires = "k8s_issuer")]
    k8s_api_ca: Option<PathBuf>,
    /// Bearer token for the discovery/JWKS fetches, re-read at each fetch [default: the
    /// in-cluster /var/run/secrets/kubernetes.io/serviceaccount/token when present and
    /// --k8s-api-ca is not given: the pod's API token is only sent to the cluster's API server].
    #[arg(long, value_name = "FILE", requires = "k8s_issuer")]
    k8s_api_token_file: Option<PathBuf>,
}

impl K8sArgs {
    /// The verifier configuration, or `None` without `--k8s-issuer`.
    fn config(&self) -> Result<Option<K8sConfig>> {
        let Some(issuer) = &self.k8s_issuer else {
            return Ok(None);
        };
        let in_cluster_ca = Path::new(meshgate_ca::k8s::IN_CLUSTER_CA);
        let (roots, token_file) = match &self.k8s_api_ca {
            Some(ca) => (ca.clone(), self.k8s_api_token_file.clone()),
            None if in_cluster_ca.exists() => {
                let in_cluster_token = Path::new(meshgate_ca::k8s::IN_CLUSTER_TOKEN);
                let token = self.k8s_api_token_file.clone().or_else(|| {
                    in_cluster_token
                        .exists()
                        .then(|| in_cluster_token.to_path_buf())
                });
                (in_cluster_ca.to_path_buf(), token)
            }
            None => bail!(
                "--k8s-issuer needs the roots that sign the issuer's HTTPS certificate: pass --k8s-api-ca FILE \
                 (the cluster CA, e.g. from the kubeconfig; for a public issuer such as EKS or GKE, the system bundle \
                 /etc/ssl/certs/ca-certificates.crt); in a pod, {} is used when present",
                meshgate_ca::k8s::IN_CLUSTER_CA
            ),
        };
        let api_ca_pem = std::fs::read(&roots)
            .with_context(|| format!("reading --k8s-api-ca {}", roots.display()))?;
        Ok(Some(K8sConfig {
            issuer: issuer.clone(),
            audience: self.k8s_audience.clone(),
            jwks_url: self.k8s_jwks_url.clone(),
            api_ca_pem,
            api_token_file: token_file,
            refresh_interval: meshgate_ca::k8s::REFRESH_INTERVAL,
            refetch_min_gap: meshgate_ca::k8s::REFETCH_MIN_GAP,
        }))
    }
}

/// Writes the bootstrap directory described by `args` (nothing without `--bootstrap-dir`).
fn write_bootstrap(dir: &Path, args: &BootstrapArgs) -> Result<()> {
    let Some(out) = &args.bootstrap_dir else {
        return Ok(());
    };
    let ca = CaDir::new(dir);
    let td = ca.trust_domain()?;
    let key = ca.token_key()?;
    let tokens = out.join("tokens");
    std::fs::create_dir_all(&tokens).with_context(|| format!("creating {}", tokens.display()))?;
    let bundle = ca.read_bundle()?;
    fsutil::write_atomic(&out.join("bundle.pem"), bundle.to_pem().as_bytes(), 0o644)
        .with_context(|| format!("writing {}/bundle.pem", out.display()))?;
    for id in &args.token_for {
        if !id.is_member_of(&td) {
            bail!("--token-for {id} is outside this CA's trust domain {td}");
        }
        let Some((namespace, account)) = id.namespace_and_account() else {
            bail!(
                "--token-for {id}: use an ID of the form spiffe://{td}/ns/<namespace>/sa/<account>"
            );
        };
        let name = format!("{namespace}.{account}.token");
        let (token, _) = key.mint(id, args.bootstrap_token_ttl, true);
        let path = tokens.join(&name);
        fsutil::write_atomic(&path, format!("{token}\n").as_bytes(), 0o600)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    tracing::info!(
        event = "bootstrap.written",
        dir = %out.display(),
        tokens = args.token_for.len(),
        "bootstrap directory written"
    );
    Ok(())
}

pub fn run(command: CaCommand) -> Result<()> {
    match command {
        CaCommand::Init {
            dir,
            trust_domain,
            force,
        } => init(&dir, &trust_domain, force),
        CaCommand::Issue { dir, id, out, ttl } => issue(&dir, &id, &out, ttl),
        CaCommand::Token {
            dir,
            id,
            ttl,
            reusable,
        } => token(&dir, &id, ttl, reusable),
        CaCommand::Serve {
            dir,
            listen,
            svid_ttl,
            sans,
            init_trust_domain,
            max_connections,
            max_connections_per_ip,
            bootstrap,
            k8s,
        } => {
            if let Some(td) = &init_trust_domain {
                let ca = CaDir::new(&dir);
                if ca.bundle_path().exists() {
                    tracing::info!(dir = %dir.display(), "CA exists; --init-trust-domain ignored");
                } else {
                    ca.init(td, false)?;
                    tracing::info!(dir = %dir.display(), trust_domain = %td, "CA created");
                }
            }
            write_bootstrap(&dir, &bootstrap)?;
            let limits = ConnectionLimits {
                max_connections,
                reserved_for_peers: max_connections / 4,
                max_connections_per_ip,
                ..ConnectionLimits::default()
            };
            let k8s = k8s.config()?;
            serve(&dir, listen, svid_ttl, sans, limits, k8s)
        }
        CaCommand::Inspect { cert, bundle } => inspect(&cert, bundle.as_deref()),
        CaCommand::Rotate { dir, finish } => rotate(&dir, finish),
    }
}

fn init(dir: &Path, td: &TrustDomain, force: bool) -> Result<()> {
    let ca = CaDir::new(dir);
    ca.init(td, force)?;
    println!("created CA for trust domain {td} in {}", dir.display());
    println!("  root:         {}", ca.root_cert_path().display());
    println!("  intermediate: {}", ca.intermediate_cert_path().display());
    println!("  trust bundle: {}", ca.bundle_path().display());
    println!(
        "next: meshgate ca serve --dir {0}   |   meshgate ca token --dir {0} --id spiffe://{td}/ns/default/sa/app",
        dir.display()
    );
    Ok(())
}

fn check_ttl(ttl: Duration) -> Result<()> {
    if ttl < MIN_SVID_TTL {
        bail!(
            "SVID TTL {} is too short; use at least {}",
            humantime::format_duration(ttl),
            humantime::format_duration(MIN_SVID_TTL)
        );
    }
    Ok(())
}

fn issue(dir: &Path, id: &SpiffeId, out: &Path, ttl: Duration) -> Result<()> {
    check_ttl(ttl)?;
    let ca = CaDir::new(dir).open()?;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let issued = ca.authority.issue_for_key(&key, id, ttl)?;
    let bundle = ca.dir.read_bundle()?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let write = |name: &str, bytes: &[u8], mode: u32| {
        let path = out.join(name);
        fsutil::write_atomic(&path, bytes, mode)
            .with_context(|| format!("writing {}", path.display()))
    };
    write("key.pem", key.serialize_pem().as_bytes(), 0o600)?;
    write("svid.pem", issued.chain_pem().as_bytes(), 0o644)?;
    write("bundle.pem", bundle.to_pem().as_bytes(), 0o644)?;
    tracing::info!(
        event = "svid.issued",
        endpoint = "offline",
        id = %issued.info.id,
        serial = %issued.info.serial,
        not_after = %cert::rfc3339(issued.info.not_after),
        "SVID issued"
    );
    println!(
        "issued {id} (serial {}, not after {}) to {}/{{svid.pem,key.pem,bundle.pem}}",
        issued.info.serial,
        cert::rfc3339(issued.info.not_after),
        out.display()
    );
    Ok(())
}

fn token(dir: &Path, id: &SpiffeId, ttl: Duration, reusable: bool) -> Result<()> {
    let ca = CaDir::new(dir);
    let td = ca.trust_domain()?;
    if !id.is_member_of(&td) {
        bail!(
            "{id} is outside this CA's trust domain {td}; use an ID of the form spiffe://{td}/ns/<namespace>/sa/<account>"
        );
    }
    let (token, _) = ca.token_key()?.mint(id, ttl, reusable);
    println!("{token}");
    Ok(())
}

fn serve(
    dir: &Path,
    listen: SocketAddr,
    svid_ttl: Duration,
    sans: Vec<String>,
    limits: ConnectionLimits,
    k8s: Option<K8sConfig>,
) -> Result<()> {
    check_ttl(svid_ttl)?;
    let ca = CaDir::new(dir).open()?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let server = CaServer::bind(
            ca,
            listen,
            ServeOptions {
                svid_ttl,
                serving_hosts: sans,
                limits,
                k8s,
            },
        )
        .await?;
        println!("meshgate CA listening on https://{}", server.local_addr());
        server.run(shutdown_signal()).await;
        Ok(())
    })
}

/// Completes on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn rotate(dir: &Path, finish: bool) -> Result<()> {
    let ca = CaDir::new(dir);
    if finish {
        let dropped = ca.finish_rotation()?;
        println!(
            "rotation finished: dropped {dropped} old root(s) from {}; SVIDs under them no longer verify",
            ca.bundle_path().display()
        );
    } else {
        let roots = ca.rotate()?;
        println!(
            "rotated: new root and intermediate in {}; the bundle now trusts {roots} roots. Workloads pick up the bundle by themselves; \
             run `meshgate ca rotate --dir {} --finish` once every SVID has been renewed (one SVID TTL from now)",
            dir.display(),
            dir.display()
        );
    }
    Ok(())
}

fn inspect(path: &Path, bundle: Option<&Path>) -> Result<()> {
    let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let chain = cert::certs_from_pem(&pem).with_context(|| path.display().to_string())?;
    let info = cert::cert_info(&chain[0])
        .with_context(|| format!("{}: leaf certificate", path.display()))?;
    println!("spiffe id:  {}", info.id);
    println!("serial:     {}", info.serial);
    println!("not before: {}", cert::rfc3339(info.not_before));
    println!("not after:  {}", cert::rfc3339(info.not_after));
    println!("ca:         {}", info.is_ca);
    let sibling = path.with_file_name("bundle.pem");
    let bundle_path = bundle
        .map(Path::to_path_buf)
        .or_else(|| sibling.exists().then_some(sibling));
    match bundle_path {
        None => println!("chain:      not checked (pass --bundle ROOTS.pem)"),
        Some(b) => {
            let roots = std::fs::read(&b).with_context(|| format!("reading {}", b.display()))?;
            let bundle = TrustBundle::from_pem(&roots).with_context(|| b.display().to_string())?;
            match bundle.verify_client(&chain[0], &chain[1..], UnixTime::now()) {
                Ok(_) => println!("chain:      valid (verified against {})", b.display()),
                Err(e) => {
                    println!("chain:      INVALID against {}: {e}", b.display());
                    bail!("certificate chain does not verify: {e}");
                }
            }
        }
    }
    Ok(())
}
