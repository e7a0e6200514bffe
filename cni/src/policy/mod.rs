//! NetworkPolicy (networking.k8s.io/v1): the API types, their validation, and the reference
//! evaluator of the upstream semantics. The evaluator is the single statement of what policy
//! means here: `slipway policy explain` answers with it, and the datapath's compiled state is
//! checked against it. Pure: no I/O.
//!
//! Semantics (Kubernetes API reference, "NetworkPolicy"): a pod that no policy selects in a
//! direction is open in that direction; policies are additive (a connection is allowed if any
//! rule of any policy selecting the pod allows it); a connection needs both the source's egress
//! and the destination's ingress to allow it; `policyTypes` defaults to Ingress, plus Egress
//! when the policy has egress rules.

pub mod compile;
pub mod eval;
pub mod types;

pub use eval::{Decision, Endpoint, Reason, evaluate};
pub use types::{
    IPBlock, IntOrString, LabelSelector, NetworkPolicy, NetworkPolicyEgressRule,
    NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec, PolicyExt,
    Rule,
};
