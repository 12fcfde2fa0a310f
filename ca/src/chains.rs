//! Certificate chains a verifier has already verified, so that a peer's next handshake skips
//! the signature checks that can only give the same answer again.
//!
//! Why: a meshgate SVID chain is a leaf and an intermediate, so checking it against the roots
//! costs two ECDSA P-256 verifications, and a peer presents the same chain on every connection
//! for the chain's whole life. On a sidecar taking new connections those two verifications were
//! a third of its CPU per handshake. What a cached answer can still change is handled here:
//! - *time*: an entry keeps the latest `notBefore` and the earliest `notAfter` of every
//!   certificate the peer sent, and answers only while `now` lies between them. That window is
//!   inside the window of the path webpki built (which uses some of those certificates), so a
//!   cached "valid" is never given when webpki would say expired or not yet valid. Outside it
//!   the chain is verified again in full and the error is webpki's own;
//! - *trust*: an entry holds for one root store. Every lookup names the roots it verifies
//!   against; other roots (a bundle rotated, a CA added or removed) empty the cache first;
//! - *purpose*: a client chain and a server chain are checked for different key usages, so each
//!   verifier owns its own cache and never shares it with a verifier of the other kind.
//!
//! What is never cached: refusals (each failed handshake is verified and reported in full), the
//! peer's proof that it holds the key (`CertificateVerify`, a signature over this handshake's
//! transcript, checked by rustls on every connection), and the SPIFFE ID checks the verifiers
//! make after the chain. The key is SHA-256 over the exact bytes the peer sent, with lengths, so
//! one byte of difference anywhere is another entry. No revocation lists are configured in
//! meshgate's verifiers; a verifier that used them would need to key the cache by them too.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rustls::RootCertStore;
use rustls::pki_types::{CertificateDer, UnixTime};
use x509_parser::prelude::{FromDer, X509Certificate};

/// The chains one verifier has verified against one root store (see the module docs).
#[derive(Debug, Default)]
pub struct VerifiedChains {
    inner: Mutex<Entries>,
    hits: AtomicU64,
    misses: AtomicU64,
}

#[derive(Debug, Default)]
struct Entries {
    /// The roots the entries were verified against; `None` before the first entry.
    roots: Option<Arc<RootCertStore>>,
    valid: HashMap<[u8; 32], Window>,
}

/// The seconds (since the Unix epoch) between which every certificate of a chain is valid,
/// both ends included, as in webpki.
#[derive(Debug, Clone, Copy)]
struct Window {
    from: u64,
    until: u64,
}

impl Window {
    fn of(end_entity: &[u8], intermediates: &[CertificateDer<'_>]) -> Option<Self> {
        let mut window = Self {
            from: 0,
            until: u64::MAX,
        };
        for der in std::iter::once(end_entity).chain(intermediates.iter().map(|c| c.as_ref())) {
            let (_, cert) = X509Certificate::from_der(der).ok()?;
            let validity = cert.validity();
            window.from = window
                .from
                .max(u64::try_from(validity.not_before.timestamp()).unwrap_or(0));
            window.until = window
                .until
                .min(u64::try_from(validity.not_after.timestamp()).ok()?);
        }
        Some(window)
    }

    fn holds_at(&self, now: UnixTime) -> bool {
        let now = now.as_secs();
        self.from <= now && now <= self.until
    }
}

/// How many chains a cache remembers. A chain is one peer workload's current SVID (a few
/// hundred bytes sent, 48 kept), so this covers thousands of callers; at the cap the cache
/// starts afresh rather than evicting one by one, which costs each peer one full verification.
pub const VERIFIED_CHAINS_CAPACITY: usize = 4096;

/// What a cache has answered since it was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainCacheStats {
    /// Handshakes whose chain was found verified (no signature checked).
    pub hits: u64,
    /// Handshakes whose chain was verified in full (first sight, outside the window, other
    /// roots, or refused).
    pub misses: u64,
}

