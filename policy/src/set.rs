//! The in-memory policy set: every document of a policy directory, after validation.

use crate::model::{AuthorizationPolicy, MeshConfig, NetworkPolicy, Service};

/// Every document of a policy directory, validated, with a content version.
#[derive(Debug, Clone, Default)]
pub struct PolicySet {
    pub policies: Vec<AuthorizationPolicy>,
    pub services: Vec<Service>,
    pub network_policies: Vec<NetworkPolicy>,
    pub mesh_config: MeshConfig,
    /// Short hash of the documents' content: equal content, equal version.
    pub version: String,
}
