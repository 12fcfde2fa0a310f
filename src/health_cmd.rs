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
    /// `http://host:port/path`.
    url: String,
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
    let uri: http::Uri = args
        .url
        .parse()
        .with_context(|| format!("invalid URL {:?}", args.url))?;
    if uri.scheme_str() != Some("http") {
        bail!(
            "{} : only http:// URLs are supported (admin and probe endpoints are plaintext on loopback)",
            args.url
        );
    }
    let host = uri.host().context("URL has no host")?.to_string();
    let port = uri.port_u16().unwrap_or(80);
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let status = runtime.block_on(async {
        tokio::time::timeout(args.timeout, async {
            let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
            tokio::spawn(conn);
            let req = http::Request::get(path)
                .header("host", host.as_str())
                .body(Empty::<Bytes>::new())?;
            anyhow::Ok(sender.send_request(req).await?.status())
        })
        .await
        .map_err(|_| anyhow::anyhow!("no answer within {:?}", args.timeout))?
    });
    match status {
        Ok(s) if s.is_success() => {
            println!("healthy: {} {s}", args.url);
            Ok(())
        }
        Ok(s) => bail!("unhealthy: {} answered {s}", args.url),
        Err(e) => bail!("unhealthy: {}: {e:#}", args.url),
    }
}
