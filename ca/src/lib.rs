//! meshgate-ca: SPIFFE IDs, certificate reading, TLS helpers, and the lightweight CA that signs
//! X509-SVIDs from workload CSRs (private keys never leave the workload).
//!
//! Other crates depend on this one for everything identity-related, so each rule (ID syntax, SAN
//! extraction, peer verification) is written exactly once.

pub mod api;
pub mod authority;
pub mod backoff;
pub mod cert;
pub mod chains;
pub mod fsutil;
pub mod k8s;
pub mod limits;
pub mod linger;
pub mod service;
/// SPIFFE IDs live in `meshgate-spiffe` (no I/O, so the policy crates share them); re-exported
/// here because everything identity-related is reached through this crate.
pub use meshgate_spiffe as spiffe;
pub mod store;
pub mod tls;
pub mod token;

pub use authority::{Authority, IssuedSvid};
pub use cert::CertInfo;
pub use spiffe::{SpiffeId, SpiffeIdError, TrustDomain};
pub use store::CaDir;
pub use tls::{SharedTrustBundle, TrustBundle};
