//! The inbound request hygiene the sidecar runs before authorization (`meshgate_proxy::inbound::
//! sanitize`): `check` (Host), the method check of `meshgate_policy::judge`, and `prepare` (hop-by-hop headers, caller-sent identity
//! headers in any spelling, upgrade allowlist) never panic, and afterwards:
//! - no header an app could read as an identity header is left (stated here independently: a
//!   name whose ASCII letters and digits, lowercased, start with `xmeshgate` or equal
//!   `xforwardedclientcert`);
//! - no header the caller named in `Connection` is left, and `Connection` is absent or exactly
//!   `upgrade` with an `Upgrade` of allowed protocols only;
//! - preparing again removes nothing (idempotent);
//! - a request `check` accepts has no lowercase method, is not CONNECT and has at most one Host.
//!
//! Input: line 1 = method, line 2 = request target, line 3 = `2` for HTTP/2, then `name: value`
//! header lines (invalid ones skipped).
#![no_main]

use http::header::{CONNECTION, HOST, HeaderName, HeaderValue, UPGRADE};
use libfuzzer_sys::fuzz_target;
use meshgate_proxy::http_util::requested_upgrade;
use meshgate_proxy::inbound::sanitize::{UpgradePolicy, check, prepare};

fn reads_as_identity(name: &str) -> bool {
    let folded: String = name
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .collect();
    folded.starts_with("xmeshgate") || folded == "xforwardedclientcert"
}

fuzz_target!(|data: &[u8]| {
    if data.len() > 8 * 1024 {
        return;
    }
    let text = String::from_utf8_lossy(data);
    let mut lines = text.split('\n');
    let method = lines.next().unwrap_or("GET");
    let target = lines.next().unwrap_or("/");
    let http2 = lines.next() == Some("2");
    let Ok(method) = http::Method::from_bytes(method.as_bytes()) else {
        return;
    };
    let mut builder = http::Request::builder()
        .method(method.clone())
        .uri(target)
        .version(if http2 {
            http::Version::HTTP_2
        } else {
            http::Version::HTTP_11
        });
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.trim().as_bytes()),
            HeaderValue::from_str(value.trim()),
        ) else {
            continue;
        };
        builder = builder.header(name, value);
    }
    let Ok(mut req) = builder.body(()) else {
        return;
    };

    if check(&req).is_ok() {
        assert!(req.headers().get_all(HOST).iter().count() <= 1);
    }
    if meshgate_policy::check_method(req.method().as_str()).is_ok() {
        let m = req.method().as_str();
        assert!(!m.bytes().any(|b| b.is_ascii_lowercase()), "{m}");
        assert_ne!(m, "CONNECT");
    }

    let named: Vec<String> = req
        .headers()
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|n| n.trim().to_ascii_lowercase())
        .filter(|n| !n.is_empty())
        .collect();
    let policy = UpgradePolicy::default();
    let asked = requested_upgrade(&req);
    let done = prepare(req.headers_mut(), asked, &policy);
    let headers = req.headers();
    for name in headers.keys() {
        assert!(!reads_as_identity(name.as_str()), "{name} survived");
    }
    for n in &named {
        if n != "upgrade" {
            assert!(
                !headers.contains_key(n.as_str()),
                "{n} (named in Connection) survived"
            );
        }
    }
    match headers.get(CONNECTION) {
        None => assert!(done.upgrade.is_none() && !headers.contains_key(UPGRADE)),
        Some(c) => {
            assert_eq!(c, "upgrade");
            let up = headers
                .get(UPGRADE)
                .expect("Connection: upgrade comes with Upgrade");
            assert_eq!(Some(up), done.upgrade.as_ref());
            for p in up.to_str().unwrap().split(',') {
                let name = p.trim().split('/').next().unwrap();
                assert!(name.eq_ignore_ascii_case("websocket"), "{up:?} let through");
            }
        }
    }
    let mut again = headers.clone();
    let asked_again = requested_upgrade(&req);
    let twice = prepare(&mut again, asked_again, &policy);
    assert_eq!(twice.stripped, 0);
    assert_eq!(&again, req.headers());
});
