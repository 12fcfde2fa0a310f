//! Reading certificates: the peer's SPIFFE ID, serial and validity, and PEM helpers.
//!
//! X509-SVID §5.2 says an SVID carries exactly one URI SAN; a certificate with none or several is
//! not an identity at all, so it is rejected here rather than "first one wins".

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use time::OffsetDateTime;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::spiffe::{SpiffeId, SpiffeIdError, TrustDomain};

/// Why a certificate does not name a workload.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("certificate is not valid DER X.509: {0}")]
    Malformed(String),
    #[error("certificate has no URI SAN, so it carries no SPIFFE ID")]
    NoUriSan,
    #[error("certificate has {0} URI SANs; an X509-SVID has exactly one")]
    SeveralUriSans(usize),
    #[error("certificate URI SAN is not a valid SPIFFE ID: {0}")]
    BadId(#[from] SpiffeIdError),
    #[error("PEM input holds no {0}")]
    NoPem(&'static str),
    #[error("PEM input is malformed: {0}")]
    Pem(String),
}

/// What meshgate needs to know about a leaf certificate.
#[derive(Debug, Clone)]
pub struct CertInfo {
    /// The single URI SAN, validated.
    pub id: SpiffeId,
    /// Serial number as lowercase hex, without separators.
    pub serial: String,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    /// True when BasicConstraints says CA:TRUE.
    pub is_ca: bool,
}

/// Extracts the SPIFFE ID from a DER certificate (exactly one URI SAN).
pub fn spiffe_id_from_der(der: &[u8]) -> Result<SpiffeId, CertError> {
    Ok(cert_info(der)?.id)
}

/// Parses the fields meshgate uses from a DER certificate.
/// The end of any certificate's validity (roots included, which carry no SPIFFE ID).
pub fn not_after(der: &[u8]) -> Result<OffsetDateTime, CertError> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| CertError::Malformed(e.to_string()))?;
    Ok(cert.validity().not_after.to_datetime())
}

pub fn cert_info(der: &[u8]) -> Result<CertInfo, CertError> {
    let (rest, cert) =
        X509Certificate::from_der(der).map_err(|e| CertError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CertError::Malformed(
            "trailing bytes after the certificate".into(),
        ));
    }
    let uris = uri_sans(&cert)?;
    let id = match uris.as_slice() {
        [] => return Err(CertError::NoUriSan),
        [one] => SpiffeId::parse(one)?,
        many => return Err(CertError::SeveralUriSans(many.len())),
    };
    let is_ca = cert
        .basic_constraints()
        .map_err(|e| CertError::Malformed(e.to_string()))?
        .is_some_and(|bc| bc.value.ca);
    Ok(CertInfo {
        id,
        serial: hex(cert.raw_serial()),
        not_before: cert.validity().not_before.to_datetime(),
        not_after: cert.validity().not_after.to_datetime(),
        is_ca,
    })
}

fn uri_sans<'a>(cert: &'a X509Certificate<'_>) -> Result<Vec<&'a str>, CertError> {
    let san = cert
        .subject_alternative_name()
        .map_err(|e| CertError::Malformed(format!("bad subjectAltName: {e}")))?;
    Ok(san
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|g| match g {
                    GeneralName::URI(u) => Some(*u),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

/// The trust domain a CA certificate (root or intermediate) is for: its single URI SAN
/// `spiffe://<td>` (how meshgate CA certificates name it). Lets a workload that holds only the
/// CA bundle and a ServiceAccount token know its own trust domain.
pub fn trust_domain_of_ca(der: &[u8]) -> Result<TrustDomain, CertError> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| CertError::Malformed(e.to_string()))?;
    let uris = uri_sans(&cert)?;
    let uri = match uris.as_slice() {
        [] => return Err(CertError::NoUriSan),
        [one] => *one,
        many => return Err(CertError::SeveralUriSans(many.len())),
    };
    let td = uri
        .strip_prefix("spiffe://")
        .ok_or(SpiffeIdError::WrongScheme)?;
    Ok(TrustDomain::new(td)?)
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// All certificates in a PEM text, in order; an error if there is none.
pub fn certs_from_pem(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::Pem(e.to_string()))?;
    if certs.is_empty() {
        return Err(CertError::NoPem("CERTIFICATE block"));
    }
    Ok(certs)
}

/// The first private key in a PEM text (PKCS#8, SEC1 or PKCS#1).
pub fn key_from_pem(pem: &[u8]) -> Result<PrivateKeyDer<'static>, CertError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => CertError::NoPem("PRIVATE KEY block"),
        other => CertError::Pem(other.to_string()),
    })
}

/// PEM text for a list of DER certificates.
pub fn certs_to_pem(certs: &[CertificateDer<'_>]) -> String {
    certs.iter().map(|c| der_to_pem("CERTIFICATE", c)).collect()
}

/// One PEM block with a 64-column base64 body.
pub fn der_to_pem(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// RFC 3339 form of a timestamp, for logs and JSON.
pub fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair, SanType};

    fn self_signed(sans: Vec<SanType>) -> Vec<u8> {
        let mut p = CertificateParams::default();
        p.subject_alt_names = sans;
        let key = KeyPair::generate().unwrap();
        p.self_signed(&key).unwrap().der().to_vec()
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(s.to_string().try_into().unwrap())
    }

    #[test]
    fn peer_id_needs_exactly_one_valid_uri_san() {
        let web = "spiffe://mesh.local/ns/shop/sa/web";
        let one = self_signed(vec![uri(web), SanType::DnsName("web".try_into().unwrap())]);
        assert_eq!(spiffe_id_from_der(&one).unwrap().as_str(), web);

        let none = self_signed(vec![SanType::DnsName("web".try_into().unwrap())]);
        assert!(matches!(
            spiffe_id_from_der(&none),
            Err(CertError::NoUriSan)
        ));
        let no_san_at_all = self_signed(vec![]);
        assert!(matches!(
            spiffe_id_from_der(&no_san_at_all),
            Err(CertError::NoUriSan)
        ));

        let two = self_signed(vec![uri(web), uri("spiffe://mesh.local/ns/shop/sa/admin")]);
        assert!(matches!(
            spiffe_id_from_der(&two),
            Err(CertError::SeveralUriSans(2))
        ));

        let bad = self_signed(vec![uri("spiffe://mesh.local/ns/../admin")]);
        assert!(matches!(spiffe_id_from_der(&bad), Err(CertError::BadId(_))));

        assert!(matches!(
            spiffe_id_from_der(b"\x30\x03garbage"),
            Err(CertError::Malformed(_))
        ));
        let mut trailing = one.clone();
        trailing.push(0);
        assert!(matches!(
            spiffe_id_from_der(&trailing),
            Err(CertError::Malformed(_))
        ));
    }
}
