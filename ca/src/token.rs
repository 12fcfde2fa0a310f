//! Join tokens: how a workload proves its right to one SPIFFE ID the first time.
//!
//! A token is `mgjt1.<claims>.<tag>`: base64url JSON claims (ID, expiry, nonce, reusable) and an
//! HMAC-SHA256 tag under a secret that never leaves the CA directory. Tokens are minted offline
//! (`meshgate ca token`) without talking to a running CA. Single-use tokens are spent by writing
//! their nonce to an append-only ledger *before* the SVID is returned, so a restart cannot make a
//! used token good again.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ring::hmac;
use serde::{Deserialize, Serialize};

use crate::spiffe::SpiffeId;
use crate::{cert, fsutil, tls};

const PREFIX: &str = "mgjt1";

/// What a join token grants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenClaims {
    /// The one ID the token lets its holder obtain.
    pub id: SpiffeId,
    /// Expiry, Unix seconds.
    pub exp: i64,
    /// Random, hex; identifies the token in the ledger of spent tokens.
    pub nonce: String,
    /// A reusable token may bootstrap several workloads (e.g. replicas) until it expires.
    pub reusable: bool,
}

impl TokenClaims {
    /// Reads a token's claims **without** checking its tag: for the workload side, which has no
    /// key and only needs to know which ID to ask for. Never use this to authorize anything.
    pub fn peek(token: &str) -> Result<Self, TokenError> {
        let (claims, _) = split(token)?;
        decode_claims(claims)
    }
}

/// Why a token was refused.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("join token is malformed (expected mgjt1.<claims>.<tag> from `meshgate ca token`)")]
    Malformed,
    #[error("join token was not minted by this CA (bad signature)")]
    BadSignature,
    #[error("join token for {id} expired at {expired_at}; mint a new one with `meshgate ca token`")]
    Expired { id: SpiffeId, expired_at: String },
    #[error("join token for {id} was already used; single-use tokens bootstrap one workload only")]
    AlreadyUsed { id: SpiffeId },
    #[error("token ledger {path}: {source}")]
    Ledger {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn split(token: &str) -> Result<(&str, &str), TokenError> {
    let mut parts = token.trim().split('.');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(PREFIX), Some(claims), Some(tag), None) => Ok((claims, tag)),
        _ => Err(TokenError::Malformed),
    }
}

fn decode_claims(claims_b64: &str) -> Result<TokenClaims, TokenError> {
    let raw = B64.decode(claims_b64).map_err(|_| TokenError::Malformed)?;
    serde_json::from_slice(&raw).map_err(|_| TokenError::Malformed)
}

/// The CA's token secret.
pub struct TokenKey(hmac::Key);

impl TokenKey {
    /// Length of a fresh secret in bytes.
    pub const LEN: usize = 32;

    /// A new random secret (raw bytes, to be stored 0600).
    pub fn generate_secret() -> Vec<u8> {
        let mut secret = vec![0u8; Self::LEN];
        tls::random_bytes(&mut secret);
        secret
    }

    /// Wraps a stored secret.
    pub fn from_secret(secret: &[u8]) -> Self {
        Self(hmac::Key::new(hmac::HMAC_SHA256, secret))
    }

    /// Mints a token for `id` valid for `ttl`.
    pub fn mint(
        &self,
        id: &SpiffeId,
        ttl: std::time::Duration,
        reusable: bool,
    ) -> (String, TokenClaims) {
        let mut nonce = [0u8; 16];
        tls::random_bytes(&mut nonce);
        let claims = TokenClaims {
            id: id.clone(),
            exp: now_unix() + ttl.as_secs() as i64,
            nonce: cert::hex(&nonce),
            reusable,
        };
        let body = B64.encode(serde_json::to_vec(&claims).expect("claims serialize"));
        let signed = format!("{PREFIX}.{body}");
        let tag = hmac::sign(&self.0, signed.as_bytes());
        (format!("{signed}.{}", B64.encode(tag.as_ref())), claims)
    }

    /// Checks the tag and expiry. Does not spend the token: see [`NonceLedger::spend`].
    pub fn verify(&self, token: &str, now_unix: i64) -> Result<TokenClaims, TokenError> {
        let (claims_b64, tag_b64) = split(token)?;
        let tag = B64.decode(tag_b64).map_err(|_| TokenError::Malformed)?;
        let signed = format!("{PREFIX}.{claims_b64}");
        hmac::verify(&self.0, signed.as_bytes(), &tag).map_err(|_| TokenError::BadSignature)?;
        let claims = decode_claims(claims_b64)?;
        if claims.exp <= now_unix {
            return Err(TokenError::Expired {
                id: claims.id,
                expired_at: cert::rfc3339(
                    time::OffsetDateTime::from_unix_timestamp(claims.exp)
                        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH),
                ),
            });
        }
        Ok(claims)
    }
}

