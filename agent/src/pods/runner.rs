//! The pod runner: given the Pods this host should run, it closes the gap over CRI and returns
//! their statuses. Level-triggered: every call lists what the runtime holds (sandboxes and
//! containers carry the runner's label and the pod's uid), so a restarted agent picks up where
//! the last one stopped; a sandbox whose Pod is no longer desired is torn down (each container
//! stopped with the pod's grace period, then the sandbox, which runs CNI DEL). It watches no
//! API: the caller feeds it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use k8s_cri::v1 as cri;
use k8s_openapi::api::core::v1::{Pod, PodStatus};
use k8s_openapi::jiff::Timestamp;
use tracing::{debug, info, warn};

use super::PodsError;
use super::cri::Cri;
use super::probe::{Action, ProbeSpec, ProbeState, network_probe};
use super::spec::{
    ANNOTATION_GRACE, ContainerSpec, LABEL_CONTAINER_HASH, LABEL_CONTAINER_NAME, LABEL_MANAGED,
    LABEL_POD_UID, PodSpec, RestartPolicy,
};
use super::status::{
    Backoff, ContainerView, Instance, InstanceState, SandboxView, Step, next_step, pod_status,
    refused, sandbox_failed,
};
use super::volumes::{Objects, Volumes};

/// How the runner lays pods out on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunnerConfig {
    /// Container logs go under `<log_root>/<namespace>_<name>_<uid>/<container>/<attempt>.log`.
    pub log_root: PathBuf,
    /// Pod cgroups go under this cgroupfs path (`/slipway/<host>`), one `pod<uid>` each.
    pub cgroup_parent: String,
    pub backoff: Backoff,
    /// The host's address, reported as `status.hostIP`.
    pub host_ip: Option<String>,
    /// The network namespace tcpSocket and httpGet probes connect from (the host's, where the
    /// pods' addresses route); `None` for the agent's own.
    pub probe_netns: Option<PathBuf>,
    /// The node's cluster DNS for pods with dnsPolicy ClusterFirst; `None`: they get the
    /// host's resolv.conf, as under kubelet without clusterDNS.
    pub dns: Option<super::dns::ClusterDns>,
    /// Pod volumes go under `<volume_root>/<uid>/volumes/` ([`Volumes`]).
    pub volume_root: PathBuf,
    /// The node's CSI plugin, for PersistentVolumeClaim volumes; `None`: pods with claims wait.
    pub csi: Option<super::claims::CsiNode>,
}

/// The host's resolv.conf (what the runtime copies into a pod with no DNS config).
const HOST_RESOLV_CONF: &str = "/etc/resolv.conf";

/// What one [`PodRunner::sync`] did.
#[derive(Debug, Default)]
pub struct SyncReport {
    /// Each desired Pod's status (`namespace/name`), or why it could not be computed this time.
    pub statuses: BTreeMap<String, Result<PodStatus, PodsError>>,
    /// Pods (`namespace/name`, uid) whose sandboxes were torn down.
    pub removed: Vec<String>,
    /// Teardowns that failed (retried at the next sync).
    pub errors: Vec<PodsError>,
}

#[derive(Debug)]
pub struct PodRunner {
    cri: Cri,
    config: RunnerConfig,
    /// Probe counters per (container id, liveness?); kubelet keeps them in memory too.
    probes: Mutex<HashMap<(String, bool), ProbeState>>,
    /// Containers probed during the current sync (the others' counters are dropped).
    probed: Mutex<HashSet<String>>,
}

/// One pod's sync: its own CRI handle, the runner's shared state. Pods sync concurrently, so a
/// slow one (a long grace period, a probe's timeout) never holds up another.
struct Worker<'a> {
    cri: Cri,
    config: &'a RunnerConfig,
    objects: &'a Objects,
    probes: &'a Mutex<HashMap<(String, bool), ProbeState>>,
    probed: &'a Mutex<HashSet<String>>,
}

