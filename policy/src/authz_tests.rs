//! Evaluator tests: matchers, scope, decision order, AUDIT, dry-run, L4, index determinism.

use http::{HeaderMap, HeaderValue};
use meshgate_spiffe::SpiffeId;

use crate::authz::{AuthzRequest, DRY_RUN_NO_ALLOW, DecisionKind, PolicySnapshot};
use crate::load::{PolicySet, load_dir};
use crate::matcher::{PathCase, RuleMatcher};
use crate::model::{AuthorizationPolicy, Rule};
use crate::scope::applies_to;

const WEB: &str = "spiffe://mesh.local/ns/shop/sa/web";
const ORDERS: &str = "spiffe://mesh.local/ns/shop/sa/orders";

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

/// A validated set from YAML documents (through the real loader).
fn set_from(yaml: &str) -> PolicySet {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("p.yaml"), yaml).unwrap();
    load_dir(dir.path()).unwrap_or_else(|e| panic!("{e}\n{yaml}"))
}

/// `kind: AuthorizationPolicy` in namespace shop, with `spec` given as flow YAML lines.
fn pol(name: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: meshgate.dev/v1\nkind: AuthorizationPolicy\nmetadata: {{ name: {name}, namespace: shop }}\nspec:\n{spec}\n"
    )
}

fn mesh_allow() -> &'static str {
    "---\napiVersion: meshgate.dev/v1\nkind: MeshConfig\nmetadata: { name: default, namespace: meshgate }\nspec: { defaultAction: ALLOW }\n"
}

/// A request description for tables.
#[derive(Clone, Copy)]
struct Req {
    peer: &'static str,
    method: Option<&'static str>,
    path: Option<&'static str>,
    port: u16,
    headers: &'static [(&'static str, &'static str)],
}

const fn http(peer: &'static str, method: &'static str, path: &'static str) -> Req {
    Req {
        peer,
        method: Some(method),
        path: Some(path),
        port: 8080,
        headers: &[],
    }
}

const fn tcp(peer: &'static str, port: u16) -> Req {
    Req {
        peer,
        method: None,
        path: None,
        port,
        headers: &[],
    }
}

impl Req {
    const fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }
    const fn headers(mut self, h: &'static [(&'static str, &'static str)]) -> Self {
        self.headers = h;
        self
    }
    fn run<T>(&self, f: impl FnOnce(&AuthzRequest<'_>) -> T) -> T {
        let peer = id(self.peer);
        let mut map = HeaderMap::new();
        for (k, v) in self.headers {
            map.append(
                http::HeaderName::from_static(k),
                HeaderValue::from_static(v),
            );
        }
        let is_l7 = self.method.is_some();
        f(&AuthzRequest {
            peer: &peer,
            method: self.method,
            path: self.path,
            port: self.port,
            headers: is_l7.then_some(&map),
        })
    }
}

