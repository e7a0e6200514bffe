//! Health-check node ports, as kube-proxy serves them: for each Service with
//! `externalTrafficPolicy: Local` and a `healthCheckNodePort`, an HTTP server on that port of
//! the node answers any GET with whether the node has a ready endpoint of the Service — 200 and
//! the count, or 503 with none — so that a load balancer sends the Service's traffic only to
//! nodes that serve it without leaving (the client's address kept). The body is kube-proxy's:
//! `{"service":{"namespace":..,"name":..},"localEndpoints":N,"serviceProxyHealthy":true}`.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};

use axum::Router;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use ipnetwork::Ipv4Network;
use serde::Serialize;
use slipway_api::networking::TrafficPolicy;
use tokio::task::AbortHandle;
use tracing::{info, warn};

use crate::services::LocalService;

/// What one health-check node port reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PortHealth {
    pub service: ServiceName,
    pub local_endpoints: usize,
    pub service_proxy_healthy: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServiceName {
    pub namespace: String,
    pub name: String,
}

/// The health-check node ports `services` ask for on the node of pod block `block`.
pub fn desired(services: &[LocalService], block: Ipv4Network) -> BTreeMap<u16, PortHealth> {
    services
        .iter()
        .filter(|s| s.external_traffic_policy == TrafficPolicy::Local)
        .filter_map(|s| {
            let (namespace, name) = s.name.split_once('/').unwrap_or(("", &s.name));
            let health = PortHealth {
                service: ServiceName {
                    namespace: namespace.to_owned(),
                    name: name.to_owned(),
                },
                local_endpoints: s.local_endpoints(block).count(),
                service_proxy_healthy: true,
            };
            Some((s.health_check_node_port?, health))
        })
        .collect()
}

/// The node's health-check node port servers: one listener per port, bound on every address of
/// the node, opened and closed as the services change.
#[derive(Debug, Default)]
pub struct HealthPorts {
    state: Arc<RwLock<BTreeMap<u16, PortHealth>>>,
    listeners: Mutex<BTreeMap<u16, AbortHandle>>,
}

impl HealthPorts {
    /// Serves what `services` ask for: reports change at once; a port no longer asked for is
    /// closed; a new one is opened (a port that cannot be bound is logged and tried again at
    /// the next update). Must run inside the tokio runtime.
    pub fn update(&self, services: &[LocalService], block: Ipv4Network) {
        let wanted = desired(services, block);
        if let Ok(mut state) = self.state.write() {
            *state = wanted.clone();
        }
        let Ok(mut listeners) = self.listeners.lock() else {
            return;
        };
        listeners.retain(|port, task| {
            let keep = wanted.contains_key(port);
            if !keep {
                task.abort();
                info!(port, "health-check node port closed");
            }
            keep
        });
        for port in wanted.keys() {
            if listeners.contains_key(port) {
                continue;
            }
            match self.listen(*port) {
                Ok(task) => {
                    info!(port, "health-check node port open");
                    listeners.insert(*port, task);
                }
                Err(e) => warn!(port, error = %e, "health-check node port: cannot listen"),
            }
        }
    }

    fn listen(&self, port: u16) -> std::io::Result<AbortHandle> {
        let listener =
            std::net::TcpListener::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)))?;
        listener.set_nonblocking(true)?;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let state = self.state.clone();
        let report = move || {
            let health = state.read().ok().and_then(|s| s.get(&port).cloned());
            async move {
                match health {
                    Some(h) if h.local_endpoints > 0 => {
                        (StatusCode::OK, axum::Json(h)).into_response()
                    }
                    Some(h) => (StatusCode::SERVICE_UNAVAILABLE, axum::Json(h)).into_response(),
                    None => StatusCode::NOT_FOUND.into_response(),
                }
            }
        };
        let app = Router::new().fallback(report);
        Ok(tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                warn!(port, error = %e, "health-check node port stopped");
            }
        })
        .abort_handle())
    }
}

impl Drop for HealthPorts {
    fn drop(&mut self) {
        if let Ok(listeners) = self.listeners.lock() {
            listeners.values().for_each(AbortHandle::abort);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::LocalServicePort;

    fn svc(name: &str, policy: TrafficPolicy, port: Option<u16>, eps: &[[u8; 4]]) -> LocalService {
        LocalService {
            name: name.into(),
            cluster_ip: Ipv4Addr::new(10, 96, 0, 1),
            ports: vec![LocalServicePort {
                port: 80,
                protocol: "TCP".into(),
                target_port: 8080,
                node_port: Some(30080),
            }],
            endpoints: eps.iter().map(|e| Ipv4Addr::from(*e)).collect(),
            load_balancer_ips: Vec::new(),
            external_traffic_policy: policy,
            health_check_node_port: port,
        }
    }

    #[test]
    fn local_services_report_their_endpoints_on_this_node() {
        let block: Ipv4Network = "10.244.1.0/24".parse().expect("block");
        let services = [
            svc(
                "shop/web",
                TrafficPolicy::Local,
                Some(31000),
                &[[10, 244, 1, 5], [10, 244, 1, 6], [10, 244, 2, 5]],
            ),
            svc(
                "shop/db",
                TrafficPolicy::Local,
                Some(31001),
                &[[10, 244, 2, 9]],
            ),
            svc("shop/api", TrafficPolicy::Cluster, None, &[[10, 244, 1, 7]]),
        ];
        let ports = desired(&services, block);
        assert_eq!(ports.keys().copied().collect::<Vec<_>>(), [31000, 31001]);
        assert_eq!(ports[&31000].local_endpoints, 2);
        assert_eq!(ports[&31000].service.namespace, "shop");
        assert_eq!(ports[&31001].local_endpoints, 0);
        let body = serde_json::to_value(&ports[&31000]).expect("json");
        assert_eq!(
            body,
            serde_json::json!({"service": {"namespace": "shop", "name": "web"},
                               "localEndpoints": 2, "serviceProxyHealthy": true})
        );
    }
}
