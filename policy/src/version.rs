//! The content version of a policy set: equal content, equal version, whatever the file layout.
//!
//! Sidecars ACK versions and `meshgate status` compares them, so the version must not change when
//! files are renamed, split or reordered, and must change when any document does. Documents are
//! hashed in canonical order (kind, then `namespace/name`) in their serialized JSON form.

use serde::Serialize;

use crate::model::{Metadata, Resource};
use crate::set::PolicySet;

/// Hex digits kept: 64 bits, plenty to tell versions apart, short enough for logs and metrics.
const VERSION_HEX_LEN: usize = 16;

fn hash_kind<R: Resource + Serialize>(ctx: &mut ring::digest::Context, docs: &[R]) {
    let mut sorted: Vec<&R> = docs.iter().collect();
    sorted.sort_by(|a, b| key(a.metadata()).cmp(&key(b.metadata())));
    for doc in sorted {
        ctx.update(R::KIND.as_bytes());
        ctx.update(b"\0");
        // Serializing our own plain types to JSON cannot fail.
        ctx.update(&serde_json::to_vec(doc).unwrap_or_default());
        ctx.update(b"\n");
    }
}

fn key(m: &Metadata) -> (&str, &str) {
    (&m.namespace, &m.name)
}

/// Short hex SHA-256 of the set's documents in canonical order.
pub fn content_version(set: &PolicySet) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    hash_kind(&mut ctx, &set.policies);
    hash_kind(&mut ctx, &set.services);
    hash_kind(&mut ctx, &set.network_policies);
    hash_kind(&mut ctx, std::slice::from_ref(&set.mesh_config));
    let digest = ctx.finish();
    let mut hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    hex.truncate(VERSION_HEX_LEN);
    hex
}

impl PolicySet {
    /// Recomputes [`PolicySet::version`] from the content (after building a set in code).
    pub fn update_version(&mut self) {
        self.version = content_version(self);
    }
}