#[test]
fn rule_matcher_table() {
    let cases: &[(&str, Req, bool)] = &[
        ("{}", http(WEB, "GET", "/x"), true),
        ("{}", tcp(WEB, 5432), true),
        // principals
        (
            "{from: [{principals: [\"spiffe://mesh.local/ns/shop/sa/web\"]}]}",
            http(WEB, "GET", "/"),
            true,
        ),
        (
            "{from: [{principals: [\"spiffe://mesh.local/ns/shop/sa/web\"]}]}",
            http(ORDERS, "GET", "/"),
            false,
        ),
        (
            "{from: [{principals: [\"*\"]}]}",
            http(ORDERS, "GET", "/"),
            true,
        ),
        (
            "{from: [{principals: [\"spiffe://mesh.local/ns/shop/*\"]}]}",
            http(ORDERS, "GET", "/"),
            true,
        ),
        (
            "{from: [{principals: [\"spiffe://mesh.local/ns/other/*\"]}]}",
            http(ORDERS, "GET", "/"),
            false,
        ),
        (
            "{from: [{principals: [\"*/sa/web\"]}]}",
            http(WEB, "GET", "/"),
            true,
        ),
        (
            "{from: [{principals: [\"*/sa/web\"]}]}",
            http(ORDERS, "GET", "/"),
            false,
        ),
        (
            "{from: [{notPrincipals: [\"*/sa/web\"]}]}",
            http(WEB, "GET", "/"),
            false,
        ),
        (
            "{from: [{notPrincipals: [\"*/sa/web\"]}]}",
            http(ORDERS, "GET", "/"),
            true,
        ),
        (
            "{from: [{principals: [\"spiffe://mesh.local/*\"], notPrincipals: [\"*/sa/web\"]}]}",
            http(WEB, "GET", "/"),
            false,
        ),
        (
            "{from: [{principals: [\"*/sa/web\"]}, {principals: [\"*/sa/orders\"]}]}",
            http(ORDERS, "GET", "/"),
            true,
        ),
        // methods
        (
            "{to: [{methods: [GET, HEAD]}]}",
            http(WEB, "HEAD", "/"),
            true,
        ),
        ("{to: [{methods: [GET]}]}", http(WEB, "get", "/"), false),
        (
            "{to: [{notMethods: [DELETE]}]}",
            http(WEB, "GET", "/"),
            true,
        ),
        (
            "{to: [{notMethods: [DELETE]}]}",
            http(WEB, "DELETE", "/"),
            false,
        ),
        // paths
        ("{to: [{paths: [\"/a\"]}]}", http(WEB, "GET", "/a"), true),
        ("{to: [{paths: [\"/a\"]}]}", http(WEB, "GET", "/a/"), false),
        ("{to: [{paths: [\"/a/*\"]}]}", http(WEB, "GET", "/a/"), true),
        (
            "{to: [{paths: [\"/a/*\"]}]}",
            http(WEB, "GET", "/a/b/c"),
            true,
        ),
        ("{to: [{paths: [\"/a/*\"]}]}", http(WEB, "GET", "/a"), false),
        (
            "{to: [{paths: [\"/a/*\"]}]}",
            http(WEB, "GET", "/A/b"),
            false,
        ),
        (
            "{to: [{paths: [\"*.json\"]}]}",
            http(WEB, "GET", "/x/y.json"),
            true,
        ),
        (
            "{to: [{paths: [\"*\"]}]}",
            http(WEB, "GET", "/anything"),
            true,
        ),
        (
            "{to: [{paths: [\"/a/*\"], notPaths: [\"/a/secret\"]}]}",
            http(WEB, "GET", "/a/secret"),
            false,
        ),
        (
            "{to: [{paths: [\"/a/*\"], notPaths: [\"/a/secret\"]}]}",
            http(WEB, "GET", "/a/public"),
            true,
        ),
        // ports
        (
            "{to: [{ports: [8080, 8443]}]}",
            http(WEB, "GET", "/").port(8443),
            true,
        ),
        (
            "{to: [{ports: [8080]}]}",
            http(WEB, "GET", "/").port(9090),
            false,
        ),
        (
            "{to: [{notPorts: [9090]}]}",
            http(WEB, "GET", "/").port(9090),
            false,
        ),
        ("{to: [{notPorts: [9090]}]}", http(WEB, "GET", "/"), true),
        // operations: any-of; fields inside: all-of
        (
            "{to: [{methods: [GET], paths: [\"/a\"]}]}",
            http(WEB, "GET", "/b"),
            false,
        ),
        (
            "{to: [{methods: [POST]}, {paths: [\"/b\"]}]}",
            http(WEB, "GET", "/b"),
            true,
        ),
        // headers
        (
            "{when: [{header: x-tenant, values: [a, \"b*\"]}]}",
            http(WEB, "GET", "/").headers(&[("x-tenant", "bee")]),
            true,
        ),
        (
            "{when: [{header: X-Tenant, values: [a]}]}",
            http(WEB, "GET", "/").headers(&[("x-tenant", "a")]),
            true,
        ),
        (
            "{when: [{header: x-tenant, values: [a]}]}",
            http(WEB, "GET", "/").headers(&[("x-tenant", "c")]),
            false,
        ),
        (
            "{when: [{header: x-tenant, values: [a]}]}",
            http(WEB, "GET", "/"),
            false,
        ),
        (
            "{when: [{header: x-tenant, values: [a]}]}",
            http(WEB, "GET", "/").headers(&[("x-tenant", "c"), ("x-tenant", "a")]),
            true,
        ),
        (
            "{when: [{header: x-tenant, notValues: [evil]}]}",
            http(WEB, "GET", "/").headers(&[("x-tenant", "a"), ("x-tenant", "evil")]),
            false,
        ),
        (
            "{when: [{header: x-tenant, notValues: [evil]}]}",
            http(WEB, "GET", "/").headers(&[("x-tenant", "a")]),
            true,
        ),
        (
            "{when: [{header: x-tenant, notValues: [evil]}]}",
            http(WEB, "GET", "/"),
            false,
        ),
        (
            "{when: [{header: x-a, values: [\"*\"]}, {header: x-b, values: [\"*\"]}]}",
            http(WEB, "GET", "/").headers(&[("x-a", "1")]),
            false,
        ),
        // L4 requests never satisfy L7 conditions; ports still apply
        ("{to: [{methods: [GET]}]}", tcp(WEB, 8080), false),
        ("{to: [{notMethods: [GET]}]}", tcp(WEB, 8080), false),
        ("{to: [{paths: [\"*\"]}]}", tcp(WEB, 8080), false),
        ("{to: [{notPaths: [\"/x\"]}]}", tcp(WEB, 8080), false),
        (
            "{when: [{header: x-a, notValues: [b]}]}",
            tcp(WEB, 8080),
            false,
        ),
        ("{to: [{ports: [5432]}]}", tcp(WEB, 5432), true),
        (
            "{from: [{principals: [\"*/sa/web\"]}], to: [{ports: [5432]}]}",
            tcp(WEB, 5432),
            true,
        ),
        (
            "{to: [{methods: [GET]}, {ports: [5432]}]}",
            tcp(WEB, 5432),
            true,
        ),
    ];
    for (rule, req, want) in cases {
        let rule: Rule = serde_saphyr::from_str(rule).unwrap_or_else(|e| panic!("{rule}: {e}"));
        let m = RuleMatcher::compile(&rule, PathCase::Sensitive).unwrap();
        let got = req.run(|r| m.matches(r));
        assert_eq!(
            got, *want,
            "rule {rule:?} peer {} {:?} {:?}",
            req.peer, req.method, req.path
        );
    }
}