/// The data behind a mutex, even if a panicking holder poisoned it (counters stay usable).
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn managed() -> HashMap<String, String> {
    HashMap::from([(LABEL_MANAGED.to_owned(), "slipway".to_owned())])
}

fn key(spec_ns: &str, name: &str) -> String {
    format!("{spec_ns}/{name}")
}

impl PodRunner {
    pub fn new(cri: Cri, config: RunnerConfig) -> Self {
        Self {
            cri,
            config,
            probes: Mutex::new(HashMap::new()),
            probed: Mutex::new(HashSet::new()),
        }
    }

    /// Runs `desired` and nothing else: starts what is missing, restarts what exited (by
    /// restartPolicy, with back-off), tears down sandboxes of Pods not in `desired` and their
    /// volumes. `objects` holds the ConfigMaps and Secrets the pods' volumes project
    /// ([`super::volumes::references`]).
    pub async fn sync(&mut self, desired: &[Pod], objects: &Objects) -> SyncReport {
        let mut report = SyncReport::default();
        let mut wanted = HashSet::new();
        lock(&self.probed).clear();
        // Pods being deleted (deletionTimestamp set) are torn down with their deletion grace
        // period, as kubelet does; they get no status from here.
        let mut deleting: HashMap<String, Option<i64>> = HashMap::new();
        let mut syncing = Vec::new();
        for pod in desired {
            let meta = &pod.metadata;
            let name = key(
                meta.namespace.as_deref().unwrap_or("default"),
                meta.name.as_deref().unwrap_or_default(),
            );
            if meta.deletion_timestamp.is_some() {
                if let Some(uid) = &meta.uid {
                    deleting.insert(uid.clone(), meta.deletion_grace_period_seconds);
                }
                continue;
            }
            if let Some(uid) = &meta.uid {
                wanted.insert(uid.clone());
            }
            syncing.push((name, pod));
        }
        let syncs = syncing.iter().map(|(_, pod)| {
            let mut worker = Worker {
                cri: self.cri.clone(),
                config: &self.config,
                objects,
                probes: &self.probes,
                probed: &self.probed,
            };
            async move { worker.sync_pod(pod).await }
        });
        let statuses = futures_util::future::join_all(syncs).await;
        for ((name, _), status) in syncing.into_iter().zip(statuses) {
            if let Err(error) = &status {
                warn!(pod = %name, error = %super::error_chain(error), "pod sync failed");
            }
            report.statuses.insert(name, status);
        }
        let sandboxes = match self.cri.list_pod_sandboxes(managed()).await {
            Ok(sandboxes) => sandboxes,
            Err(error) => {
                report.errors.push(error);
                return report;
            }
        };
        // Every unwanted pod at once: one pod's grace period never delays another's.
        let doomed: Vec<&cri::PodSandbox> = sandboxes
            .iter()
            .filter(|s| {
                !s.labels
                    .get(LABEL_POD_UID)
                    .is_some_and(|u| wanted.contains(u))
            })
            .collect();
        let teardowns = doomed.iter().map(|sandbox| {
            let grace = sandbox
                .labels
                .get(LABEL_POD_UID)
                .and_then(|u| deleting.get(u).copied().flatten());
            teardown(self.cri.clone(), &self.config, sandbox, grace)
        });
        let results = futures_util::future::join_all(teardowns).await;
        let probed = std::mem::take(&mut *lock(&self.probed));
        lock(&self.probes).retain(|(id, _), _| probed.contains(id));
        // Volumes stay while their pod is wanted or its teardown has to be tried again.
        let mut keep = wanted;
        for (sandbox, result) in doomed.into_iter().zip(results) {
            let meta = sandbox.metadata.clone().unwrap_or_default();
            match result {
                Ok(()) => {
                    info!(pod = %key(&meta.namespace, &meta.name), uid = %meta.uid, "pod removed");
                    report.removed.push(key(&meta.namespace, &meta.name));
                }
                Err(error) => {
                    keep.insert(meta.uid.clone());
                    report.errors.push(error);
                }
            }
        }
        let (swept, failed) =
            Volumes::new(self.config.volume_root.clone(), self.config.csi.clone())
                .sweep(&keep)
                .await;
        for uid in swept {
            debug!(%uid, "pod volumes removed");
        }
        if let Some(source) = failed {
            report.errors.push(PodsError::Io {
                what: "remove a pod's volumes",
                source,
            });
        }
        report
    }
}

