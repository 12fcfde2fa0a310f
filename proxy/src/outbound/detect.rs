//! What arrived on the outbound listener: where it was going, and whether it speaks HTTP.
//!
//! A connection redirected to the sidecar (by the eBPF redirect, or iptables) carries its
//! original destination, read with `SO_ORIGINAL_DST` — the eBPF `cgroup/getsockopt` program
//! answers that call the same way netfilter does, so this code serves both. A connection the app
//! made to the listener on purpose (explicit proxy) has none, and is HTTP by contract.
//!
//! Protocol detection peeks at the first bytes with a short timeout. Ports declared opaque skip it
//! entirely, and a client that sends nothing (server-speaks-first protocols such as MySQL or SMTP)
//! is treated as opaque TCP once the timeout passes — it never stalls for longer, and each such
//! timeout is counted so operators know to declare the port opaque.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;
use std::time::Duration;

use tokio::net::TcpStream;

/// `SO_ORIGINAL_DST` (linux/netfilter_ipv4.h) and `IP6T_SO_ORIGINAL_DST` share the value 80.
const SO_ORIGINAL_DST: libc::c_int = 80;

/// The destination the app originally connected to, if the connection was redirected.
pub fn original_dst(tcp: &TcpStream) -> Option<SocketAddr> {
    let fd = tcp.as_raw_fd();
    let local = tcp.local_addr().ok()?;
    // SAFETY: getsockopt writes at most `len` bytes into a zeroed sockaddr of the matching family,
    // and we read it only when the call succeeds and reports the expected length.
    unsafe {
        if local.is_ipv4() {
            let mut addr: libc::sockaddr_in = std::mem::zeroed();
            let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            let rc = libc::getsockopt(
                fd,
                libc::SOL_IP,
                SO_ORIGINAL_DST,
                (&mut addr as *mut libc::sockaddr_in).cast(),
                &mut len,
            );
            if rc != 0 || len as usize != std::mem::size_of::<libc::sockaddr_in>() {
                return None;
            }
            let dst = SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr)),
                u16::from_be(addr.sin_port),
            ));
            (dst != local).then_some(dst)
        } else {
            let mut addr: libc::sockaddr_in6 = std::mem::zeroed();
            let mut len = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
            let rc = libc::getsockopt(
                fd,
                libc::SOL_IPV6,
                SO_ORIGINAL_DST,
                (&mut addr as *mut libc::sockaddr_in6).cast(),
                &mut len,
            );
            if rc != 0 || len as usize != std::mem::size_of::<libc::sockaddr_in6>() {
                return None;
            }
            let dst = SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(addr.sin6_addr.s6_addr),
                u16::from_be(addr.sin6_port),
                0,
                0,
            ));
            (dst != local).then_some(dst)
        }
    }
}

/// The outcome of protocol detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detected {
    /// HTTP/1.x request line or the HTTP/2 connection preface.
    Http,
    /// Bytes that are not HTTP (TLS, a database protocol, …).
    Opaque,
    /// Nothing arrived in time: a server-speaks-first protocol, handled as opaque.
    Timeout,
    /// The client closed before sending anything.
    Closed,
}

impl Detected {
    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Opaque => "opaque",
            Self::Timeout => "timeout",
            Self::Closed => "closed",
        }
    }
}

const METHODS: [&[u8]; 9] = [
    b"GET ",
    b"HEAD ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"OPTIONS ",
    b"PATCH ",
    b"CONNECT ",
    b"TRACE ",
];
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0";

/// Classifies `bytes` if they already decide the question.
fn classify(bytes: &[u8]) -> Option<Detected> {
    let candidates = METHODS.iter().copied().chain(std::iter::once(H2_PREFACE));
    let mut undecided = false;
    for sig in candidates {
        let n = bytes.len().min(sig.len());
        if bytes[..n] == sig[..n] {
            if n == sig.len() {
                return Some(Detected::Http);
            }
            undecided = true;
        }
    }
    if undecided {
        None
    } else {
        Some(Detected::Opaque)
    }
}

/// Peeks (without consuming) until the first bytes say HTTP or not, or `timeout` passes.
pub async fn detect(tcp: &TcpStream, timeout: Duration) -> Detected {
    let mut buf = [0u8; 16];
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, tcp.peek(&mut buf)).await {
            Err(_) => return Detected::Timeout,
            Ok(Err(_)) | Ok(Ok(0)) => return Detected::Closed,
            Ok(Ok(n)) => {
                if let Some(found) = classify(&buf[..n]) {
                    return found;
                }
                // A prefix of a method: wait briefly for more bytes (peek returns at once otherwise).
                if tokio::time::Instant::now() >= deadline {
                    return Detected::Timeout;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    #[test]
    fn classification_table() {
        let cases: [(&[u8], Option<Detected>); 9] = [
            (b"GET / HTTP/1.1\r\n", Some(Detected::Http)),
            (b"POST /x", Some(Detected::Http)),
            (b"PRI * HTTP/2.0\r\n", Some(Detected::Http)),
            (b"\x16\x03\x01\x02\x00", Some(Detected::Opaque)),
            (b"\x00\x00\x00\x08\x04\xd2\x16\x2f", Some(Detected::Opaque)),
            (b"HELO mail\r\n", Some(Detected::Opaque)),
            (b"GE", None),
            (b"P", None),
            (b"get / HTTP/1.1", Some(Detected::Opaque)),
        ];
        for (bytes, want) in cases {
            assert_eq!(
                classify(bytes),
                want,
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
        }
    }

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (client, server)
    }

    #[tokio::test]
    async fn detection_on_real_sockets() {
        let timeout = Duration::from_millis(200);
        let (mut client, server) = pair().await;
        client.write_all(b"GET /orders HTTP/1.1\r\n").await.unwrap();
        assert_eq!(detect(&server, timeout).await, Detected::Http);

        // Split across writes: still recognized, and nothing was consumed.
        let (mut client, server) = pair().await;
        client.write_all(b"DEL").await.unwrap();
        let writer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            client.write_all(b"ETE /x HTTP/1.1\r\n").await.unwrap();
            client
        });
        assert_eq!(detect(&server, timeout).await, Detected::Http);
        let mut first = [0u8; 3];
        server.peek(&mut first).await.unwrap();
        assert_eq!(&first, b"DEL");
        drop(writer.await.unwrap());

        let (mut client, server) = pair().await;
        client.write_all(b"\x16\x03\x01").await.unwrap();
        assert_eq!(detect(&server, timeout).await, Detected::Opaque);

        // Server-speaks-first: the client sends nothing; detection gives up after the timeout.
        let (_client, server) = pair().await;
        let started = std::time::Instant::now();
        assert_eq!(detect(&server, timeout).await, Detected::Timeout);
        assert!(started.elapsed() < Duration::from_secs(1));

        let (client, server) = pair().await;
        drop(client);
        assert_eq!(detect(&server, timeout).await, Detected::Closed);
    }

    #[tokio::test]
    async fn a_direct_connection_has_no_original_destination() {
        let (_client, server) = pair().await;
        // Only accepted sockets are asked. (With conntrack loaded — e.g. once dockerd runs —
        // netfilter answers for any tracked socket: for the accepted end that is its own local
        // address, which `original_dst` treats as "not redirected"; for a client it would be its
        // peer, which is why the client side is never asked.)
        assert_eq!(original_dst(&server), None);
    }
}
