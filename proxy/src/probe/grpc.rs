//! Just enough of a gRPC client to ask a local app `grpc.health.v1.Health/Check`, the call a
//! kubelet `grpc` probe makes. The kubelet cannot make it through the sidecar (the app port takes
//! only mTLS once meshed), so the probe listener makes it on the kubelet's behalf, over h2c to
//! `127.0.0.1:<port>`, and answers the kubelet in plain HTTP.
//!
//! The two messages are tiny and fixed (`HealthCheckRequest { string service = 1; }`,
//! `HealthCheckResponse { ServingStatus status = 1; }`), so they are encoded by hand here rather
//! than by pulling a protobuf code generator into the sidecar.

use std::net::Ipv4Addr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

/// `HealthCheckResponse.ServingStatus.SERVING`.
const SERVING: u64 = 1;
/// A health answer is a few bytes; anything much larger is not one.
const MAX_RESPONSE: usize = 64 * 1024;

/// Asks the app on `127.0.0.1:port` whether `service` (empty: the whole server) is SERVING.
/// `Err` says why not, for the probe's response body.
pub async fn check(port: u16, service: &str, timeout: Duration) -> Result<(), String> {
    match tokio::time::timeout(timeout, check_now(port, service)).await {
        Ok(result) => result,
        Err(_) => Err(format!(
            "no health answer from 127.0.0.1:{port} within {}s",
            timeout.as_secs_f32()
        )),
    }
}

/// Aborts the HTTP/2 connection task when the check ends (or is cancelled by its timeout).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn check_now(port: u16, service: &str) -> Result<(), String> {
    let tcp = TcpStream::connect((Ipv4Addr::LOCALHOST, port))
        .await
        .map_err(|e| format!("connecting to 127.0.0.1:{port}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .map_err(|e| {
                format!("HTTP/2 with 127.0.0.1:{port}: {e} (does the port serve gRPC over h2c?)")
            })?;
    let _conn = AbortOnDrop(tokio::spawn(async move {
        let _ = conn.await;
    }));
    let req = Request::post(format!(
        "http://127.0.0.1:{port}/grpc.health.v1.Health/Check"
    ))
    .header(header::CONTENT_TYPE, "application/grpc")
    .header(header::TE, "trailers")
    .header(header::USER_AGENT, "meshgate-probe")
    .body(Full::new(request_message(service)))
    .expect("valid health request");
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("Health/Check to 127.0.0.1:{port}: {e}"))?;
    if resp.status() != StatusCode::OK {
        return Err(format!(
            "Health/Check answered HTTP {} (not a gRPC server?)",
            resp.status()
        ));
    }
    // A trailers-only answer (an error, e.g. NOT_FOUND for an unknown service) carries the
    // status in the headers.
    if let Some(code) = resp.headers().get("grpc-status") {
        grpc_status(code.as_bytes(), resp.headers().get("grpc-message"))?;
    }
    let collected = Limited::new(resp.into_body(), MAX_RESPONSE)
        .collect()
        .await
        .map_err(|e| format!("reading the Health/Check answer: {e}"))?;
    let Some(trailers) = collected.trailers().cloned() else {
        return Err("Health/Check answer has no trailers (no grpc-status)".into());
    };
    let Some(code) = trailers.get("grpc-status") else {
        return Err("Health/Check answer has no grpc-status".into());
    };
    grpc_status(code.as_bytes(), trailers.get("grpc-message"))?;
    match serving_status(&collected.to_bytes())? {
        SERVING => Ok(()),
        other => Err(format!("status {}", status_name(other))),
    }
}

/// `Ok` for grpc-status 0; otherwise the code, its name and the server's message.
fn grpc_status(code: &[u8], message: Option<&http::HeaderValue>) -> Result<(), String> {
    if code == b"0" {
        return Ok(());
    }
    let code = String::from_utf8_lossy(code);
    let name = match code.as_ref() {
        "1" => "CANCELLED",
        "2" => "UNKNOWN",
        "3" => "INVALID_ARGUMENT",
        "4" => "DEADLINE_EXCEEDED",
        "5" => "NOT_FOUND: the app does not know this service",
        "7" => "PERMISSION_DENIED",
        "12" => "UNIMPLEMENTED: the app serves no grpc.health.v1.Health",
        "13" => "INTERNAL",
        "14" => "UNAVAILABLE",
        _ => "",
    };
    let mut reason = format!("grpc-status {code}");
    if !name.is_empty() {
        reason.push_str(&format!(" ({name})"));
    }
    if let Some(message) = message
        .and_then(|m| m.to_str().ok())
        .filter(|m| !m.is_empty())
    {
        let message: String = message.chars().take(200).collect();
        reason.push_str(&format!(": {message}"));
    }
    Err(reason)
}