impl Worker<'_> {
    async fn sync_pod(&mut self, pod: &Pod) -> Result<PodStatus, PodsError> {
        let spec = match PodSpec::from_pod(pod) {
            Ok(spec) => spec,
            Err(invalid) => {
                let lines: Vec<String> = invalid.errors.iter().map(ToString::to_string).collect();
                return Ok(refused(pod, "Invalid", lines.join("; ")));
            }
        };
        // Images are imported offline: a missing one is never pulled (kubelet's
        // ErrImageNeverPull), and the pod gets no sandbox (no address) until it is there.
        let mut missing = HashMap::new();
        for c in &spec.containers {
            if self.cri.image_id(&c.image_ref).await?.is_none() {
                missing.insert(
                    c.name.clone(),
                    format!(
                        "Container image \"{}\" is not present with pull policy of Never",
                        c.image
                    ),
                );
            }
        }
        let mut labels = managed();
        labels.insert(LABEL_POD_UID.to_owned(), spec.uid.clone());
        let sandboxes = self.cri.list_pod_sandboxes(labels).await?;
        let ready = sandboxes
            .iter()
            .filter(|s| s.state == cri::PodSandboxState::SandboxReady as i32)
            .max_by_key(|s| s.created_at)
            .cloned();
        // A pod that ran to completion (restartPolicy Never or OnFailure) keeps its stopped
        // sandbox: it is not started again.
        if ready.is_none()
            && spec.restart_policy != RestartPolicy::Always
            && let Some(newest) = sandboxes.iter().max_by_key(|s| s.created_at)
        {
            let status = self.observe(pod, &spec, &newest.id).await?;
            if terminal(&status) {
                return Ok(status);
            }
        }
        // Volumes first (and at every sync: an updated ConfigMap reaches running pods). A pod
        // whose volumes cannot be made yet gets no sandbox; a running one keeps what it has.
        let volumes = Volumes::new(self.config.volume_root.clone(), self.config.csi.clone());
        let (volume_dirs, unmounted) = match volumes
            .set_up(&spec.uid, &spec.namespace, &spec.volumes, self.objects)
            .await
        {
            Ok(dirs) => (dirs, None),
            Err(error) => {
                let message = super::error_chain(&error);
                warn!(pod = %key(&spec.namespace, &spec.name), %message, "volumes not set up");
                (volumes.dirs(&spec.uid, &spec.volumes), Some(message))
            }
        };
        let config = self.config;
        let sandbox_config = |attempt| {
            let mut sandbox = spec.sandbox_config(attempt, &config.log_root, &config.cgroup_parent);
            sandbox.dns_config = spec
                .dns
                .cri_config(&spec.namespace, config.dns.as_ref(), || {
                    crate::dns::resolv::ResolvConf::read(Path::new(HOST_RESOLV_CONF))
                        .unwrap_or_default()
                });
            sandbox
        };
        let (sandbox_id, attempt) = match ready {
            Some(s) => (s.id, s.metadata.map_or(0, |m| m.attempt)),
            None if !missing.is_empty() || unmounted.is_some() => {
                let views: Vec<ContainerView> = spec
                    .containers
                    .iter()
                    .map(|c| ContainerView {
                        waiting: Some(missing.get(&c.name).map_or_else(
                            || {
                                (
                                    "ContainerCreating".to_owned(),
                                    unmounted.clone().unwrap_or_default(),
                                )
                            },
                            |m| ("ErrImageNeverPull".to_owned(), m.clone()),
                        )),
                        ..Default::default()
                    })
                    .collect();
                return Ok(pod_status(
                    pod,
                    &spec,
                    None,
                    &views,
                    self.config.host_ip.as_deref(),
                    Timestamp::now(),
                ));
            }
            None => {
                // A sandbox that is not ready (its pause process died, the host rebooted) is
                // replaced, as kubelet does: its containers go with it.
                let attempt = sandboxes
                    .iter()
                    .filter_map(|s| s.metadata.as_ref().map(|m| m.attempt + 1))
                    .max()
                    .unwrap_or(0);
                for old in &sandboxes {
                    teardown(self.cri.clone(), self.config, old, Some(0)).await?;
                }
                let config = sandbox_config(attempt);
                std::fs::create_dir_all(&config.log_directory).map_err(|source| PodsError::Io {
                    what: "create the pod's log directory",
                    source,
                })?;
                let id = match self.cri.run_pod_sandbox(config).await {
                    Ok(id) => id,
                    // The pod waits (kubelet's FailedCreatePodSandBox) and the next sync tries
                    // again. containerd 1.6 keeps a NotReady record of the failed sandbox for
                    // the caller to remove.
                    Err(error) => {
                        let message = super::error_chain(&error);
                        warn!(pod = %key(&spec.namespace, &spec.name), %message,
                              "sandbox not created");
                        let mut labels = managed();
                        labels.insert(LABEL_POD_UID.to_owned(), spec.uid.clone());
                        // Best effort: without the network configuration containerd cannot
                        // run CNI DEL either; then the record goes at a later sync.
                        for failed in self.cri.list_pod_sandboxes(labels).await? {
                            if let Err(e) =
                                teardown(self.cri.clone(), self.config, &failed, Some(0)).await
                            {
                                warn!(sandbox = %failed.id, error = %super::error_chain(&e),
                                      "failed sandbox not removed yet");
                            }
                        }
                        return Ok(sandbox_failed(
                            pod,
                            &spec,
                            &message,
                            self.config.host_ip.as_deref(),
                            Timestamp::now(),
                        ));
                    }
                };
                info!(pod = %key(&spec.namespace, &spec.name), sandbox = %id, "sandbox ready");
                (id, attempt)
            }
        };
        let sandbox_status = self.cri.pod_sandbox_status(&sandbox_id).await?;
        let sandbox = sandbox_view(&sandbox_status);
        let mut containers = self.cri.list_containers(&sandbox_id).await?;
        // Containers the spec no longer names go (as kubelet kills them).
        let named: HashSet<&str> = spec.containers.iter().map(|c| c.name.as_str()).collect();
        let mut kept = Vec::new();
        for x in containers.drain(..) {
            let name = x.labels.get(LABEL_CONTAINER_NAME).map(String::as_str);
            if name.is_some_and(|n| named.contains(n)) {
                kept.push(x);
            } else {
                self.cri.stop_container(&x.id, spec.grace_seconds).await?;
                remove_container(&mut self.cri, &x.id).await?;
            }
        }
        let containers = kept;
        let ip = sandbox.ips.first().and_then(|ip| ip.parse::<IpAddr>().ok());
        let mut views = Vec::new();
        for c in &spec.containers {
            let view = self
                .sync_container(
                    ip,
                    &spec,
                    c,
                    &sandbox_id,
                    &containers,
                    missing.get(&c.name),
                    &volume_dirs,
                    || sandbox_config(attempt),
                )
                .await?;
            views.push(view);
        }
        let status = pod_status(
            pod,
            &spec,
            Some(&sandbox),
            &views,
            self.config.host_ip.as_deref(),
            Timestamp::now(),
        );
        if terminal(&status) && sandbox.ready {
            // As kubelet does: a finished pod's sandbox stops, and CNI DEL frees its address.
            self.cri.stop_pod_sandbox(&sandbox_id).await?;
            info!(pod = %key(&spec.namespace, &spec.name), "pod finished; sandbox stopped");
        }
        Ok(status)
    }

    /// The status of the pod in `sandbox_id` as it stands, changing nothing.
    async fn observe(
        &mut self,
        pod: &Pod,
        spec: &PodSpec,
        sandbox_id: &str,
    ) -> Result<PodStatus, PodsError> {
        let sandbox = sandbox_view(&self.cri.pod_sandbox_status(sandbox_id).await?);
        let containers = self.cri.list_containers(sandbox_id).await?;
        let mut views = Vec::new();
        for c in &spec.containers {
            let mut mine: Vec<&cri::Container> = containers
                .iter()
                .filter(|x| x.labels.get(LABEL_CONTAINER_NAME) == Some(&c.name))
                .collect();
            mine.sort_by_key(|x| std::cmp::Reverse(x.metadata.as_ref().map_or(0, |m| m.attempt)));
            let mut view = ContainerView::default();
            if let Some(x) = mine.first() {
                view.current = Some(self.instance(&x.id).await?);
            }
            if let Some(x) = mine.get(1) {
                view.previous = Some(self.instance(&x.id).await?);
            }
            views.push(view);
        }
        Ok(pod_status(
            pod,
            spec,
            Some(&sandbox),
            &views,
            self.config.host_ip.as_deref(),
            Timestamp::now(),
        ))
    }

    #[expect(
        clippy::too_many_arguments,
        reason = "one container's step needs the pod's view"
    )]
    async fn sync_container(
        &mut self,
        ip: Option<IpAddr>,
        spec: &PodSpec,
        c: &ContainerSpec,
        sandbox_id: &str,
        containers: &[cri::Container],
        missing: Option<&String>,
        volume_dirs: &HashMap<String, PathBuf>,
        sandbox_config: impl Fn() -> cri::PodSandboxConfig,
    ) -> Result<ContainerView, PodsError> {
        let mut mine: Vec<&cri::Container> = containers
            .iter()
            .filter(|x| x.labels.get(LABEL_CONTAINER_NAME) == Some(&c.name))
            .collect();
        mine.sort_by_key(|x| std::cmp::Reverse(x.metadata.as_ref().map_or(0, |m| m.attempt)));
        let mut current = match mine.first() {
            Some(x) => Some(self.instance(&x.id).await?),
            None => None,
        };
        let mut previous = match mine.get(1) {
            Some(x) => Some(self.instance(&x.id).await?),
            None => None,
        };
        if let Some(message) = missing {
            return Ok(ContainerView {
                current,
                previous,
                waiting: Some(("ErrImageNeverPull".to_owned(), message.clone())),
                ready: None,
            });
        }
        // A Pod's image may change in place: a container made from another spec is replaced
        // (kubelet's spec hash), counting as a restart.
        let changed = mine
            .first()
            .is_some_and(|x| x.labels.get(LABEL_CONTAINER_HASH) != Some(&c.hash()));
        let step = next_step(
            current.as_ref(),
            changed,
            spec.restart_policy,
            &self.config.backoff,
            Timestamp::now().as_nanosecond(),
        );
        let next_attempt = match step {
            Step::Keep => None,
            Step::Create { attempt } => Some(attempt),
            Step::Start { id } => {
                self.cri.start_container(&id).await?;
                current = Some(self.instance(&id).await?);
                None
            }
            Step::Replace { id, attempt } => {
                info!(pod = %key(&spec.namespace, &spec.name), container = %c.name,
                      "container spec changed; replacing it");
                self.cri.stop_container(&id, spec.grace_seconds).await?;
                current = Some(self.instance(&id).await?);
                Some(attempt)
            }
            Step::BackOff { delay } => {
                let message = format!(
                    "back-off {}s restarting failed container={} pod={}_{}({})",
                    delay.as_secs(),
                    c.name,
                    spec.name,
                    spec.namespace,
                    spec.uid
                );
                return Ok(ContainerView {
                    current,
                    previous,
                    waiting: Some(("CrashLoopBackOff".to_owned(), message)),
                    ready: None,
                });
            }
        };
        if let Some(attempt) = next_attempt {
            // Keep one dead instance (for lastState and `kubectl logs --previous`).
            for old in mine.iter().skip(1) {
                remove_container(&mut self.cri, &old.id).await?;
            }
            let id = self
                .cri
                .create_container(
                    sandbox_id,
                    spec.container_config(c, attempt, volume_dirs),
                    sandbox_config(),
                )
                .await?;
            self.cri.start_container(&id).await?;
            info!(pod = %key(&spec.namespace, &spec.name), container = %c.name, attempt, "container started");
            previous = current.take();
            current = Some(self.instance(&id).await?);
        }
        let mut ready = None;
        if let Some(i) = current
            .clone()
            .filter(|i| i.state == InstanceState::Running)
        {
            let ran = Duration::from_nanos(
                u64::try_from(Timestamp::now().as_nanosecond() - i128::from(i.started_at))
                    .unwrap_or(0),
            );
            if let Some(probe) = &c.liveness
                && !self.probe(&i, probe, true, ip, ran).await
            {
                info!(pod = %key(&spec.namespace, &spec.name), container = %c.name,
                      "liveness probe failed; the container will be restarted");
                self.cri.stop_container(&i.id, spec.grace_seconds).await?;
                lock(self.probes).remove(&(i.id.clone(), true));
                current = Some(self.instance(&i.id).await?);
            } else if let Some(probe) = &c.readiness {
                ready = Some(self.probe(&i, probe, false, ip, ran).await);
            }
        }
        Ok(ContainerView {
            current,
            previous,
            waiting: None,
            ready,
        })
    }

    /// Runs `probe` on `instance` if it is due and returns its verdict.
    async fn probe(
        &mut self,
        instance: &Instance,
        probe: &ProbeSpec,
        liveness: bool,
        ip: Option<IpAddr>,
        ran: Duration,
    ) -> bool {
        let key = (instance.id.clone(), liveness);
        lock(self.probed).insert(instance.id.clone());
        let now = std::time::Instant::now();
        {
            let mut probes = lock(self.probes);
            let state = probes
                .entry(key.clone())
                .or_insert_with(|| ProbeState::new(liveness));
            if !state.due(probe, ran, now) {
                return state.ok;
            }
        }
        let success = match (&probe.action, ip) {
            (Action::Exec(command), _) => {
                let timeout = i64::try_from(probe.timeout.as_secs()).unwrap_or(1);
                matches!(
                    tokio::time::timeout(
                        probe.timeout + Duration::from_secs(1),
                        self.cri.exec_sync(&instance.id, command, timeout),
                    )
                    .await,
                    Ok(Ok(0))
                )
            }
            (action, Some(ip)) => {
                network_probe(
                    self.config.probe_netns.as_deref(),
                    ip,
                    action,
                    probe.timeout,
                )
                .await
            }
            (_, None) => false,
        };
        lock(self.probes)
            .entry(key)
            .or_insert_with(|| ProbeState::new(liveness))
            .record(probe, success, now)
    }

    async fn instance(&mut self, id: &str) -> Result<Instance, PodsError> {
        let s = self.cri.container_status(id).await?;
        let state = match cri::ContainerState::try_from(s.state) {
            Ok(cri::ContainerState::ContainerCreated) => InstanceState::Created,
            Ok(cri::ContainerState::ContainerRunning) => InstanceState::Running,
            Ok(cri::ContainerState::ContainerExited) => InstanceState::Exited,
            _ => InstanceState::Unknown,
        };
        Ok(Instance {
            id: s.id,
            state,
            started_at: s.started_at,
            finished_at: s.finished_at,
            exit_code: s.exit_code,
            reason: s.reason,
            message: s.message,
            image_ref: s.image_ref,
            attempt: s.metadata.map_or(0, |m| m.attempt),
        })
    }
}

