//! Controllers the supervisor runs beside its API server. Each is a kube-rs client of the
//! supervisor's own API with the controllers' identity (`system:slipway:controllers`, a client
//! certificate issued at start into `DIR/controllers.kubeconfig`), level-triggered and safe to
//! stop at any point.

pub mod clusters;
pub mod host_health;
pub mod loadbalancers;
pub mod vips;
pub mod volume_plan;
pub mod volumes;
