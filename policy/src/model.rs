//! Policy documents as plain serde types.
//!
//! Every resource is a whole YAML document (`apiVersion`, `kind`, `metadata`, `spec`), in camelCase
//! like Istio's, so users can carry their habits over. The Rust types hold only `metadata` and
//! `spec`: `apiVersion` and `kind` are checked on the way in and written back on the way out (see
//! [`Envelope`]), so a value can never carry a kind that contradicts its type. Unknown fields are
//! refused everywhere (`deny_unknown_fields`): a misspelt `notPath` must not silently widen a
//! policy.
//!
//! These types check shape only; meaning (patterns, ports, names, duplicates) is checked by
//! [`crate::validate`] when a directory is loaded.

use ipnet::IpNet;
use meshgate_spiffe::SpiffeId;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The only `apiVersion` understood; a future `v2` must be refused, not half-read.
pub const API_VERSION: &str = "meshgate.dev/v1";

/// The root namespace: policies here apply mesh-wide, and the `MeshConfig` lives here.
pub const ROOT_NAMESPACE: &str = "meshgate";

/// `metadata`: the resource's identity; `namespace/name` is unique per kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    pub name: String,
    pub namespace: String,
}

impl Metadata {
    /// `namespace/name`, the key used in decisions, logs and duplicate checks.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// The on-disk document shape shared by every kind. Resources deserialize through it (and
/// serialize back into it), which is where `apiVersion` and `kind` are enforced.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Envelope<S> {
    pub api_version: String,
    pub kind: String,
    pub metadata: Metadata,
    pub spec: S,
}

/// Why a document could not become the resource its type names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("unsupported apiVersion {0:?}: expected {API_VERSION:?}")]
    ApiVersion(String),
    #[error("kind {found:?} where {expected:?} was expected")]
    Kind {
        found: String,
        expected: &'static str,
    },
}

/// A resource kind: its document `kind` and how it is built from / split into an envelope.
pub trait Resource: Sized {
    const KIND: &'static str;
    type Spec;
    fn from_parts(metadata: Metadata, spec: Self::Spec) -> Self;
    fn into_parts(self) -> (Metadata, Self::Spec);
    fn metadata(&self) -> &Metadata;
}

fn check_envelope<R: Resource>(env: Envelope<R::Spec>) -> Result<R, EnvelopeError> {
    if env.api_version != API_VERSION {
        return Err(EnvelopeError::ApiVersion(env.api_version));
    }
    if env.kind != R::KIND {
        return Err(EnvelopeError::Kind {
            found: env.kind,
            expected: R::KIND,
        });
    }
    Ok(R::from_parts(env.metadata, env.spec))
}

fn to_envelope<R: Resource>(r: R) -> Envelope<R::Spec> {
    let (metadata, spec) = r.into_parts();
    Envelope {
        api_version: API_VERSION.to_string(),
        kind: R::KIND.to_string(),
        metadata,
        spec,
    }
}

