//! The benches' profile reader (`benches/peers/flame_components.py`, behind `pair.sh
//! --flamegraph`): where it charges a sample decides the "where each proxy's CPU goes" tables in
//! BENCHMARKS.md, so each rule is checked on a sample of the shape `perf script` prints for it.
//! The samples are written out here (perf needs a profiled process and a perf-capable host, which
//! CI is not asked to be); their shapes are copied from real `perf script -F
//! comm,tid,period,ip,sym,dso,srcline --full-source-path` output of meshgate and HAProxy.

use std::io::Write as _;
use std::process::{Command, Stdio};

use crate::support::repo;

const RUSTC: &str = "/rustc/59807616e1fa2540724bfbac14d7976d7e4a3860/library";
const REGISTRY: &str = "/home/dev/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f";
const WORKSPACE: &str = "/src/meshgate";

/// One sample: its period (a distinct power of two, so that every component's total says which
/// samples it got) and its frames, innermost first, as perf prints them.
struct Sample {
    comm: &'static str,
    period: u64,
    frames: Vec<String>,
}

fn frame(symbol: &str, dso: Option<&str>, src: &str) -> String {
    match dso {
        Some(dso) => format!("\t          4f4985 {symbol} ({dso})\n  {src}"),
        None => format!("\t          4f4985 {symbol}\n  {src} (inlined)"),
    }
}

fn samples() -> Vec<(Sample, &'static str)> {
    let bin = Some("/opt/meshgate");
    let haproxy = Some("/usr/sbin/haproxy");
    let cgu = "meshgate.5f6669ac9e81e9cc-cgu.0:0";
    vec![
        (
            Sample {
                comm: "meshgate",
                period: 1,
                frames: vec![
                    frame(
                        "tcp_sendmsg",
                        Some("[kernel.kallsyms]"),
                        "[kernel.kallsyms][ffffffff81000001]",
                    ),
                    frame(
                        "meshgate_proxy::h1_pool::Http1Pool::connect",
                        bin,
                        &format!("{WORKSPACE}/proxy/src/h1_pool.rs:10"),
                    ),
                ],
            },
            "kernel",
        ),
        (
            Sample {
                comm: "meshgate",
                period: 2,
                frames: vec![
                    frame(
                        "__memcpy_avx512_unaligned_erms",
                        None,
                        "./string/../sysdeps/x86_64/multiarch/memmove-vec-unaligned-erms.S:274",
                    ),
                    frame(
                        "rustls::record_layer::RecordLayer::encrypt_outgoing",
                        bin,
                        &format!("{REGISTRY}/rustls-0.23.35/src/record_layer.rs:5"),
                    ),
                ],
            },
            "memcpy",
        ),
        (
            // Rust's standard library inlined into h2: charged to h2, the caller that
            // instantiated it.
            Sample {
                comm: "meshgate",
                period: 4,
                frames: vec![
                    frame(
                        "h2::hpack::encoder::Encoder::encode",
                        bin,
                        &format!("{RUSTC}/core/src/option.rs:1164"),
                    ),
                    frame("map<u8>", None, &format!("{RUSTC}/core/src/option.rs:1160")),
                    frame(
                        "encode_header",
                        None,
                        &format!("{WORKSPACE}/third_party/h2/src/hpack/encoder.rs:200"),
                    ),
                    frame(
                        "encode",
                        None,
                        &format!("{WORKSPACE}/third_party/h2/src/hpack/encoder.rs:120"),
                    ),
                ],
            },
            "HTTP/2",
        ),
        (
            Sample {
                comm: "meshgate",
                period: 8,
                frames: vec![frame(
                    "meshgate_policy::authz::PolicySnapshot::evaluate",
                    bin,
                    &format!("{WORKSPACE}/policy/src/authz.rs:77"),
                )],
            },
            "meshgate's own code",
        ),
        (
            // The shipped binary has no line tables: the crate its symbol names.
            Sample {
                comm: "meshgate",
                period: 16,
                frames: vec![frame(
                    "<hyper::proto::h1::role::Server as hyper::proto::h1::Http1Transaction>::parse",
                    bin,
                    cgu,
                )],
            },
            "HTTP/1.1",
        ),
        (
            Sample {
                comm: "meshgate",
                period: 32,
                frames: vec![
                    frame(
                        "<core::pin::Pin<P> as core::future::future::Future>::poll",
                        bin,
                        cgu,
                    ),
                    frame("tokio::runtime::task::raw::poll", bin, cgu),
                ],
            },
            "runtime",
        ),
        (
            Sample {
                comm: "haproxy",
                period: 64,
                frames: vec![frame("[unknown]", haproxy, "??:0")],
            },
            "haproxy, unnamed",
        ),
        (
            Sample {
                comm: "haproxy",
                period: 128,
                frames: vec![
                    frame(
                        "[unknown]",
                        Some("/usr/lib/x86_64-linux-gnu/libcrypto.so.3"),
                        "??:0",
                    ),
                    frame("h2_process_mux", haproxy, "??:0"),
                ],
            },
            "TLS",
        ),
        (
            Sample {
                comm: "haproxy",
                period: 256,
                frames: vec![frame("h1_headers_to_hdr_list", haproxy, "??:0")],
            },
            "HTTP/1.1",
        ),
        (
            Sample {
                comm: "meshgate",
                period: 512,
                frames: vec![frame("_mi_theap_malloc_zero", bin, "static.c:10")],
            },
            "allocator",
        ),
    ]
}

