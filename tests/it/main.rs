//! The integration tests: one test binary, one module per scenario, sharing the harness in
//! `support/` (built once, linked once).

mod support;

mod architecture;
mod bench_tools;
mod ca_api;
mod ca_cli;
mod ca_k8s;
mod ca_rotation;
mod chaos;
mod compose;
mod console;
mod control_plane;
mod control_plane_ha;
mod demo;
mod differential;
mod ebpf_redirect;
mod flows;
mod identity_rotation;
mod inject;
mod kube_install;
mod kube_pods;
mod policy_cli;
mod quickstart;
mod release_profile;
mod sidecar_admin;
mod sidecar_app_pool;
mod sidecar_attacks;
mod sidecar_authz;
mod sidecar_balancing;
mod sidecar_bypass;
mod sidecar_clients;
mod sidecar_flow_control;
mod sidecar_grpc;
mod sidecar_hot_swap;
mod sidecar_local_listeners;
mod sidecar_parking;
mod sidecar_ports;
mod sidecar_rotation;
mod sidecar_runtime;
mod sidecar_streaming;
mod sidecar_tcp;
mod sidecar_tls;
mod telemetry;
