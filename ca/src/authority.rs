//! The signing authority: creates the root and intermediate, and turns a workload's CSR into an
//! X509-SVID.
//!
//! The CA trusts nothing in a CSR but its public key and the proof that the requester holds the
//! private key. Everything else a CSR may ask for (CA:TRUE, more SANs, key usages, validity) is
//! dropped: the certificate is built from fresh parameters. rcgen's own CSR parser would copy
//! CA:TRUE into the parameters, which is how a sloppy CA issues a sub-CA.

use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
};
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY};
use x509_parser::prelude::FromDer;

use crate::cert::{self, CertInfo};
use crate::spiffe::{SpiffeId, TrustDomain};
use crate::tls;

/// Validity of a new root CA.
pub const ROOT_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Validity of a new signing intermediate.
pub const INTERMEDIATE_TTL: Duration = Duration::from_secs(365 * 24 * 3600);
/// Default SVID lifetime.
pub const DEFAULT_SVID_TTL: Duration = Duration::from_secs(3600);
/// Shortest SVID lifetime the CA will sign (shorter ones cannot be renewed at half-life in time).
pub const MIN_SVID_TTL: Duration = Duration::from_secs(5);
/// Backdating of `notBefore`, so a peer whose clock is slightly behind accepts a fresh SVID.
const CLOCK_SKEW: time::Duration = time::Duration::seconds(30);

/// Why a CSR was refused. Messages name what to change.
#[derive(Debug, thiserror::Error)]
pub enum CsrError {
    #[error("CSR is not a valid PKCS#10 request: {0}")]
    Malformed(String),
    #[error("CSR signature does not verify: the request was altered or not signed by its key")]
    BadSignature,
    #[error("CSR key must be ECDSA P-256 (generate it with the workload's identity client)")]
    UnsupportedKey,
    #[error("CSR asks for no SPIFFE ID; put {expected} as its only URI SAN")]
    NoId { expected: SpiffeId },
    #[error("CSR asks for {asked:?} but this caller may only obtain {expected}")]
    WrongId {
        asked: Vec<String>,
        expected: SpiffeId,
    },
    #[error("{id} is outside this CA's trust domain {trust_domain}")]
    ForeignTrustDomain {
        id: SpiffeId,
        trust_domain: TrustDomain,
    },
    #[error("signing failed: {0}")]
    Signing(String),
}

/// A freshly signed certificate chain (leaf first, then the intermediate).
#[derive(Debug, Clone)]
pub struct IssuedSvid {
    pub chain: Vec<CertificateDer<'static>>,
    pub info: CertInfo,
}

impl IssuedSvid {
    /// Leaf + intermediate as PEM (the `svid.pem` layout).
    pub fn chain_pem(&self) -> String {
        cert::certs_to_pem(&self.chain)
    }
}

/// A CA certificate and its key, as created by [`Authority::create`].
pub struct CaMaterial {
    pub root_pem: String,
    pub root_key_pem: String,
    pub intermediate_pem: String,
    pub intermediate_key_pem: String,
}

/// The intermediate that signs SVIDs, loaded into memory.
pub struct Authority {
    trust_domain: TrustDomain,
    issuer: Issuer<'static, KeyPair>,
    intermediate: CertificateDer<'static>,
    intermediate_not_after: OffsetDateTime,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    tls::random_bytes(&mut bytes);
    // Positive and 16 bytes long (RFC 5280 §4.1.2.2): clear the sign bit, keep the top byte non-zero.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

fn ca_params(
    td: &TrustDomain,
    common_name: &str,
    path_len: u8,
    ttl: Duration,
) -> CertificateParams {
    let now = OffsetDateTime::now_utc();
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name
        .push(DnType::OrganizationName, "meshgate");
    p.distinguished_name.push(DnType::CommonName, common_name);
    p.subject_alt_names = vec![SanType::URI(
        td.id_uri().try_into().expect("a trust domain URI is IA5"),
    )];
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(path_len));
    // X509-SVID §4.3: signing certificates carry keyCertSign (and cRLSign), not digitalSignature.
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.not_before = now - CLOCK_SKEW;
    p.not_after = now + ttl;
    p.serial_number = Some(random_serial());
    p.use_authority_key_identifier_extension = true;
    p
}