/// The framed `HealthCheckRequest`: gRPC's 5-byte prefix (uncompressed, big-endian length),
/// then field 1 (`service`, wire type 2) unless it is empty (proto3 leaves defaults out).
pub fn request_message(service: &str) -> Bytes {
    let mut message = Vec::with_capacity(service.len() + 6);
    if !service.is_empty() {
        message.push(0x0a); // field 1, length-delimited
        put_varint(&mut message, service.len() as u64);
        message.extend_from_slice(service.as_bytes());
    }
    let mut framed = Vec::with_capacity(5 + message.len());
    framed.push(0);
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(&message);
    Bytes::from(framed)
}

fn put_varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn varint(bytes: &mut &[u8]) -> Result<u64, String> {
    let mut n = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = bytes.split_first().ok_or("truncated HealthCheckResponse")?;
        *bytes = rest;
        n |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(n);
        }
    }
    Err("HealthCheckResponse varint too long".into())
}

/// The `status` (field 1) of a framed `HealthCheckResponse`; absent means 0, UNKNOWN (proto3).
/// Unknown fields are skipped, as protobuf readers must.
pub fn serving_status(framed: &[u8]) -> Result<u64, String> {
    let Some((header, rest)) = framed.split_at_checked(5) else {
        return Err("Health/Check answered no message".into());
    };
    if header[0] != 0 {
        return Err("Health/Check answered a compressed message (not supported)".into());
    }
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    let mut message = rest
        .get(..len)
        .ok_or("Health/Check answered a truncated message")?;
    let mut status = 0;
    while !message.is_empty() {
        let key = varint(&mut message)?;
        match (key >> 3, key & 7) {
            (1, 0) => status = varint(&mut message)?,
            (_, 0) => {
                varint(&mut message)?;
            }
            (_, wire) => {
                let skip = match wire {
                    1 => 8,
                    5 => 4,
                    2 => usize::try_from(varint(&mut message)?).unwrap_or(usize::MAX),
                    _ => return Err(format!("HealthCheckResponse: unknown wire type {wire}")),
                };
                message = message.get(skip..).ok_or("truncated HealthCheckResponse")?;
            }
        }
    }
    Ok(status)
}

fn status_name(status: u64) -> String {
    match status {
        0 => "UNKNOWN".into(),
        1 => "SERVING".into(),
        2 => "NOT_SERVING".into(),
        3 => "SERVICE_UNKNOWN".into(),
        n => format!("{n} (not a ServingStatus)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_encoding() {
        assert_eq!(request_message("").as_ref(), [0, 0, 0, 0, 0]);
        assert_eq!(
            request_message("foo").as_ref(),
            [0, 0, 0, 0, 5, 0x0a, 3, b'f', b'o', b'o']
        );
        // A length over 127 takes a two-byte varint.
        let long = "s".repeat(200);
        let framed = request_message(&long);
        assert_eq!(&framed[..8], &[0, 0, 0, 0, 203, 0x0a, 0xc8, 0x01]);
    }

    #[test]
    fn response_decoding() {
        let framed = |message: &[u8]| {
            let mut out = vec![0];
            out.extend_from_slice(&(message.len() as u32).to_be_bytes());
            out.extend_from_slice(message);
            out
        };
        for (message, want) in [
            (&[0x08, 0x01][..], Ok(1)),
            (&[0x08, 0x02][..], Ok(2)),
            (&[][..], Ok(0)),
            // An unknown length-delimited field before the status is skipped.
            (&[0x12, 0x02, b'h', b'i', 0x08, 0x01][..], Ok(1)),
            // An unknown fixed32 field after it.
            (&[0x08, 0x01, 0x1d, 1, 2, 3, 4][..], Ok(1)),
            (&[0x08][..], Err(())),
            (&[0x12, 0x05, b'h'][..], Err(())),
            (&[0x0b][..], Err(())),
        ] {
            assert_eq!(
                serving_status(&framed(message)).map_err(|_| ()),
                want,
                "{message:?}"
            );
        }
        assert!(serving_status(&[0, 0, 0]).is_err());
        assert!(serving_status(&[1, 0, 0, 0, 2, 0x08, 0x01]).is_err());
        assert!(serving_status(&[0, 0, 0, 0, 9, 0x08, 0x01]).is_err());
    }
}