/// Stops every container of `sandbox` (all at once) with `grace` seconds, or the grace period
/// the pod had when its sandbox was made, then removes them, stops the sandbox (CNI DEL) and
/// removes it, its cgroup and its logs.
async fn teardown(
    mut cri: Cri,
    config: &RunnerConfig,
    sandbox: &cri::PodSandbox,
    grace: Option<i64>,
) -> Result<(), PodsError> {
    let grace: i64 = grace
        .or_else(|| sandbox.annotations.get(ANNOTATION_GRACE)?.parse().ok())
        .unwrap_or(30)
        .max(0);
    let containers = cri.list_containers(&sandbox.id).await?;
    // Every container, whatever the listing said: one listed as created or exited may have
    // started since, and StopContainer on a stopped one is a no-op.
    let stops = containers.iter().map(|c| {
        let mut cri = cri.clone();
        let id = c.id.clone();
        async move { cri.stop_container(&id, grace).await }
    });
    for result in futures_util::future::join_all(stops).await {
        result?;
    }
    for c in &containers {
        remove_container(&mut cri, &c.id).await?;
    }
    cri.stop_pod_sandbox(&sandbox.id).await?;
    cri.remove_pod_sandbox(&sandbox.id).await?;
    if let Some(uid) = sandbox.labels.get(LABEL_POD_UID) {
        let parent = format!("{}/pod{uid}", config.cgroup_parent.trim_end_matches('/'));
        remove_cgroup(Path::new("/sys/fs/cgroup"), &parent);
    }
    if let Some(meta) = &sandbox.metadata {
        let dir = config
            .log_root
            .join(format!("{}_{}_{}", meta.namespace, meta.name, meta.uid));
        let _ = std::fs::remove_dir_all(dir);
        Volumes::new(config.volume_root.clone(), config.csi.clone())
            .tear_down(&meta.uid)
            .await
            .map_err(|source| PodsError::Io {
                what: "remove a pod's volumes",
                source,
            })?;
    }
    Ok(())
}