fn signing_error(e: rcgen::Error) -> CsrError {
    CsrError::Signing(e.to_string())
}

/// Why a CA directory's intermediate cannot sign.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoadAuthorityError {
    #[error("intermediate key: {0}")]
    Key(String),
    #[error("intermediate certificate: {0}")]
    Certificate(String),
    #[error(
        "intermediate key does not match the intermediate certificate (restore both files from the same backup, or `meshgate ca rotate`)"
    )]
    KeyMismatch,
}

impl Authority {
    /// Creates a new root (10 years) and signing intermediate (1 year) for `td`, with P-256 keys.
    pub fn create(td: &TrustDomain) -> Result<CaMaterial, rcgen::Error> {
        let root_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let root_params = ca_params(td, &format!("meshgate root CA {td}"), 1, ROOT_TTL);
        let root_cert = root_params.self_signed(&root_key)?;
        let root_issuer = Issuer::new(root_params, &root_key);

        let int_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let int_params = ca_params(
            td,
            &format!("meshgate intermediate CA {td}"),
            0,
            INTERMEDIATE_TTL,
        );
        let int_cert = int_params.signed_by(&int_key, &root_issuer)?;
        Ok(CaMaterial {
            root_pem: root_cert.pem(),
            root_key_pem: root_key.serialize_pem(),
            intermediate_pem: int_cert.pem(),
            intermediate_key_pem: int_key.serialize_pem(),
        })
    }

