//! Kept-alive HTTP/1.1 connections to one local app: the shared [`crate::h1_pool`] over plain
//! TCP to the app's address.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::sanitize::TrailerFilter;
use crate::h1_pool::{Dial, Http1Pool, Resendable};

/// How long an app may take to accept a connection before the request fails with 502.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// An idle connection unused this long is closed (hyper-util's default too; below the 75 s
/// after which nginx drops idle keep-alive connections, so it is rarely the app's close we race).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// The connections to one app.
pub type AppPool = Http1Pool<AppDial, TrailerFilter>;

/// A pool for the app at `addr`.
pub fn app_pool(addr: SocketAddr) -> Arc<AppPool> {
    Http1Pool::new(AppDial::new(addr), IDLE_TIMEOUT)
}

/// Dials the app: TCP with `TCP_NODELAY`, within [`CONNECT_TIMEOUT`]. For HTTP/1.1 (the pool)
/// and h2c ([`crate::h2_conn`]) alike.
#[derive(Debug)]
pub struct AppDial {
    addr: SocketAddr,
}

impl AppDial {
    pub fn new(addr: SocketAddr) -> Self {
        Self { addr }
    }
}

/// Why no connection to the app was opened (the forwarder answers 502 and logs it).
#[derive(Debug, thiserror::Error)]
pub enum AppDialError {
    #[error("connecting to the app at {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the app at {addr} did not accept a connection within {CONNECT_TIMEOUT:?}")]
    ConnectTimeout { addr: SocketAddr },
}

impl Dial for AppDial {
    type Io = TokioIo<TcpStream>;
    type Error = AppDialError;

    async fn dial(&self) -> Result<Self::Io, AppDialError> {
        let addr = self.addr;
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| AppDialError::ConnectTimeout { addr })?
            .map_err(|source| AppDialError::Connect { addr, source })?;
        let _ = tcp.set_nodelay(true);
        Ok(TokioIo::new(tcp))
    }

    fn peer(&self) -> String {
        format!("app at {}", self.addr)
    }
}

impl Resendable for TrailerFilter {
    fn empty() -> Self {
        TrailerFilter::empty()
    }
}