#[test]
fn deny_paths_match_case_insensitively() {
    let rule: Rule =
        serde_saphyr::from_str("{to: [{paths: [\"/admin/*\"], notPaths: [\"/admin/ok\"]}]}")
            .unwrap();
    let deny = RuleMatcher::compile(&rule, PathCase::Insensitive).unwrap();
    let allow = RuleMatcher::compile(&rule, PathCase::Sensitive).unwrap();
    let cases = [
        ("/ADMIN/x", true, false),
        ("/Admin/OK", false, false),
        ("/admin/x", true, true),
    ];
    for (path, deny_hit, allow_hit) in cases {
        let req = Req {
            path: Some(path),
            ..http(WEB, "GET", "/")
        };
        assert_eq!(req.run(|r| deny.matches(r)), deny_hit, "deny {path}");
        assert_eq!(req.run(|r| allow.matches(r)), allow_hit, "allow {path}");
    }
}

/// At L4 a DENY rule drops its HTTP-only fields (it refuses more), an ALLOW rule keeps them (it
/// matches nothing it did not name): a DENY on `/admin/*` must not fail open for a TCP tunnel.
#[test]
fn l4_requests_deny_rules_drop_http_fields_allow_rules_never_match_them() {
    // (rule, request, DENY-compiled matches, ALLOW-compiled matches)
    let cases: &[(&str, Req, bool, bool)] = &[
        (
            "{to: [{paths: [\"/admin/*\"]}]}",
            tcp(WEB, 8080),
            true,
            false,
        ),
        (
            "{to: [{notPaths: [\"/public/*\"]}]}",
            tcp(WEB, 8080),
            true,
            false,
        ),
        ("{to: [{methods: [DELETE]}]}", tcp(WEB, 8080), true, false),
        ("{to: [{notMethods: [GET]}]}", tcp(WEB, 8080), true, false),
        (
            "{when: [{header: x-tenant, values: [evil]}]}",
            tcp(WEB, 8080),
            true,
            false,
        ),
        // identity and port fields still apply
        (
            "{from: [{principals: [\"*/sa/orders\"]}], to: [{paths: [\"/admin/*\"]}]}",
            tcp(WEB, 8080),
            false,
            false,
        ),
        (
            "{to: [{paths: [\"/admin/*\"], ports: [9090]}]}",
            tcp(WEB, 8080),
            false,
            false,
        ),
        (
            "{to: [{paths: [\"/admin/*\"], ports: [8080]}]}",
            tcp(WEB, 8080),
            true,
            false,
        ),
        // HTTP requests are unaffected
        (
            "{to: [{paths: [\"/admin/*\"]}]}",
            http(WEB, "GET", "/public/x"),
            false,
            false,
        ),
        (
            "{to: [{paths: [\"/admin/*\"]}]}",
            http(WEB, "GET", "/admin/x"),
            true,
            true,
        ),
    ];
    for (rule, req, deny_want, allow_want) in cases {
        let parsed: Rule = serde_saphyr::from_str(rule).unwrap_or_else(|e| panic!("{rule}: {e}"));
        let deny = RuleMatcher::compile(&parsed, PathCase::Insensitive).unwrap();
        let allow = RuleMatcher::compile(&parsed, PathCase::Sensitive).unwrap();
        assert_eq!(req.run(|r| deny.matches(r)), *deny_want, "DENY {rule}");
        assert_eq!(req.run(|r| allow.matches(r)), *allow_want, "ALLOW {rule}");
    }
}