    /// Loads the signing intermediate from PEM.
    pub fn load(
        td: TrustDomain,
        intermediate_pem: &str,
        key_pem: &str,
    ) -> Result<Self, LoadAuthorityError> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| LoadAuthorityError::Key(e.to_string()))?;
        let bad_cert = |e: &dyn std::fmt::Display| LoadAuthorityError::Certificate(e.to_string());
        let der = cert::certs_from_pem(intermediate_pem.as_bytes())
            .map_err(|e| bad_cert(&e))?
            .remove(0);
        let (_, parsed) = x509_parser::parse_x509_certificate(&der).map_err(|e| bad_cert(&e))?;
        if parsed.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(LoadAuthorityError::KeyMismatch);
        }
        let intermediate_not_after = parsed.validity().not_after.to_datetime();
        let issuer = Issuer::from_ca_cert_der(&der, key).map_err(|e| bad_cert(&e))?;
        Ok(Self {
            trust_domain: td,
            issuer,
            intermediate: der,
            intermediate_not_after,
        })
    }

    /// The trust domain this CA issues for.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// When the intermediate (and so every SVID it can sign) expires.
    pub fn intermediate_not_after(&self) -> OffsetDateTime {
        self.intermediate_not_after
    }

    /// Checks a DER CSR and signs an SVID for `expected` with lifetime `ttl`.
    ///
    /// Refused unless the CSR's signature verifies, its key is P-256, and its URI SANs are exactly
    /// `[expected]`. Any other SAN types and all other requested extensions are ignored.
    pub fn issue_for_csr(
        &self,
        csr_der: &[u8],
        expected: &SpiffeId,
        ttl: Duration,
    ) -> Result<IssuedSvid, CsrError> {
        let (rest, csr) = X509CertificationRequest::from_der(csr_der)
            .map_err(|e| CsrError::Malformed(e.to_string()))?;
        if !rest.is_empty() {
            return Err(CsrError::Malformed(
                "trailing bytes after the request".into(),
            ));
        }
        csr.verify_signature().map_err(|_| CsrError::BadSignature)?;

        let spki = &csr.certification_request_info.subject_pki;
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok());
        if spki.algorithm.algorithm != OID_KEY_TYPE_EC_PUBLIC_KEY || curve != Some(OID_EC_P256) {
            return Err(CsrError::UnsupportedKey);
        }
        let public_key = rcgen::SubjectPublicKeyInfo::from_der(spki.raw)
            .map_err(|_| CsrError::UnsupportedKey)?;

        let asked = requested_uris(&csr);
        match asked.as_slice() {
            [] => {
                return Err(CsrError::NoId {
                    expected: expected.clone(),
                });
            }
            [one] if one == expected.as_str() => {}
            _ => {
                return Err(CsrError::WrongId {
                    asked,
                    expected: expected.clone(),
                });
            }
        }
        self.sign(&public_key, expected, ttl)
    }

    /// Signs an SVID for a key the caller holds (offline issuance: `meshgate ca issue`).
    pub fn issue_for_key(
        &self,
        key: &KeyPair,
        id: &SpiffeId,
        ttl: Duration,
    ) -> Result<IssuedSvid, CsrError> {
        self.sign(key, id, ttl)
    }

    /// Signs the CA's own serving certificate: the CA's SPIFFE ID plus DNS names / IP addresses so
    /// that `curl --cacert bundle.pem https://<host>:15012/…` verifies too.
    pub fn issue_serving_cert(
        &self,
        key: &KeyPair,
        hosts: &[String],
        ttl: Duration,
    ) -> Result<IssuedSvid, CsrError> {
        let id = ca_server_id(&self.trust_domain);
        let mut params = self.leaf_params(&id, ttl);
        for host in hosts {
            let san = match host.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => {
                    SanType::DnsName(host.clone().try_into().map_err(|e: rcgen::Error| {
                        CsrError::Signing(format!("host {host}: {e}"))
                    })?)
                }
            };
            params.subject_alt_names.push(san);
        }
        self.finish(params, key)
    }

    fn leaf_params(&self, id: &SpiffeId, ttl: Duration) -> CertificateParams {
        let now = OffsetDateTime::now_utc();
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name
            .push(DnType::OrganizationName, "meshgate");
        p.subject_alt_names = vec![SanType::URI(
            id.as_str()
                .to_string()
                .try_into()
                .expect("a valid SPIFFE ID is IA5"),
        )];
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.not_before = now - CLOCK_SKEW;
        // Never outlive the issuer: a chain is only as valid as its shortest link.
        p.not_after = (now + ttl.max(MIN_SVID_TTL)).min(self.intermediate_not_after);
        p.serial_number = Some(random_serial());
        p.use_authority_key_identifier_extension = true;
        p
    }

    fn sign(
        &self,
        public_key: &impl PublicKeyData,
        id: &SpiffeId,
        ttl: Duration,
    ) -> Result<IssuedSvid, CsrError> {
        if !id.is_member_of(&self.trust_domain) {
            return Err(CsrError::ForeignTrustDomain {
                id: id.clone(),
                trust_domain: self.trust_domain.clone(),
            });
        }
        self.finish(self.leaf_params(id, ttl), public_key)
    }

    fn finish(
        &self,
        params: CertificateParams,
        public_key: &impl PublicKeyData,
    ) -> Result<IssuedSvid, CsrError> {
        let leaf = params
            .signed_by(public_key, &self.issuer)
            .map_err(signing_error)?;
        let leaf_der = leaf.der().clone();
        let info = cert::cert_info(&leaf_der).map_err(|e| CsrError::Signing(e.to_string()))?;
        Ok(IssuedSvid {
            chain: vec![leaf_der, self.intermediate.clone()],
            info,
        })
    }
}

/// The SPIFFE ID the CA's HTTPS listener presents: `spiffe://<td>/ns/meshgate/sa/ca`.
pub fn ca_server_id(td: &TrustDomain) -> SpiffeId {
    td.workload_id("meshgate", "ca")
        .expect("a fixed path under a valid trust domain is valid")
}

fn requested_uris(csr: &X509CertificationRequest<'_>) -> Vec<String> {
    let mut uris = Vec::new();
    for ext in csr.requested_extensions().into_iter().flatten() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext {
            for name in &san.general_names {
                if let GeneralName::URI(u) = name {
                    uris.push(u.to_string());
                }
            }
        }
    }
    uris
}
