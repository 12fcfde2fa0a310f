//! meshgate-ebpf: the eBPF programs that steer a workload's connections into its sidecar and
//! enforce L3/L4 fallback rules, and their aya loader.
//!
//! Not built yet: the eBPF issue brings it. The crate exists now so the workspace has its final
//! shape (DESIGN.md §1).