/// Current time in Unix seconds.
pub fn now_unix() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// The spent single-use tokens, persisted as lines `<nonce> <exp>` in an append-only file.
/// Entries past their token's expiry are dropped at load: an expired token is refused anyway.
pub struct NonceLedger {
    path: PathBuf,
    spent: HashMap<String, i64>,
    file: File,
}

impl NonceLedger {
    /// Opens (or creates) the ledger at `path` and compacts expired entries away.
    pub fn open(path: &Path) -> Result<Self, TokenError> {
        let ledger_err = |source| TokenError::Ledger {
            path: path.to_path_buf(),
            source,
        };
        let now = now_unix();
        let mut spent = HashMap::new();
        match File::open(path) {
            Ok(f) => {
                for line in BufReader::new(f).lines() {
                    let line = line.map_err(ledger_err)?;
                    let mut fields = line.split_whitespace();
                    if let (Some(nonce), Some(Ok(exp))) =
                        (fields.next(), fields.next().map(str::parse::<i64>))
                        && exp > now
                    {
                        spent.insert(nonce.to_string(), exp);
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(ledger_err(e)),
        }
        let compacted: String = spent.iter().map(|(n, e)| format!("{n} {e}\n")).collect();
        fsutil::write_atomic(path, compacted.as_bytes(), 0o600).map_err(ledger_err)?;
        let file = OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(ledger_err)?;
        Ok(Self {
            path: path.to_path_buf(),
            spent,
            file,
        })
    }

    /// Spends a verified token: a reusable one passes; a single-use one passes once, and the
    /// spend is on disk (fsynced) before this returns.
    pub fn spend(&mut self, claims: &TokenClaims) -> Result<(), TokenError> {
        if claims.reusable {
            return Ok(());
        }
        if self.spent.contains_key(&claims.nonce) {
            return Err(TokenError::AlreadyUsed {
                id: claims.id.clone(),
            });
        }
        let ledger_err = |source| TokenError::Ledger {
            path: self.path.clone(),
            source,
        };
        self.file
            .write_all(format!("{} {}\n", claims.nonce, claims.exp).as_bytes())
            .and_then(|_| self.file.sync_data())
            .map_err(ledger_err)?;
        self.spent.insert(claims.nonce.clone(), claims.exp);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn id() -> SpiffeId {
        SpiffeId::parse("spiffe://mesh.local/ns/shop/sa/web").unwrap()
    }

    #[test]
    fn mint_verify_roundtrip_and_tamper() {
        let key = TokenKey::from_secret(&TokenKey::generate_secret());
        let (token, claims) = key.mint(&id(), Duration::from_secs(60), false);
        assert_eq!(key.verify(&token, now_unix()).unwrap(), claims);
        assert_eq!(TokenClaims::peek(&token).unwrap().id, id());

        let other = TokenKey::from_secret(&TokenKey::generate_secret());
        assert!(matches!(
            other.verify(&token, now_unix()),
            Err(TokenError::BadSignature)
        ));

        // Swap in claims for another ID but keep the tag: must not verify.
        let forged_claims = TokenClaims {
            id: SpiffeId::parse("spiffe://mesh.local/ns/shop/sa/admin").unwrap(),
            ..claims.clone()
        };
        let parts: Vec<&str> = token.split('.').collect();
        let forged = format!(
            "{PREFIX}.{}.{}",
            B64.encode(serde_json::to_vec(&forged_claims).unwrap()),
            parts[2]
        );
        assert!(matches!(
            key.verify(&forged, now_unix()),
            Err(TokenError::BadSignature)
        ));
        assert!(matches!(
            key.verify("garbage", now_unix()),
            Err(TokenError::Malformed)
        ));
        assert!(matches!(
            key.verify(&token, claims.exp + 1),
            Err(TokenError::Expired { .. })
        ));
    }

    #[test]
    fn ledger_spends_once_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger");
        let key = TokenKey::from_secret(&TokenKey::generate_secret());
        let (_, single) = key.mint(&id(), Duration::from_secs(60), false);
        let (_, reusable) = key.mint(&id(), Duration::from_secs(60), true);
        let mut ledger = NonceLedger::open(&path).unwrap();
        ledger.spend(&single).unwrap();
        assert!(matches!(
            ledger.spend(&single),
            Err(TokenError::AlreadyUsed { .. })
        ));
        ledger.spend(&reusable).unwrap();
        ledger.spend(&reusable).unwrap();
        drop(ledger);
        let mut reopened = NonceLedger::open(&path).unwrap();
        assert!(matches!(
            reopened.spend(&single),
            Err(TokenError::AlreadyUsed { .. })
        ));
    }
}
