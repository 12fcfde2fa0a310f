//! The xds-lite wire format (documented in `xds-lite/PROTOCOL.md`): newline-delimited JSON over
//! one long-lived HTTP/2 stream, `POST /v1/stream`. The control plane writes [`Push`] lines; the
//! sidecar writes one [`Ack`] line per push (an ACK, or a NACK with the error).

use serde::{Deserialize, Serialize};

use crate::load::PolicySet;
use crate::model::{AuthorizationPolicy, MeshConfig, NetworkPolicy, Service};

/// The one resource type of the stream: everything one workload needs, state of the world.
pub const SNAPSHOT_TYPE: &str = "meshgate.dev/v1/WorkloadSnapshot";
/// The stream's path.
pub const STREAM_PATH: &str = "/v1/stream";

/// The resources of one push (scoped to the receiving workload).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Resources {
    pub policies: Vec<AuthorizationPolicy>,
    pub services: Vec<Service>,
    pub network_policies: Vec<NetworkPolicy>,
    pub mesh_config: MeshConfig,
}

/// Control plane → sidecar.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Push {
    pub type_url: String,
    /// The policy version (same for every sidecar, so drift is a string comparison).
    pub version: String,
    /// Unique per push; the ACK/NACK names it.
    pub nonce: String,
    pub resources: Resources,
}

/// Sidecar → control plane: `error: None` is an ACK of `version`, otherwise a NACK.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Ack {
    pub nonce: String,
    pub version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Push {
    /// A push of `set` (already scoped).
    pub fn new(set: PolicySet, nonce: String) -> Self {
        Self {
            type_url: SNAPSHOT_TYPE.to_string(),
            version: set.version.clone(),
            nonce,
            resources: Resources {
                policies: set.policies,
                services: set.services,
                network_policies: set.network_policies,
                mesh_config: set.mesh_config,
            },
        }
    }

    /// The pushed resources as a policy set (for compiling on the sidecar).
    pub fn into_set(self) -> Result<PolicySet, String> {
        if self.type_url != SNAPSHOT_TYPE {
            return Err(format!("unknown resource type {:?}", self.type_url));
        }
        Ok(PolicySet {
            policies: self.resources.policies,
            services: self.resources.services,
            network_policies: self.resources.network_policies,
            mesh_config: self.resources.mesh_config,
            version: self.version,
        })
    }
}

/// Splits a byte stream into lines, keeping an incomplete tail for the next chunk; a line longer
/// than `max` is an error (a peer cannot make us buffer without bound).
#[derive(Debug, Default)]
pub struct LineBuffer {
    pending: Vec<u8>,
}

impl LineBuffer {
    pub fn push(&mut self, chunk: &[u8], max: usize) -> Result<Vec<Vec<u8>>, String> {
        self.pending.extend_from_slice(chunk);
        let mut lines = Vec::new();
        while let Some(i) = self.pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=i).collect();
            lines.push(line[..line.len() - 1].to_vec());
        }
        if self.pending.len() > max {
            return Err(format!("line longer than {max} bytes"));
        }
        Ok(lines)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_buffer_splits_across_chunks_and_bounds_lines() {
        let mut b = LineBuffer::default();
        assert_eq!(
            b.push(b"{\"a\":1}\n{\"b\"", 100).unwrap(),
            vec![b"{\"a\":1}".to_vec()]
        );
        assert_eq!(b.push(b":2}\n", 100).unwrap(), vec![b"{\"b\":2}".to_vec()]);
        assert!(b.push(&[b'x'; 200], 100).is_err());
    }

    #[test]
    fn ack_round_trip() {
        let nack = Ack {
            nonce: "n".into(),
            version: "v".into(),
            error: Some("bad".into()),
        };
        let text = serde_json::to_string(&nack).unwrap();
        assert_eq!(serde_json::from_str::<Ack>(&text).unwrap(), nack);
        assert!(serde_json::from_str::<Ack>(r#"{"nonce":"n","version":"v","extra":1}"#).is_err());
    }
}
