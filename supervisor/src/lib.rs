//! The Slipway supervisor: Kubernetes-style API server, auth and RBAC, store backends, reconcilers.
#![forbid(unsafe_code)]
