//! `meshgate health URL`: a container HEALTHCHECK without curl in the image. Exit 0 on a 2xx
//! answer within the timeout, 1 otherwise, with the reason on stderr.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::Args;
use http_body_util::Empty;
use hyper_util::rt::TokioIo;

use crate::parse_duration;

/// Check an HTTP endpoint (e.g. a sidecar's `http://127.0.0.1:15000/ready`).
#[derive(Debug, Args)]
pub struct HealthArgs {
    /// `http://host:port/path` (2xx = healthy) or `tcp://host:port` (accepts connections).
    /// Containers set it once in MESHGATE_HEALTH_URL so one image HEALTHCHECK fits every role.
    #[arg(
        env = "MESHGATE_HEALTH_URL",
        default_value = "http://127.0.0.1:15000/ready"
    )]
    url: String,
    /// How long to wait for the answer.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    timeout: Duration,
}

/// GET `url` (plain HTTP) and return the body of a 2xx answer.
pub async fn get(url: &str, timeout: Duration) -> Result<String> {
    use http_body_util::BodyExt;
    let uri: http::Uri = url
        .parse()
        .with_context(|| format!("invalid URL {url:?}"))?;
    let host = uri.host().context("URL has no host")?.to_string();
    let port = uri.port_u16().unwrap_or(80);
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
    tokio::time::timeout(timeout, async {
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        let req = http::Request::get(path)
            .header("host", host.as_str())
            .body(Empty::<Bytes>::new())?;
        let resp = sender.send_request(req).await?;
        let status = resp.status();
        let body =
            String::from_utf8_lossy(&resp.into_body().collect().await?.to_bytes()).into_owned();
        if !status.is_success() {
            bail!("{url} answered {status}: {}", body.trim());
        }
        anyhow::Ok(body)
    })
    .await
    .map_err(|_| anyhow::anyhow!("no answer from {url} within {timeout:?}"))?
}

pub fn run(args: HealthArgs) -> Result<()> {
    let url = args.url.as_str();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let checked = if let Some(addr) = url.strip_prefix("tcp://") {
        // For TLS-only listeners (the CA): accepting connections is what "up" means there.
        runtime.block_on(async {
            tokio::time::timeout(args.timeout, tokio::net::TcpStream::connect(addr))
                .await
                .map_err(|_| anyhow::anyhow!("no connection within {:?}", args.timeout))?
                .map(drop)
                .map_err(anyhow::Error::from)
        })
    } else if url.starts_with("http://") {
        runtime.block_on(get(url, args.timeout)).map(drop)
    } else {
        bail!(
            "{url}: use an http:// URL (admin and probe endpoints are plaintext on loopback) or \
             tcp://HOST:PORT for TLS-only listeners"
        );
    };
    match checked {
        Ok(()) => {
            println!("healthy: {url}");
            Ok(())
        }
        Err(e) => bail!("unhealthy: {url}: {e:#}"),
    }
}