/// The reported bypass: an identity-only ALLOW plus a DENY on `/admin/*` must deny an L4 tunnel
/// from the allowed identity (it could otherwise send `GET /admin/...` through it).
#[test]
fn identity_only_allow_plus_path_deny_refuses_l4() {
    let set = set_from(&format!(
        "{}{}",
        pol(
            "allow-web",
            "  action: ALLOW\n  rules: [{from: [{principals: [\"*/sa/web\"]}]}]"
        ),
        pol(
            "no-admin",
            "  action: DENY\n  rules: [{to: [{paths: [\"/admin/*\"]}]}]"
        ),
    ));
    let snapshot = PolicySnapshot::compile(&set, &id(ORDERS));
    let l4 = tcp(WEB, 8080).run(|r| snapshot.evaluate(r));
    assert!(!l4.allowed, "{l4:?}");
    assert_eq!(l4.policy.as_deref(), Some("shop/no-admin"));
    let public = http(WEB, "GET", "/public/x").run(|r| snapshot.evaluate(r));
    assert!(public.allowed, "{public:?}");
}

#[test]
fn scope_table() {
    // (namespace, selector account, workload, applies)
    let cases = [
        ("shop", None, WEB, true),
        ("shop", Some("web"), WEB, true),
        ("shop", Some("orders"), WEB, false),
        ("other", None, WEB, false),
        ("other", Some("web"), WEB, false),
        ("meshgate", None, WEB, true),
        ("meshgate", Some("web"), WEB, true),
        (
            "meshgate",
            Some("web"),
            "spiffe://mesh.local/ns/other/sa/web",
            true,
        ),
        ("meshgate", Some("orders"), WEB, false),
        ("meshgate", None, "spiffe://mesh.local/legacy/vm-1", true),
        (
            "meshgate",
            Some("web"),
            "spiffe://mesh.local/legacy/vm-1",
            false,
        ),
        ("shop", None, "spiffe://mesh.local/legacy/vm-1", false),
    ];
    for (ns, account, workload, want) in cases {
        let selector = account
            .map(|a| format!("{{ account: {a} }}"))
            .unwrap_or("null".into());
        let yaml = format!(
            "apiVersion: meshgate.dev/v1\nkind: AuthorizationPolicy\nmetadata: {{ name: p, namespace: {ns} }}\nspec: {{ action: ALLOW, selector: {selector} }}\n"
        );
        let p: AuthorizationPolicy = serde_saphyr::from_str(&yaml).unwrap();
        assert_eq!(
            applies_to(&p, &id(workload)),
            want,
            "{ns} {account:?} {workload}"
        );
    }
}

/// Expected decision: (kind, allowed, policy, rule, audit policy, dry-run policy).
type Want<'a> = (
    DecisionKind,
    bool,
    Option<&'a str>,
    Option<usize>,
    Option<&'a str>,
    Option<&'a str>,
);

