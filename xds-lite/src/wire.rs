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
    /// Appends `chunk` and returns the lines it completes, without their `\n`. A line longer than
    /// `max` bytes is an error however the stream was cut into chunks: whether it is still
    /// incomplete or arrived whole within one chunk. After an error the stream must be dropped.
    pub fn push(&mut self, chunk: &[u8], max: usize) -> Result<Vec<Vec<u8>>, String> {
        // What was pending holds no newline (an error clears it): only new bytes need scanning.
        let mut scan = self.pending.len();
        self.pending.extend_from_slice(chunk);
        let mut lines = Vec::new();
        let mut start = 0;
        while let Some(i) = self.pending[scan..].iter().position(|b| *b == b'\n') {
            let end = scan + i;
            if end - start > max {
                return Err(self.too_long(max));
            }
            lines.push(self.pending[start..end].to_vec());
            start = end + 1;
            scan = start;
        }
        // One drain per chunk (not one per line), so a chunk of many short lines stays linear.
        self.pending.drain(..start);
        if self.pending.len() > max {
            return Err(self.too_long(max));
        }
        Ok(lines)
    }

    fn too_long(&mut self, max: usize) -> String {
        self.pending.clear();
        format!("line longer than {max} bytes")
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

    /// Found by the `stream_decoder` fuzz target (fuzz/corpus/stream_decoder/regress-*): a line
    /// longer than `max` was accepted when its newline arrived in the same chunk as the bytes
    /// that made it too long, and refused only when the excess sat in the pending tail.
    #[test]
    fn line_buffer_refuses_a_long_line_whatever_the_chunking() {
        let line = b"0123456789\n";
        for cut in 0..=line.len() {
            let mut b = LineBuffer::default();
            let result = b
                .push(&line[..cut], 5)
                .and_then(|_| b.push(&line[cut..], 5));
            assert!(result.is_err(), "cut at {cut}: {result:?}");
        }
        // The whole line in one chunk, after a line that is fine.
        let mut b = LineBuffer::default();
        assert!(b.push(b"ok\n0123456789\nok\n", 5).is_err());
        // Exactly `max` bytes is fine, complete or pending.
        let mut b = LineBuffer::default();
        assert_eq!(b.push(b"01234\n56789", 5).unwrap(), vec![b"01234".to_vec()]);
        assert_eq!(b.push(b"\n", 5).unwrap(), vec![b"56789".to_vec()]);
    }

    #[test]
    fn line_buffer_keeps_empty_lines_and_cr() {
        let mut b = LineBuffer::default();
        let lines = b.push(b"\n\na\r\n", 5).unwrap();
        assert_eq!(lines, vec![b"".to_vec(), b"".to_vec(), b"a\r".to_vec()]);
        let many = vec![b'\n'; 100_000];
        assert_eq!(b.push(&many, 5).unwrap().len(), 100_000);
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