impl VerifiedChains {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Answers whether the chain (`end_entity` then `intermediates`, exactly as the peer sent
    /// them) is valid against `roots` at `now`: from the cache when this chain was verified
    /// against the same roots and `now` is inside every certificate's validity, otherwise by
    /// calling `verify` (the full webpki check), whose success is remembered and whose error is
    /// returned as it is.
    pub fn check<T>(
        &self,
        roots: &Arc<RootCertStore>,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        verify: impl FnOnce() -> Result<T, rustls::Error>,
        cached: impl FnOnce() -> T,
    ) -> Result<T, rustls::Error> {
        let key = chain_key(end_entity, intermediates);
        if self.lookup(roots, &key, now) {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(cached());
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        let verified = verify()?;
        if let Some(window) = Window::of(end_entity, intermediates) {
            self.remember(roots, key, window);
        }
        Ok(verified)
    }

    /// Counts of cached and full verifications.
    pub fn stats(&self) -> ChainCacheStats {
        ChainCacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
        }
    }

    fn lookup(&self, roots: &Arc<RootCertStore>, key: &[u8; 32], now: UnixTime) -> bool {
        let entries = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        match &entries.roots {
            Some(known) if Arc::ptr_eq(known, roots) => {
                entries.valid.get(key).is_some_and(|w| w.holds_at(now))
            }
            _ => false,
        }
    }

    fn remember(&self, roots: &Arc<RootCertStore>, key: [u8; 32], window: Window) {
        let mut entries = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let same_roots = entries
            .roots
            .as_ref()
            .is_some_and(|known| Arc::ptr_eq(known, roots));
        if !same_roots || entries.valid.len() >= VERIFIED_CHAINS_CAPACITY {
            entries.valid.clear();
            entries.roots = Some(roots.clone());
        }
        entries.valid.insert(key, window);
    }
}

/// SHA-256 over each certificate's length and bytes, in the order sent.
fn chain_key(end_entity: &CertificateDer<'_>, intermediates: &[CertificateDer<'_>]) -> [u8; 32] {
    let mut hash = ring::digest::Context::new(&ring::digest::SHA256);
    for der in std::iter::once(end_entity).chain(intermediates) {
        hash.update(&(der.len() as u64).to_be_bytes());
        hash.update(der.as_ref());
    }
    let mut key = [0; 32];
    key.copy_from_slice(hash.finish().as_ref());
    key
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    use rustls::server::WebPkiClientVerifier;
    use rustls::server::danger::ClientCertVerified;
    use rustls::{CertificateError, Error};

    use super::*;
    use crate::authority::Authority;
    use crate::spiffe::{SpiffeId, TrustDomain};
    use crate::tls::{TrustBundle, provider};

    /// A CA of its own: its roots, and SVIDs (leaf, intermediate) it signs.
    struct Ca {
        roots: Arc<RootCertStore>,
        authority: Authority,
    }

    impl Ca {
        fn new() -> Self {
            let td = TrustDomain::new("mesh.local").unwrap();
            let material = Authority::create(&td).unwrap();
            let authority = Authority::load(
                td,
                &material.intermediate_pem,
                &material.intermediate_key_pem,
            )
            .unwrap();
            let bundle = TrustBundle::from_pem(material.root_pem.as_bytes()).unwrap();
            Self {
                roots: bundle.roots(),
                authority,
            }
        }

        fn svid(&self, sa: &str) -> crate::authority::IssuedSvid {
            let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
            let id = SpiffeId::parse(&format!("spiffe://mesh.local/ns/default/sa/{sa}")).unwrap();
            self.authority
                .issue_for_key(&key, &id, Duration::from_secs(3600))
                .unwrap()
        }
    }

    /// Checks a chain through `cache` the way the inbound listener does: webpki's client
    /// verifier over `roots`, counting the full verifications in `full`.
    fn check(
        cache: &VerifiedChains,
        roots: &Arc<RootCertStore>,
        chain: &[CertificateDer<'static>],
        now: UnixTime,
        full: &AtomicUsize,
    ) -> Result<(), Error> {
        let webpki = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .build()
            .unwrap();
        cache
            .check(
                roots,
                &chain[0],
                &chain[1..],
                now,
                || {
                    full.fetch_add(1, Ordering::Relaxed);
                    webpki.verify_client_cert(&chain[0], &chain[1..], now)
                },
                ClientCertVerified::assertion,
            )
            .map(|_| ())
    }

    fn at(secs: i64) -> UnixTime {
        UnixTime::since_unix_epoch(Duration::from_secs(secs as u64))
    }

    fn validity(der: &[u8]) -> (i64, i64) {
        let (_, cert) = X509Certificate::from_der(der).unwrap();
        (
            cert.validity().not_before.timestamp(),
            cert.validity().not_after.timestamp(),
        )
    }

    #[test]
    fn a_chain_is_verified_in_full_once_then_answered_from_the_cache() {
        let ca = Ca::new();
        let svid = ca.svid("client");
        let cache = VerifiedChains::new();
        let full = AtomicUsize::new(0);
        for _ in 0..3 {
            check(&cache, &ca.roots, &svid.chain, UnixTime::now(), &full).unwrap();
        }
        assert_eq!(full.load(Ordering::Relaxed), 1);
        assert_eq!(cache.stats(), ChainCacheStats { hits: 2, misses: 1 });
        // Another peer's chain is its own entry.
        check(
            &cache,
            &ca.roots,
            &ca.svid("other").chain,
            UnixTime::now(),
            &full,
        )
        .unwrap();
        assert_eq!(full.load(Ordering::Relaxed), 2);
    }

    /// Time is checked on every answer: a cached chain is verified again in full outside the
    /// validity of any of its certificates, and webpki's own error comes back.
    #[test]
    fn a_cached_chain_is_refused_outside_its_validity() {
        let ca = Ca::new();
        let svid = ca.svid("client");
        let (leaf_from, leaf_until) = validity(&svid.chain[0]);
        let (_, intermediate_until) = validity(&svid.chain[1]);
        assert!(leaf_until < intermediate_until, "the leaf ends first here");
        let cache = VerifiedChains::new();
        let full = AtomicUsize::new(0);
        check(&cache, &ca.roots, &svid.chain, at(leaf_from + 10), &full).unwrap();
        check(&cache, &ca.roots, &svid.chain, at(leaf_until), &full).unwrap();
        assert_eq!(full.load(Ordering::Relaxed), 1, "both ends are inside");

        let expired = check(&cache, &ca.roots, &svid.chain, at(leaf_until + 1), &full);
        assert!(
            matches!(
                expired,
                Err(Error::InvalidCertificate(
                    CertificateError::Expired | CertificateError::ExpiredContext { .. }
                ))
            ),
            "{expired:?}"
        );
        let early = check(&cache, &ca.roots, &svid.chain, at(leaf_from - 1), &full);
        assert!(
            matches!(
                early,
                Err(Error::InvalidCertificate(
                    CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. }
                ))
            ),
            "{early:?}"
        );
        assert_eq!(full.load(Ordering::Relaxed), 3);
    }

    /// An entry holds for the roots it was verified against: a chain of a CA that left the
    /// bundle is refused at once, and the cache starts afresh for the new roots.
    #[test]
    fn new_roots_verify_again_in_full() {
        let old = Ca::new();
        let new = Ca::new();
        let svid = old.svid("client");
        let cache = VerifiedChains::new();
        let full = AtomicUsize::new(0);
        check(&cache, &old.roots, &svid.chain, UnixTime::now(), &full).unwrap();
        // Both CAs have the same names, so webpki finds the new root and its signature fails.
        let refused = check(&cache, &new.roots, &svid.chain, UnixTime::now(), &full);
        assert!(
            matches!(
                refused,
                Err(Error::InvalidCertificate(CertificateError::BadSignature))
            ),
            "{refused:?}"
        );
        check(
            &cache,
            &new.roots,
            &new.svid("client").chain,
            UnixTime::now(),
            &full,
        )
        .unwrap();
        check(&cache, &old.roots, &svid.chain, UnixTime::now(), &full).unwrap();
        assert_eq!(full.load(Ordering::Relaxed), 4, "no answer crossed roots");
        // The same contents in another store are other roots too (a rebuilt bundle).
        let copy = Arc::new(RootCertStore {
            roots: old.roots.roots.clone(),
        });
        check(&cache, &copy, &svid.chain, UnixTime::now(), &full).unwrap();
        assert_eq!(full.load(Ordering::Relaxed), 5);
    }

    /// Refusals are never remembered, and a chain that differs from a cached one in any
    /// certificate (here: the same leaf without its intermediate) is verified in full.
    #[test]
    fn refusals_and_other_chains_are_verified_each_time() {
        let ca = Ca::new();
        let foreign = Ca::new();
        let cache = VerifiedChains::new();
        let full = AtomicUsize::new(0);
        let stranger = foreign.svid("client");
        for _ in 0..2 {
            let refused = check(&cache, &ca.roots, &stranger.chain, UnixTime::now(), &full);
            assert!(refused.is_err(), "{refused:?}");
        }
        assert_eq!(full.load(Ordering::Relaxed), 2);

        let svid = ca.svid("client");
        check(&cache, &ca.roots, &svid.chain, UnixTime::now(), &full).unwrap();
        let leaf_alone = check(&cache, &ca.roots, &svid.chain[..1], UnixTime::now(), &full);
        assert!(
            matches!(
                leaf_alone,
                Err(Error::InvalidCertificate(CertificateError::UnknownIssuer))
            ),
            "{leaf_alone:?}"
        );
        assert_eq!(full.load(Ordering::Relaxed), 4);
    }

    #[test]
    fn the_cache_holds_at_most_its_capacity() {
        let roots = Ca::new().roots;
        let cache = VerifiedChains::new();
        let window = Window {
            from: 0,
            until: u64::MAX,
        };
        for i in 0..=VERIFIED_CHAINS_CAPACITY as u64 {
            let mut key = [0; 32];
            key[..8].copy_from_slice(&i.to_be_bytes());
            cache.remember(&roots, key, window);
            let held = cache.inner.lock().unwrap().valid.len();
            assert!(held <= VERIFIED_CHAINS_CAPACITY, "{held} held");
        }
        // At the cap it started afresh: the newest entry is there, the oldest is not.
        let mut newest = [0; 32];
        newest[..8].copy_from_slice(&(VERIFIED_CHAINS_CAPACITY as u64).to_be_bytes());
        assert!(cache.lookup(&roots, &newest, UnixTime::now()));
        assert!(!cache.lookup(&roots, &[0; 32], UnixTime::now()));
    }
}
