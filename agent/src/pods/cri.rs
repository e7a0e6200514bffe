//! The CRI client (k8s-cri's `runtime.v1` protos over tonic) on containerd's Unix socket: one
//! method per call the runner makes, each error naming its call.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

use super::PodsError;

/// A connection to a CRI runtime (both services share the channel).
#[derive(Debug, Clone)]
pub struct Cri {
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
}

fn err(call: &'static str) -> impl FnOnce(tonic::Status) -> PodsError {
    move |source| PodsError::Cri { call, source }
}

impl Cri {
    pub async fn connect(socket: &Path) -> Result<Self, PodsError> {
        let path = socket.to_owned();
        // The URI is required by tonic but unused: the connector dials the socket.
        let channel =
            Endpoint::from_static("http://[::1]:0")
                .connect_timeout(Duration::from_secs(5))
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?))
                    }
                }))
                .await
                .map_err(|source| PodsError::Connect {
                    socket: socket.display().to_string(),
                    source,
                })?;
        Ok(Self {
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
        })
    }

    /// The runtime's name and version (`containerd`, `1.6.20~ds1`).
    pub async fn version(&mut self) -> Result<cri::VersionResponse, PodsError> {
        self.runtime
            .version(cri::VersionRequest::default())
            .await
            .map(tonic::Response::into_inner)
            .map_err(err("Version"))
    }

    /// The image's id if the runtime holds `image` (`None` if it does not).
    pub async fn image_id(&mut self, image: &str) -> Result<Option<String>, PodsError> {
        let reply = self
            .images
            .image_status(cri::ImageStatusRequest {
                image: Some(cri::ImageSpec {
                    image: image.to_owned(),
                    ..Default::default()
                }),
                verbose: false,
            })
            .await
            .map_err(err("ImageStatus"))?
            .into_inner();
        Ok(reply.image.map(|i| i.id))
    }

    pub async fn run_pod_sandbox(
        &mut self,
        config: cri::PodSandboxConfig,
    ) -> Result<String, PodsError> {
        Ok(self
            .runtime
            .run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(config),
                runtime_handler: String::new(),
            })
            .await
            .map_err(err("RunPodSandbox"))?
            .into_inner()
            .pod_sandbox_id)
    }

    pub async fn stop_pod_sandbox(&mut self, id: &str) -> Result<(), PodsError> {
        self.runtime
            .stop_pod_sandbox(cri::StopPodSandboxRequest {
                pod_sandbox_id: id.to_owned(),
            })
            .await
            .map_err(err("StopPodSandbox"))?;
        Ok(())
    }

    pub async fn remove_pod_sandbox(&mut self, id: &str) -> Result<(), PodsError> {
        self.runtime
            .remove_pod_sandbox(cri::RemovePodSandboxRequest {
                pod_sandbox_id: id.to_owned(),
            })
            .await
            .map_err(err("RemovePodSandbox"))?;
        Ok(())
    }

    pub async fn pod_sandbox_status(
        &mut self,
        id: &str,
    ) -> Result<cri::PodSandboxStatus, PodsError> {
        self.runtime
            .pod_sandbox_status(cri::PodSandboxStatusRequest {
                pod_sandbox_id: id.to_owned(),
                verbose: false,
            })
            .await
            .map_err(err("PodSandboxStatus"))?
            .into_inner()
            .status
            .ok_or_else(|| PodsError::Cri {
                call: "PodSandboxStatus",
                source: tonic::Status::internal("the answer holds no status"),
            })
    }

    /// The sandboxes carrying every label of `labels`.
    pub async fn list_pod_sandboxes(
        &mut self,
        labels: HashMap<String, String>,
    ) -> Result<Vec<cri::PodSandbox>, PodsError> {
        Ok(self
            .runtime
            .list_pod_sandbox(cri::ListPodSandboxRequest {
                filter: Some(cri::PodSandboxFilter {
                    label_selector: labels,
                    ..Default::default()
                }),
            })
            .await
            .map_err(err("ListPodSandbox"))?
            .into_inner()
            .items)
    }

    /// The containers of sandbox `sandbox` (every state).
    pub async fn list_containers(
        &mut self,
        sandbox: &str,
    ) -> Result<Vec<cri::Container>, PodsError> {
        Ok(self
            .runtime
            .list_containers(cri::ListContainersRequest {
                filter: Some(cri::ContainerFilter {
                    pod_sandbox_id: sandbox.to_owned(),
                    ..Default::default()
                }),
            })
            .await
            .map_err(err("ListContainers"))?
            .into_inner()
            .containers)
    }

    /// The containers (every state, every sandbox) that carry all of `labels`.
    pub async fn containers_labelled(
        &mut self,
        labels: HashMap<String, String>,
    ) -> Result<Vec<cri::Container>, PodsError> {
        Ok(self
            .runtime
            .list_containers(cri::ListContainersRequest {
                filter: Some(cri::ContainerFilter {
                    label_selector: labels,
                    ..Default::default()
                }),
            })
            .await
            .map_err(err("ListContainers"))?
            .into_inner()
            .containers)
    }

    pub async fn create_container(
        &mut self,
        sandbox: &str,
        config: cri::ContainerConfig,
        sandbox_config: cri::PodSandboxConfig,
    ) -> Result<String, PodsError> {
        Ok(self
            .runtime
            .create_container(cri::CreateContainerRequest {
                pod_sandbox_id: sandbox.to_owned(),
                config: Some(config),
                sandbox_config: Some(sandbox_config),
            })
            .await
            .map_err(err("CreateContainer"))?
            .into_inner()
            .container_id)
    }

    pub async fn start_container(&mut self, id: &str) -> Result<(), PodsError> {
        self.runtime
            .start_container(cri::StartContainerRequest {
                container_id: id.to_owned(),
            })
            .await
            .map_err(err("StartContainer"))?;
        Ok(())
    }

    /// Stops a container: SIGTERM (or the image's stop signal), SIGKILL after `timeout` s.
    pub async fn stop_container(&mut self, id: &str, timeout: i64) -> Result<(), PodsError> {
        self.runtime
            .stop_container(cri::StopContainerRequest {
                container_id: id.to_owned(),
                timeout,
            })
            .await
            .map_err(err("StopContainer"))?;
        Ok(())
    }

    pub async fn remove_container(&mut self, id: &str) -> Result<(), PodsError> {
        self.runtime
            .remove_container(cri::RemoveContainerRequest {
                container_id: id.to_owned(),
            })
            .await
            .map_err(err("RemoveContainer"))?;
        Ok(())
    }

    pub async fn container_status(&mut self, id: &str) -> Result<cri::ContainerStatus, PodsError> {
        self.runtime
            .container_status(cri::ContainerStatusRequest {
                container_id: id.to_owned(),
                verbose: false,
            })
            .await
            .map_err(err("ContainerStatus"))?
            .into_inner()
            .status
            .ok_or_else(|| PodsError::Cri {
                call: "ContainerStatus",
                source: tonic::Status::internal("the answer holds no status"),
            })
    }

    /// Runs `command` in a container and returns its exit code (an exec probe); `timeout` in
    /// seconds.
    pub async fn exec_sync(
        &mut self,
        id: &str,
        command: &[String],
        timeout: i64,
    ) -> Result<i32, PodsError> {
        Ok(self
            .runtime
            .exec_sync(cri::ExecSyncRequest {
                container_id: id.to_owned(),
                cmd: command.to_vec(),
                timeout,
            })
            .await
            .map_err(err("ExecSync"))?
            .into_inner()
            .exit_code)
    }
}
