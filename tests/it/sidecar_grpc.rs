//! gRPC through two sidecars with a real gRPC client (tonic): unary and server streaming, with
//! status trailers carried end to end over h2c → mTLS HTTP/2 → h2c.

use crate::support::mesh::TestMesh;
use bytes::{Buf, BufMut, Bytes};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::{Code, Status};

/// Opaque-bytes codec: the test needs a real gRPC client, not generated stubs.
#[derive(Default, Clone)]
struct RawCodec;

struct RawEncoder;
struct RawDecoder;

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Bytes;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

const POLICY: &str = r#"
apiVersion: meshgate.dev/v1
kind: AuthorizationPolicy
metadata: { name: grpc-echo, namespace: shop }
spec:
  selector: { account: orders }
  action: ALLOW
  rules:
    - from: [{ principals: ["spiffe://mesh.local/ns/shop/sa/web"] }]
      to: [{ methods: ["POST"], paths: ["/test.Echo/Unary", "/test.Echo/Stream"] }]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unary_and_streaming_through_the_mesh() {
    let mut mesh = TestMesh::new().await;
    mesh.write_policy("grpc.yaml", POLICY);
    mesh.add("web").await;
    mesh.add("orders").await;
    mesh.write_services();
    mesh.converge().await;

    // The app talks h2c to its own sidecar's outbound port; the authority names the Service.
    let outbound = mesh.workload("web").sidecar.outbound_addr;
    let channel = tonic::transport::Endpoint::from_static("http://orders:8080")
        .connect_with_connector(tower::service_fn(move |_| async move {
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                tokio::net::TcpStream::connect(outbound).await?,
            ))
        }))
        .await
        .unwrap();
    let mut client = tonic::client::Grpc::new(channel);

    client.ready().await.unwrap();
    let reply = client
        .unary(
            tonic::Request::new(Bytes::from_static(b"hello")),
            "/test.Echo/Unary".parse().unwrap(),
            RawCodec,
        )
        .await
        .expect("unary call succeeds");
    let expected = format!("hello from {}", TestMesh::id_of("web"));
    assert_eq!(reply.into_inner(), Bytes::from(expected));

    client.ready().await.unwrap();
    let mut stream = client
        .server_streaming(
            tonic::Request::new(Bytes::from_static(b"tick")),
            "/test.Echo/Stream".parse().unwrap(),
            RawCodec,
        )
        .await
        .expect("streaming call starts")
        .into_inner();
    let mut got = Vec::new();
    while let Some(msg) = stream.message().await.expect("stream message") {
        got.push(String::from_utf8(msg.to_vec()).unwrap());
    }
    assert_eq!(got, ["0:tick", "1:tick", "2:tick"]);

    // A method the policy does not allow: the sidecar's 403 surfaces as a gRPC error.
    client.ready().await.unwrap();
    let denied = client
        .unary(
            tonic::Request::new(Bytes::from_static(b"x")),
            "/test.Echo/Admin".parse().unwrap(),
            RawCodec,
        )
        .await
        .expect_err("denied");
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
}