#[test]
fn decision_table() {
    use DecisionKind::*;
    let allow_web = pol(
        "allow-web",
        "  action: ALLOW\n  rules: [{from: [{principals: [\"*/sa/web\"]}], to: [{paths: [\"/public/*\", \"/admin/*\"]}]}]",
    );
    let deny_admin = pol(
        "deny-admin",
        "  action: DENY\n  rules: [{to: [{methods: [DELETE]}]}, {to: [{paths: [\"/admin/*\"]}]}]",
    );
    let audit_all = pol(
        "audit",
        "  action: AUDIT\n  rules: [{to: [{paths: [\"/public/audited\"]}]}]",
    );
    let dry_deny = pol(
        "dry-deny",
        "  action: DENY\n  mode: dry-run\n  rules: [{to: [{paths: [\"/public/soon-denied\"]}]}]",
    );
    let dry_allow = pol(
        "dry-allow",
        "  action: ALLOW\n  mode: dry-run\n  rules: [{to: [{paths: [\"/public/*\"]}]}]",
    );
    let empty_allow = pol("empty-allow", "  action: ALLOW");
    let other_ns = allow_web.replace("namespace: shop", "namespace: elsewhere");
    let orders_only = pol(
        "orders-only",
        "  selector: { account: orders }\n  action: ALLOW\n  rules: [{}]",
    );
    let root_deny = "---\napiVersion: meshgate.dev/v1\nkind: AuthorizationPolicy\nmetadata: { name: no-debug, namespace: meshgate }\nspec: { action: DENY, rules: [{to: [{paths: [\"/debug/*\"]}]}] }\n";

    let both = format!("{allow_web}{deny_admin}");
    let full = format!("{allow_web}{deny_admin}{audit_all}{dry_deny}");
    let cases: Vec<(String, Req, Want)> = vec![
        // no policy: mesh default deny; MeshConfig ALLOW
        (
            String::new(),
            http(WEB, "GET", "/x"),
            (Deny, false, None, None, None, None),
        ),
        (
            mesh_allow().into(),
            http(WEB, "GET", "/x"),
            (Allow, true, None, None, None, None),
        ),
        // ALLOW applies: must match
        (
            allow_web.clone(),
            http(WEB, "GET", "/public/a"),
            (Allow, true, Some("shop/allow-web"), Some(0), None, None),
        ),
        (
            allow_web.clone(),
            http(ORDERS, "GET", "/public/a"),
            (Deny, false, None, None, None, None),
        ),
        (
            format!("{allow_web}{}", mesh_allow()),
            http(ORDERS, "GET", "/public/a"),
            (Deny, false, None, None, None, None),
        ),
        // an ALLOW policy without rules still selects the workload, and matches nothing
        (
            format!("{empty_allow}{}", mesh_allow()),
            http(WEB, "GET", "/x"),
            (Deny, false, None, None, None, None),
        ),
        // policies of other namespaces / other accounts do not apply
        (
            format!("{other_ns}{}", mesh_allow()),
            http(ORDERS, "GET", "/x"),
            (Allow, true, None, None, None, None),
        ),
        (
            format!("{orders_only}{}", mesh_allow()),
            http(ORDERS, "GET", "/x"),
            (Allow, true, None, None, None, None),
        ),
        // DENY overrides ALLOW; the first matching DENY rule is named
        (
            both.clone(),
            http(WEB, "GET", "/admin/x"),
            (Deny, false, Some("shop/deny-admin"), Some(1), None, None),
        ),
        (
            both.clone(),
            http(WEB, "DELETE", "/admin/x"),
            (Deny, false, Some("shop/deny-admin"), Some(0), None, None),
        ),
        (
            both.clone(),
            http(WEB, "GET", "/ADMIN/x"),
            (Deny, false, Some("shop/deny-admin"), Some(1), None, None),
        ),
        (
            both.clone(),
            http(WEB, "GET", "/public/x"),
            (Allow, true, Some("shop/allow-web"), Some(0), None, None),
        ),
        // root-namespace DENY applies mesh-wide
        (
            format!("{allow_web}{root_deny}"),
            http(WEB, "GET", "/debug/x"),
            (Deny, false, Some("meshgate/no-debug"), Some(0), None, None),
        ),
        // AUDIT marks, never changes the outcome
        (
            full.clone(),
            http(WEB, "GET", "/public/audited"),
            (
                Audit,
                true,
                Some("shop/allow-web"),
                Some(0),
                Some("shop/audit"),
                None,
            ),
        ),
        (
            audit_all.clone(),
            http(WEB, "GET", "/public/audited"),
            (Deny, false, None, None, Some("shop/audit"), None),
        ),
        // dry-run DENY: allowed, marked
        (
            full.clone(),
            http(WEB, "GET", "/public/soon-denied"),
            (
                DryRunDeny,
                true,
                Some("shop/allow-web"),
                Some(0),
                None,
                Some("shop/dry-deny"),
            ),
        ),
        (
            format!("{dry_deny}{}", mesh_allow()),
            http(WEB, "GET", "/public/soon-denied"),
            (DryRunDeny, true, None, None, None, Some("shop/dry-deny")),
        ),
        // dry-run DENY never turns a deny into anything else
        (
            dry_deny.clone(),
            http(WEB, "GET", "/public/soon-denied"),
            (Deny, false, None, None, None, None),
        ),
        // dry-run ALLOW replacing the mesh default: unmatched requests are marked
        (
            format!("{dry_allow}{}", mesh_allow()),
            http(WEB, "GET", "/other"),
            (DryRunDeny, true, None, None, None, Some(DRY_RUN_NO_ALLOW)),
        ),
        (
            format!("{dry_allow}{}", mesh_allow()),
            http(WEB, "GET", "/public/x"),
            (Allow, true, None, None, None, None),
        ),
        // with an enforce ALLOW that matched, adding the dry-run ALLOW would not deny
        (
            format!("{allow_web}{dry_allow}"),
            http(WEB, "GET", "/admin/x"),
            (Allow, true, Some("shop/allow-web"), Some(0), None, None),
        ),
        // dry-run policies are not enforced
        (
            dry_allow.clone(),
            http(WEB, "GET", "/public/x"),
            (Deny, false, None, None, None, None),
        ),
        // L4: an L7-only ALLOW does not match; a port rule does
        (
            allow_web.clone(),
            tcp(WEB, 8080),
            (Deny, false, None, None, None, None),
        ),
        (
            pol(
                "db",
                "  action: ALLOW\n  rules: [{from: [{principals: [\"*/sa/web\"]}], to: [{ports: [5432]}]}]",
            ),
            tcp(WEB, 5432),
            (Allow, true, Some("shop/db"), Some(0), None, None),
        ),
        // L4: a DENY with only HTTP fields drops them and denies the connection (fail closed)
        (
            format!("{deny_admin}{}", mesh_allow()),
            tcp(WEB, 8080),
            (Deny, false, Some("shop/deny-admin"), Some(0), None, None),
        ),
    ];
    let workload = id(ORDERS.replace("orders", "api").as_str());
    for (i, (yaml, req, want)) in cases.iter().enumerate() {
        let set = set_from(yaml);
        let snap = PolicySnapshot::compile(&set, &workload);
        let d = req.run(|r| snap.evaluate(r));
        let got: Want = (
            d.kind,
            d.allowed,
            d.policy.as_deref(),
            d.rule,
            d.audit_policy.as_deref(),
            d.dry_run_policy.as_deref(),
        );
        assert_eq!(
            &got, want,
            "case {i}: {} {:?} {:?}: {}",
            req.peer, req.method, req.path, d.reason
        );
        assert_eq!(&*d.version, set.version, "case {i}");
        assert!(!d.reason.is_empty());
        // A deciding rule names itself (the reason is written once per rule, at compile).
        let named = match (d.kind, &d.policy, d.rule) {
            (Allow, Some(p), Some(r)) => Some(format!("allowed by ALLOW policy {p} rule {r}")),
            (Deny, Some(p), Some(r)) => Some(format!("denied by DENY policy {p} rule {r}")),
            _ => None,
        };
        if let Some(named) = named {
            assert!(d.reason.starts_with(&named), "case {i}: {}", d.reason);
        }
    }
}