/// Declares a resource type as `{ metadata, spec }` that (de)serializes as a whole document.
macro_rules! resource {
    ($(#[$doc:meta])* $name:ident, $spec:ty, $kind:literal, $envelope:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        #[serde(try_from = $envelope, into = $envelope)]
        pub struct $name {
            pub metadata: Metadata,
            pub spec: $spec,
        }

        impl Resource for $name {
            const KIND: &'static str = $kind;
            type Spec = $spec;
            fn from_parts(metadata: Metadata, spec: $spec) -> Self {
                Self { metadata, spec }
            }
            fn into_parts(self) -> (Metadata, $spec) {
                (self.metadata, self.spec)
            }
            fn metadata(&self) -> &Metadata {
                &self.metadata
            }
        }

        impl TryFrom<Envelope<$spec>> for $name {
            type Error = EnvelopeError;
            fn try_from(env: Envelope<$spec>) -> Result<Self, EnvelopeError> {
                check_envelope(env)
            }
        }

        impl From<$name> for Envelope<$spec> {
            fn from(r: $name) -> Self {
                to_envelope(r)
            }
        }
    };
}

resource!(
    /// `kind: AuthorizationPolicy`: who may call which operations of the selected workloads.
    AuthorizationPolicy,
    AuthorizationPolicySpec,
    "AuthorizationPolicy",
    "Envelope<AuthorizationPolicySpec>"
);
resource!(
    /// `kind: Service`: where a service's sidecars listen and the SPIFFE ID they must present.
    Service,
    ServiceSpec,
    "Service",
    "Envelope<ServiceSpec>"
);
resource!(
    /// `kind: NetworkPolicy`: L3/L4 allowlists enforced by eBPF, below the mTLS layer.
    NetworkPolicy,
    NetworkPolicySpec,
    "NetworkPolicy",
    "Envelope<NetworkPolicySpec>"
);
resource!(
    /// `kind: MeshConfig`: mesh-wide defaults (at most one, in namespace `meshgate`).
    MeshConfig,
    MeshConfigSpec,
    "MeshConfig",
    "Envelope<MeshConfigSpec>"
);

impl Default for MeshConfig {
    /// The defaults in force when no `MeshConfig` document exists: zero trust (deny).
    fn default() -> Self {
        Self {
            metadata: Metadata {
                name: "default".to_string(),
                namespace: ROOT_NAMESPACE.to_string(),
            },
            spec: MeshConfigSpec::default(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// AuthorizationPolicy

/// `spec` of an AuthorizationPolicy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    /// Which workloads of the namespace enforce it; absent = all of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<Selector>,
    /// Required: a missing action must not default to something permissive.
    pub action: Action,
    #[serde(default)]
    pub mode: Mode,
    /// No rules = the policy matches nothing.
    #[serde(default)]
    pub rules: Vec<Rule>,
}

/// Picks workloads by service account (the `sa` segment of their SPIFFE ID).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Selector {
    pub account: String,
}

/// What a matching rule does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum Action {
    Allow,
    Deny,
    /// Marks the decision; never changes it.
    Audit,
}

/// Whether a policy decides (`enforce`) or is only evaluated and reported (`dry-run`), so a
/// change can be watched on live traffic before it blocks anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    #[default]
    Enforce,
    DryRun,
}

/// One rule: sources AND operations AND conditions. Empty lists are "no constraint".
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Any one must match (empty = any caller).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<Source>,
    /// Any one must match (empty = any operation).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<Operation>,
    /// All must match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub when: Vec<Condition>,
}

/// Who the caller is. Every non-empty field must match.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Source {
    /// SPIFFE IDs or patterns (`*`, `prefix*`, `*suffix`); any-of.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<String>,
    /// None-of.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_principals: Vec<String>,
}

/// What the caller does. Every non-empty field must match.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Operation {
    /// Exact, case-sensitive HTTP methods (RFC 9110 tokens).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_methods: Vec<String>,
    /// Path patterns: `/exact`, `/prefix/*`, `*suffix`, `*`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_paths: Vec<String>,
    /// Destination ports of the workload's app.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[serde(deserialize_with = "ports::list")]
    #[schemars(inner(range(min = 1)))]
    pub ports: Vec<u16>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[serde(deserialize_with = "ports::list")]
    #[schemars(inner(range(min = 1)))]
    pub not_ports: Vec<u16>,
}

/// A request-header condition: the header must be present, some value must match `values` (if
/// given) and no value may match `notValues`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Condition {
    /// Header name (case-insensitive, as in HTTP).
    pub header: String,
    /// Patterns: exact, `prefix*`, `*suffix`, `*`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_values: Vec<String>,
}

// ---------------------------------------------------------------------------------------------
// Service

/// `spec` of a Service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceSpec {
    /// The SPIFFE ID its servers must present (checked by the client side on every connection).
    #[schemars(with = "String", regex(pattern = "^spiffe://"))]
    pub identity: SpiffeId,
    /// `Host` header values (port stripped) that route to it.
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub ports: Vec<ServicePort>,
    /// Its sidecars' inbound addresses, `host:port`.
    #[serde(default)]
    pub endpoints: Vec<String>,
}

