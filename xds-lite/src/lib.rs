//! meshgate-xds: the policy and discovery model, its validation, the control-plane server and the
//! client sidecars use to watch it.
//!
//! Not built yet: the sidecar issue brings the policy model and evaluator, the control-plane issue
//! the server and client. The crate exists now so the workspace has its final shape (DESIGN.md §1).