#[test]
fn reasons_say_why() {
    let set = set_from("");
    let snap = PolicySnapshot::compile(&set, &id(WEB));
    assert_eq!(
        http(WEB, "GET", "/").run(|r| snap.evaluate(r)).reason,
        "mesh default: deny"
    );
    let set = set_from(&pol(
        "a",
        "  action: ALLOW\n  rules: [{to: [{ports: [1]}]}]",
    ));
    let snap = PolicySnapshot::compile(&set, &id(WEB));
    assert_eq!(
        http(WEB, "GET", "/").run(|r| snap.evaluate(r)).reason,
        "no ALLOW policy matched"
    );
    let snap = PolicySnapshot::deny_all(&id(WEB));
    let d = http(WEB, "GET", "/").run(|r| snap.evaluate(r));
    assert_eq!(
        (d.kind, d.allowed, d.reason.as_str()),
        (DecisionKind::Deny, false, "no policy loaded yet")
    );
    assert_eq!(snap.version(), "none");
}

#[test]
fn first_match_is_by_policy_name_then_rule_whatever_the_index_list() {
    // "a" matches through a wildcard rule, "b" through an exact principal, "c" through no `from`:
    // the earliest by name wins, whatever list of the index it sits in, and whatever file order.
    let a = pol(
        "a",
        "  action: ALLOW\n  rules: [{to: [{ports: [1]}]}, {from: [{principals: [\"*/sa/web\"]}]}]",
    );
    let b = pol(
        "b",
        &format!("  action: ALLOW\n  rules: [{{from: [{{principals: [\"{WEB}\"]}}]}}]"),
    );
    let c = pol("c", "  action: ALLOW\n  rules: [{}]");
    for yaml in [
        format!("{c}{b}{a}"),
        format!("{a}{b}{c}"),
        format!("{b}{c}{a}"),
    ] {
        let snap = PolicySnapshot::compile(&set_from(&yaml), &id(ORDERS));
        let d = http(WEB, "GET", "/").run(|r| snap.evaluate(r));
        assert_eq!((d.policy.as_deref(), d.rule), (Some("shop/a"), Some(1)));
    }
    for (yaml, want) in [(format!("{b}{c}"), "shop/b"), (c.clone(), "shop/c")] {
        let snap = PolicySnapshot::compile(&set_from(&yaml), &id(ORDERS));
        let d = http(WEB, "GET", "/").run(|r| snap.evaluate(r));
        assert_eq!(d.policy.as_deref(), Some(want));
    }
}