/// One port of a Service and what speaks on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ServicePort {
    /// The port callers address (a Kubernetes Service's `port`).
    #[serde(deserialize_with = "ports::one")]
    #[schemars(range(min = 1))]
    pub port: u16,
    #[serde(default)]
    pub protocol: Protocol,
    /// The app's port behind the callee's sidecar when it differs from `port` (a Kubernetes
    /// Service's `targetPort`): the caller's sidecar asks for this port, so the callee serves and
    /// judges the port its app really listens on.
    #[serde(
        rename = "targetPort",
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "ports::some"
    )]
    pub target_port: Option<u16>,
}

/// `tcp` is opaque: only L4 rules (identity, port) can apply to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Http,
    Grpc,
    Tcp,
}

// ---------------------------------------------------------------------------------------------
// NetworkPolicy

/// `spec` of a NetworkPolicy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NetworkPolicySpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<Selector>,
    #[serde(default)]
    pub egress: Vec<EgressRule>,
    #[serde(default)]
    pub ingress: Vec<IngressRule>,
}

/// Traffic the workload may send outside the mesh.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EgressRule {
    #[serde(deserialize_with = "cidrs::deserialize")]
    #[schemars(with = "Vec<String>")]
    pub to: Vec<IpNet>,
    /// Empty = every port.
    #[serde(default)]
    #[serde(deserialize_with = "ports::list")]
    #[schemars(inner(range(min = 1)))]
    pub ports: Vec<u16>,
}

/// Traffic the workload may receive from outside the mesh.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct IngressRule {
    #[serde(deserialize_with = "cidrs::deserialize")]
    #[schemars(with = "Vec<String>")]
    pub from: Vec<IpNet>,
    /// Empty = every port.
    #[serde(default)]
    #[serde(deserialize_with = "ports::list")]
    #[schemars(inner(range(min = 1)))]
    pub ports: Vec<u16>,
}

/// CIDR lists with an error that names the bad entry (ipnet's own says only "invalid IP address
/// syntax").
mod cidrs {
    use ipnet::IpNet;
    use serde::Deserialize;

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<IpNet>, D::Error> {
        Vec::<String>::deserialize(d)?
            .iter()
            .map(|s| {
                s.parse::<IpNet>().map_err(|_| {
                    serde::de::Error::custom(format!(
                        "invalid CIDR {s:?}: expected address/prefix, e.g. 10.0.0.0/8 or fd00::/8"
                    ))
                })
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// MeshConfig

/// `spec` of the MeshConfig.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MeshConfigSpec {
    /// What happens to a workload that no enforce-mode ALLOW policy selects. DENY by default
    /// (zero trust); note that Istio's default is allow.
    #[serde(default)]
    pub default_action: DefaultAction,
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
}

fn default_trust_domain() -> String {
    "mesh.local".to_string()
}

impl Default for MeshConfigSpec {
    fn default() -> Self {
        Self {
            default_action: DefaultAction::default(),
            trust_domain: default_trust_domain(),
        }
    }
}

/// The mesh default for workloads without ALLOW policies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum DefaultAction {
    #[default]
    Deny,
    Allow,
}

/// Port fields: a number that is not a port is refused with what to write instead, rather than
/// serde's "invalid u16" (which names a Rust type, not a port).
mod ports {
    use serde::Deserialize;
    use serde::de::{Deserializer, Error};

    const NOT_A_PORT: &str = "not a port number: use 1-65535";

    pub fn one<'de, D: Deserializer<'de>>(d: D) -> Result<u16, D::Error> {
        let n = u64::deserialize(d).map_err(|_| D::Error::custom(NOT_A_PORT))?;
        u16::try_from(n).map_err(|_| D::Error::custom(NOT_A_PORT))
    }

    pub fn some<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u16>, D::Error> {
        one(d).map(Some)
    }

    pub fn list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u16>, D::Error> {
        let list = Vec::<u64>::deserialize(d)?;
        list.into_iter()
            .map(|n| u16::try_from(n).map_err(|_| D::Error::custom(NOT_A_PORT)))
            .collect()
    }
}
