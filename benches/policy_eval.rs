//! Cost of one authorization decision as the policy set grows: it must stay flat, because the
//! snapshot indexes rules by exact principal and checks only the peer's own rules plus the
//! (few) wildcard and caller-agnostic ones.
//!
//! Sets of 100, 10 000 and 100 000 ALLOW rules (one distinct exact principal each, plus a few
//! wildcard rules that do not match the peers below), compiled for one workload; measured for a
//! peer that matches one rule and for a peer that matches none.

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use meshgate_ca::SpiffeId;
use meshgate_policy::model::{
    Action, AuthorizationPolicy, AuthorizationPolicySpec, Metadata, Mode, Operation, Rule, Source,
};
use meshgate_policy::{AuthzRequest, PolicySet, PolicySnapshot};

const WORKLOAD: &str = "spiffe://mesh.local/ns/shop/sa/orders";
/// Rules per policy: a realistic mix of policy count and rule count.
const RULES_PER_POLICY: usize = 100;

fn caller(i: usize) -> String {
    format!("spiffe://mesh.local/ns/clients/sa/caller-{i}")
}

fn rule(principal: String) -> Rule {
    Rule {
        from: vec![Source {
            principals: vec![principal],
            ..Source::default()
        }],
        to: vec![Operation {
            methods: vec!["GET".into(), "POST".into()],
            paths: vec!["/orders".into(), "/orders/*".into()],
            ..Operation::default()
        }],
        when: Vec::new(),
    }
}

fn policy_set(rules: usize) -> PolicySet {
    let mut set = PolicySet::default();
    let mut all: Vec<Rule> = (0..rules).map(|i| rule(caller(i))).collect();
    // A few wildcard rules, checked for every peer, that the peers below do not match.
    for pattern in [
        "spiffe://mesh.local/ns/ops/*",
        "*/sa/prometheus",
        "spiffe://other.td/*",
    ] {
        all.push(rule(pattern.to_string()));
    }
    for (n, chunk) in all.chunks(RULES_PER_POLICY).enumerate() {
        set.policies.push(AuthorizationPolicy {
            metadata: Metadata {
                name: format!("allow-{n:05}"),
                namespace: "shop".into(),
            },
            spec: AuthorizationPolicySpec {
                selector: None,
                action: Action::Allow,
                mode: Mode::Enforce,
                rules: chunk.to_vec(),
            },
        });
    }
    set.update_version();
    set
}

fn bench(c: &mut Criterion) {
    let workload = SpiffeId::parse(WORKLOAD).unwrap();
    let mut group = c.benchmark_group("evaluate");
    for size in [100usize, 10_000, 100_000] {
        let snapshot = PolicySnapshot::compile(&policy_set(size), &workload);
        let matching = SpiffeId::parse(&caller(size / 2)).unwrap();
        let stranger = SpiffeId::parse("spiffe://mesh.local/ns/clients/sa/stranger").unwrap();
        for (label, peer) in [("match", &matching), ("no-match", &stranger)] {
            let req = AuthzRequest {
                peer,
                method: Some("GET"),
                path: Some("/orders/42"),
                port: 8080,
                headers: None,
            };
            assert_eq!(snapshot.evaluate(&req).allowed, label == "match");
            group.bench_with_input(BenchmarkId::new(label, size), &req, |b, req| {
                b.iter(|| snapshot.evaluate(std::hint::black_box(req)))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
