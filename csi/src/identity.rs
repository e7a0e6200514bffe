//! The CSI Identity service: plugin name, version and capabilities (CSI spec, "Identity Service
//! RPC"), shared by the controller and node plugins.

use std::collections::HashMap;

use tonic::{Request, Response, Status};

use crate::proto::identity_server::Identity;
use crate::proto::plugin_capability::{self, service, volume_expansion};
use crate::proto::{
    GetPluginCapabilitiesRequest, GetPluginCapabilitiesResponse, GetPluginInfoRequest,
    GetPluginInfoResponse, PluginCapability, ProbeRequest, ProbeResponse,
};

/// The driver name (CSI spec: reverse domain name, at most 63 characters).
pub const DRIVER_NAME: &str = slipway_api::volumes::DRIVER;

/// The topology key whose value is the zone of a node or a block store.
pub const ZONE_KEY: &str = slipway_api::volumes::ZONE_TOPOLOGY_KEY;

/// Identity of one plugin process.
#[derive(Debug, Clone)]
pub struct IdentityService {
    /// Whether this process serves the Controller service.
    pub controller: bool,
}

impl IdentityService {
    /// The plugin capabilities this process really has.
    pub fn capabilities(&self) -> Vec<PluginCapability> {
        let service = |t: service::Type| PluginCapability {
            r#type: Some(plugin_capability::Type::Service(
                plugin_capability::Service { r#type: t as i32 },
            )),
        };
        let mut caps = vec![service(service::Type::VolumeAccessibilityConstraints)];
        if self.controller {
            caps.push(service(service::Type::ControllerService));
            // The block store grows a volume while it is attached; the node grows the
            // filesystem while it is mounted.
            caps.push(PluginCapability {
                r#type: Some(plugin_capability::Type::VolumeExpansion(
                    plugin_capability::VolumeExpansion {
                        r#type: volume_expansion::Type::Online as i32,
                    },
                )),
            });
        }
        caps
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _req: Request<GetPluginInfoRequest>,
    ) -> Result<Response<GetPluginInfoResponse>, Status> {
        Ok(Response::new(GetPluginInfoResponse {
            name: DRIVER_NAME.into(),
            vendor_version: env!("CARGO_PKG_VERSION").into(),
            manifest: HashMap::new(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _req: Request<GetPluginCapabilitiesRequest>,
    ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        Ok(Response::new(GetPluginCapabilitiesResponse {
            capabilities: self.capabilities(),
        }))
    }

    async fn probe(&self, _req: Request<ProbeRequest>) -> Result<Response<ProbeResponse>, Status> {
        Ok(Response::new(ProbeResponse { ready: Some(true) }))
    }
}
