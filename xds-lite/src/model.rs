//! Policy documents as plain serde types. (Interface; implementation in progress.)

/// `kind: AuthorizationPolicy`.
#[derive(Debug, Clone, PartialEq)]
pub struct AuthorizationPolicy {}

/// `kind: Service`: where a service's sidecars listen and the SPIFFE ID they must present.
#[derive(Debug, Clone, PartialEq)]
pub struct Service {}

/// `kind: NetworkPolicy`.
#[derive(Debug, Clone, PartialEq)]
pub struct NetworkPolicy {}

/// `kind: MeshConfig`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct MeshConfig {}
