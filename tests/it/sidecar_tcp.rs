//! Opaque TCP through the mesh: a server-speaks-first protocol over an mTLS L4 tunnel, authorized
//! by identity and port, refused for other identities and unexposed ports, and cut when a policy
//! change revokes it.

use std::time::Duration;

use crate::support::free_port;
use crate::support::mesh::TestMesh;
use meshgate_proxy::outbound::tcp::TcpForward;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// A server-speaks-first app (like SMTP or MySQL): greets, then echoes lines.
async fn banner_server() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let (mut tcp, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                tcp.write_all(b"220 orders-db ready\r\n").await.unwrap();
                let (r, mut w) = tcp.split();
                let _ = tokio::io::copy(&mut BufReader::new(r), &mut w).await;
            });
        }
    });
    port
}

fn allow_web_on(port: u16) -> String {
    format!(
        r#"apiVersion: meshgate.dev/v1
kind: AuthorizationPolicy
metadata: {{ name: orders-db, namespace: shop }}
spec:
  selector: {{ account: orders }}
  action: ALLOW
  rules:
    - from: [{{ principals: ["spiffe://mesh.local/ns/shop/sa/web"] }}]
      to: [{{ ports: [{port}] }}]
"#
    )
}

/// A local forward from `local` to port `port` of the `orders` Service, through the mesh.
fn to_orders(local: u16, port: u16) -> TcpForward {
    format!("127.0.0.1:{local}=orders:{port}").parse().unwrap()
}

/// Connects to a local forward and returns the first line the far side sends, if any.
async fn greet(port: u16) -> (TcpStream, Option<String>) {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let mut reader = BufReader::new(tcp);
    let mut line = String::new();
    let got = tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut line)).await;
    let greeting = matches!(got, Ok(Ok(n)) if n > 0).then_some(line);
    (reader.into_inner(), greeting)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_tunnel_authorized_by_identity_and_port_and_revoked_live() {
    let db = banner_server().await;
    let mut mesh = TestMesh::new().await;
    mesh.add_with("orders", &[], &[db]).await;
    let web_forward = free_port();
    let web_to_admin = free_port();
    let orders_admin = mesh.workload("orders").sidecar.admin_addr.port();
    mesh.add_with(
        "web",
        &[
            to_orders(web_forward, db),
            to_orders(web_to_admin, orders_admin),
        ],
        &[],
    )
    .await;
    let intruder_forward = free_port();
    mesh.add_with("intruder", &[to_orders(intruder_forward, db)], &[])
        .await;
    mesh.write_services();
    mesh.write_policy("db.yaml", &allow_web_on(db));
    mesh.converge().await;

    // Allowed: the server speaks first and the greeting arrives without the client sending a byte.
    let (mut conn, greeting) = greet(web_forward).await;
    assert_eq!(greeting.as_deref(), Some("220 orders-db ready\r\n"));
    conn.write_all(b"hello\n").await.unwrap();
    let mut echoed = [0u8; 6];
    conn.read_exact(&mut echoed).await.unwrap();
    assert_eq!(&echoed, b"hello\n");

    // Another identity, same port: no greeting, the connection is closed.
    let (_, greeting) = greet(intruder_forward).await;
    assert_eq!(greeting, None, "intruder must not reach the database");
    // A port the orders sidecar does not expose (its own admin port): refused before policy.
    let (_, greeting) = greet(web_to_admin).await;
    assert_eq!(greeting, None, "tunnels reach only declared app ports");

    // Revoke: the open connection is closed when the new policy no longer allows it.
    mesh.write_policy("db.yaml", &allow_web_on(db.wrapping_add(1).max(1)));
    mesh.converge().await;
    let mut buf = [0u8; 16];
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = conn.write_all(b"still there?\n").await;
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the revoked tunnel must be closed");

    let orders = |decision: &'static str| {
        let frag = format!(r#"decision="{decision}""#);
        let mesh = &mesh;
        async move {
            mesh.metric(
                "orders",
                "meshgate_tcp_connections_total",
                &[r#"direction="inbound""#, &frag],
            )
            .await
        }
    };
    assert_eq!(orders("allow").await, 1.0);
    assert!(
        orders("deny").await >= 2.0,
        "intruder and unexposed port are counted"
    );
    assert_eq!(orders("revoked").await, 1.0);
}

/// The outbound side verifies a peer sidecar's chain once and answers its later handshakes
/// from one cache for every connection (here: one L4 tunnel per app connection), counted as
/// `meshgate_tls_chain_verifications_total{direction="outbound"}`; each handshake still
/// checks the SPIFFE ID its Service expects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_handshakes_answer_a_verified_peer_chain_from_the_cache_and_count_it() {
    let db = banner_server().await;
    let mut mesh = TestMesh::new().await;
    mesh.add_with("orders", &[], &[db]).await;
    let web_forward = free_port();
    mesh.add_with("web", &[to_orders(web_forward, db)], &[])
        .await;
    mesh.write_services();
    mesh.write_policy("db.yaml", &allow_web_on(db));
    mesh.converge().await;

    let chains = |result: &'static str| {
        let mesh = &mesh;
        async move {
            mesh.metric(
                "web",
                "meshgate_tls_chain_verifications_total",
                &[r#"direction="outbound""#, &format!(r#"result="{result}""#)],
            )
            .await
        }
    };
    let (verified_before, cached_before) = (chains("verified").await, chains("cached").await);
    for _ in 0..3 {
        let (_conn, greeting) = greet(web_forward).await;
        assert_eq!(greeting.as_deref(), Some("220 orders-db ready\r\n"));
    }
    assert_eq!(
        chains("verified").await - verified_before + chains("cached").await - cached_before,
        3.0,
        "every tunnel's handshake is counted once"
    );
    assert!(
        chains("verified").await <= 1.0,
        "the orders sidecar's chain is verified in full once, then answered from the cache"
    );
    assert!(chains("cached").await >= 2.0);
}