/// Each sample is charged to the component whose code it was running, and the folded stacks
/// give the inlined frames their crate, root first.
#[test]
fn flame_components_charges_each_sample_to_the_code_it_ran() {
    let tmp = tempfile::tempdir().unwrap();
    let samples = samples();
    let mut script = String::new();
    for (sample, _) in &samples {
        script += &format!("{} 4242    {} \n", sample.comm, sample.period);
        for f in &sample.frames {
            script += f;
            script.push('\n');
        }
        script += "\tffffffffffffffff [unknown] ([unknown])\n\n";
    }
    let tool = repo().join("benches/peers/flame_components.py");
    let (folded, json) = (tmp.path().join("p.folded"), tmp.path().join("p.json"));
    let mut child = Command::new("python3")
        .arg(&tool)
        .arg("fold")
        .args([&folded, &json])
        .stdin(Stdio::piped())
        .spawn()
        .expect("python3 runs benches/peers/flame_components.py");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "fold failed on:\n{script}");

    let totals: std::collections::BTreeMap<String, u64> =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let mut expected: std::collections::BTreeMap<&str, u64> = Default::default();
    for (sample, component) in &samples {
        *expected.entry(component).or_default() += sample.period;
    }
    for (component, want) in &expected {
        let got: u64 = totals
            .iter()
            .filter(|(name, _)| name.starts_with(component))
            .map(|(_, n)| n)
            .sum();
        assert_eq!(
            got, *want,
            "{component}: the periods charged to it say which samples went there; all: {totals:?}"
        );
    }
    assert_eq!(
        totals.values().sum::<u64>(),
        1023,
        "every sample charged once"
    );

    // Root first; an inlined function is a frame of its own named by its crate, and the
    // function itself is not repeated under its own name.
    let folded = std::fs::read_to_string(&folded).unwrap();
    assert!(
        folded.contains(
            "meshgate;h2::hpack::encoder::Encoder::encode;h2::encode_header_[i];std::map<…>_[i] 4\n"
        ),
        "{folded}"
    );
    assert!(
        folded.contains("meshgate;meshgate_proxy::h1_pool::Http1Pool::connect;tcp_sendmsg_[k] 1\n"),
        "{folded}"
    );

    // The table: one row per component, in µs per request when the proxy's CPU is given.
    let out = Command::new("python3")
        .arg(&tool)
        .args(["table", "--us-per-request", "p=10.23"])
        .arg(format!("p={}", json.display()))
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{table}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The allocator's 512 of 1023: 50.0 %, 5.1 µs of 10.23.
    assert!(
        table.contains(
            "| allocator (mimalloc; glibc malloc and HAProxy's pools) | 50.0 % (5.1 µs) |"
        ),
        "{table}"
    );
}
