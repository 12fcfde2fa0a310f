//! The CA's CSR handling: a request body (one PEM "CERTIFICATE REQUEST" block, as
//! `POST /v1/svid` and `/v1/svid/renew` read it) or raw DER, through
//! `Authority::issue_for_csr` for a fixed caller identity. Never panics; whatever is issued is a
//! non-CA leaf for exactly that identity.
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use meshgate_ca::cert::cert_info;
use meshgate_ca::{Authority, SpiffeId, TrustDomain};
use rustls_pki_types::CertificateSigningRequestDer;
use rustls_pki_types::pem::PemObject;

/// The CA's request body limit is 64 KiB; CSRs are a few hundred bytes.
const MAX_INPUT: usize = 8 * 1024;

struct Ca {
    authority: Authority,
    caller: SpiffeId,
}

fn ca() -> &'static Ca {
    static CA: OnceLock<Ca> = OnceLock::new();
    CA.get_or_init(|| {
        let td = TrustDomain::new("mesh.local").unwrap();
        let material = Authority::create(&td).expect("CA material");
        let authority = Authority::load(
            td,
            &material.intermediate_pem,
            &material.intermediate_key_pem,
        )
        .expect("CA loads");
        let caller = SpiffeId::parse("spiffe://mesh.local/ns/shop/sa/web").unwrap();
        Ca { authority, caller }
    })
}

fuzz_target!(|data: &[u8]| {
    if data.len() > MAX_INPUT {
        return;
    }
    if let Ok(der) = CertificateSigningRequestDer::from_pem_slice(data) {
        issue(der.as_ref());
    }
    issue(data);
});

fn issue(der: &[u8]) {
    let ca = ca();
    match ca
        .authority
        .issue_for_csr(der, &ca.caller, Duration::from_secs(3600))
    {
        Ok(svid) => {
            assert_eq!(svid.info.id, ca.caller);
            assert!(!svid.info.is_ca, "a CSR obtained a CA certificate");
            assert_eq!(svid.chain.len(), 2);
            let leaf = cert_info(svid.chain[0].as_ref()).expect("the issued leaf parses");
            assert_eq!(leaf.id, ca.caller);
            assert!(!leaf.is_ca);
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
}
