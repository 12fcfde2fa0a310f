//! meshgate-xds: the control plane. The xds-lite wire format ([`wire`], specified in
//! `PROTOCOL.md`), the server that pushes each sidecar the part of the policy that applies to it
//! ([`server`]), the client a sidecar runs ([`client`]), and the live tap of decisions
//! ([`tap`]). The policy itself — model,
//! validation, scoping, evaluation — is `meshgate-policy`.

#![forbid(unsafe_code)]

pub mod client;
pub mod flows;
pub mod server;
pub mod tap;
pub mod wire;