/// Removes a stopped container. containerd learns of a task's exit from an event it handles
/// on its own time, so a container that exited (or was stopped) just now may still count as
/// running: stop it again and retry for a few seconds.
async fn remove_container(cri: &mut Cri, id: &str) -> Result<(), PodsError> {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match cri.remove_container(id).await {
            Ok(()) => return Ok(()),
            Err(error) if std::time::Instant::now() >= deadline => return Err(error),
            Err(error) => {
                debug!(container = %id, error = %super::error_chain(&error), "removal retried");
                let _ = cri.stop_container(id, 0).await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Whether a status is final (Succeeded or Failed).
fn terminal(status: &PodStatus) -> bool {
    matches!(status.phase.as_deref(), Some("Succeeded" | "Failed"))
}

fn sandbox_view(status: &cri::PodSandboxStatus) -> SandboxView {
    let mut ips = Vec::new();
    if let Some(network) = &status.network {
        if !network.ip.is_empty() {
            ips.push(network.ip.clone());
        }
        ips.extend(network.additional_ips.iter().map(|ip| ip.ip.clone()));
    }
    SandboxView {
        ready: status.state == cri::PodSandboxState::SandboxReady as i32,
        ips,
        created_at: status.created_at,
    }
}

/// Removes the cgroupfs directory `path` (and its empty children, deepest first) from every
/// hierarchy mounted under `root` (`/sys/fs/cgroup/<controller>`, and `unified` on hybrid
/// machines). Directories still holding processes stay; the next teardown retries.
pub fn remove_cgroup(root: &Path, path: &str) {
    let Ok(hierarchies) = std::fs::read_dir(root) else {
        return;
    };
    for hierarchy in hierarchies.flatten() {
        let dir = hierarchy.path().join(path.trim_start_matches('/'));
        remove_tree(&dir);
    }
}

fn remove_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&entry.path());
            }
        }
    }
    // cgroupfs: rmdir of a cgroup removes its control files with it.
    let _ = std::fs::remove_dir(dir);
}