#[test]
fn compile_keeps_only_applicable_policies_and_dump_shows_them() {
    let yaml = format!(
        "{}{}{}",
        pol("mine", "  selector: { account: orders }\n  action: ALLOW"),
        pol("theirs", "  selector: { account: web }\n  action: ALLOW"),
        pol("all", "  action: DENY"),
    );
    let set = set_from(&yaml);
    let snap = PolicySnapshot::compile(&set, &id(ORDERS));
    assert_eq!(snap.policy_count(), 2);
    let dump = snap.dump();
    assert_eq!(dump["version"], set.version.as_str());
    assert_eq!(dump["workload"], ORDERS);
    let names: Vec<&str> = dump["policies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["all", "mine"]);
    assert_eq!(dump["policies"][0]["kind"], "AuthorizationPolicy");
}

#[test]
fn unvalidated_bad_patterns_fail_closed() {
    // Sets built in code skip the loader: a DENY rule that cannot compile denies everything, an
    // ALLOW rule that cannot compile allows nothing.
    let mut set = set_from(&format!(
        "{}{}",
        pol("allow", "  action: ALLOW\n  rules: [{}]"),
        pol("deny", "  action: DENY")
    ));
    set.policies[1].spec.rules =
        vec![serde_saphyr::from_str("{to: [{paths: [\"/a/*/b\"]}]}").unwrap()];
    let snap = PolicySnapshot::compile(&set, &id(ORDERS));
    let d = http(WEB, "GET", "/x").run(|r| snap.evaluate(r));
    assert_eq!((d.allowed, d.policy.as_deref()), (false, Some("shop/deny")));
    set.policies[1].spec.rules.clear();
    set.policies[0].spec.rules =
        vec![serde_saphyr::from_str("{from: [{principals: [\"a*b*\"]}]}").unwrap()];
    let snap = PolicySnapshot::compile(&set, &id(ORDERS));
    assert!(!http(WEB, "GET", "/x").run(|r| snap.evaluate(r)).allowed);
}
