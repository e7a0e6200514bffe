//! A Pod's status from what the runtime reports (kubelet's `getPhase` and
//! `generateAPIPodStatus`), and the restart back-off. Pure: the runner observes, this decides.

use std::time::Duration;

use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
    ContainerStatus, Pod, PodCondition, PodIP, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

use super::spec::{PodSpec, RestartPolicy};

/// kubelet's crash-loop back-off: the first restart at once, then `initial` doubling up to `max`
/// (10 s and 5 min in kubelet). A container that ran for twice `max` before exiting starts the
/// sequence again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_secs(10),
            max: Duration::from_secs(300),
        }
    }
}

impl Backoff {
    /// How long after a container that had restarted `restarts` times and ran for `ran` exited
    /// the runner waits before starting it again.
    pub fn delay(&self, restarts: u32, ran: Duration) -> Duration {
        if restarts == 0 || ran >= self.max * 2 {
            return Duration::ZERO;
        }
        let factor = 1u32.checked_shl(restarts - 1).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }
}

/// Whether a container that exited with `exit_code` is started again under `policy`.
pub fn should_restart(policy: RestartPolicy, exit_code: i32) -> bool {
    match policy {
        RestartPolicy::Always => true,
        RestartPolicy::OnFailure => exit_code != 0,
        RestartPolicy::Never => false,
    }
}

/// What the runner does next with one container of a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Leave it (running, or exited for good).
    Keep,
    /// Create and start instance `attempt`.
    Create { attempt: u32 },
    /// Start the created instance `id`.
    Start { id: String },
    /// Stop `id` (its spec changed), then create instance `attempt`.
    Replace { id: String, attempt: u32 },
    /// Exited and due for a restart, but not before `delay` after its exit.
    BackOff { delay: Duration },
}

/// The next step for a container whose newest instance is `current`, at `now` (nanoseconds
/// since the epoch): kubelet's `computePodActions` for one container.
pub fn next_step(
    current: Option<&Instance>,
    spec_changed: bool,
    policy: RestartPolicy,
    backoff: &Backoff,
    now: i128,
) -> Step {
    let Some(i) = current else {
        return Step::Create { attempt: 0 };
    };
    match i.state {
        _ if spec_changed && i.state != InstanceState::Exited => Step::Replace {
            id: i.id.clone(),
            attempt: i.attempt + 1,
        },
        _ if spec_changed => Step::Create {
            attempt: i.attempt + 1,
        },
        InstanceState::Created => Step::Start { id: i.id.clone() },
        InstanceState::Exited if should_restart(policy, i.exit_code) => {
            let ran = Duration::from_nanos(
                u64::try_from(i.finished_at.saturating_sub(i.started_at)).unwrap_or(0),
            );
            let delay = backoff.delay(i.attempt, ran);
            let since = now - i128::from(i.finished_at);
            if since < i128::try_from(delay.as_nanos()).unwrap_or(i128::MAX) {
                Step::BackOff { delay }
            } else {
                Step::Create {
                    attempt: i.attempt + 1,
                }
            }
        }
        _ => Step::Keep,
    }
}

/// The state of one container instance as the runtime reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    pub id: String,
    pub state: InstanceState,
    /// Nanoseconds since the epoch (0 when not yet).
    pub started_at: i64,
    pub finished_at: i64,
    pub exit_code: i32,
    pub reason: String,
    pub message: String,
    pub image_ref: String,
    pub attempt: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstanceState {
    Created,
    Running,
    Exited,
    Unknown,
}

/// What the runner saw of one container of the spec.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerView {
    /// The newest instance.
    pub current: Option<Instance>,
    /// The one before it (its end is `lastState`).
    pub previous: Option<Instance>,
    /// Why the container waits, when the runner holds it back (`ErrImageNeverPull`,
    /// `CrashLoopBackOff`) with a message.
    pub waiting: Option<(String, String)>,
    /// The readiness probe's verdict; `None` without one (running is ready).
    pub ready: Option<bool>,
}

/// What the runner saw of a pod's sandbox.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SandboxView {
    pub ready: bool,
    pub ips: Vec<String>,
    /// Nanoseconds since the epoch.
    pub created_at: i64,
}

fn time(nanos: i64) -> Option<Time> {
    (nanos > 0)
        .then(|| Timestamp::from_nanosecond(i128::from(nanos)).ok())
        .flatten()
        .map(Time)
}

fn terminated(i: &Instance) -> ContainerStateTerminated {
    ContainerStateTerminated {
        container_id: Some(format!("containerd://{}", i.id)),
        exit_code: i.exit_code,
        reason: Some(if i.reason.is_empty() {
            if i.exit_code == 0 {
                "Completed"
            } else {
                "Error"
            }
            .to_owned()
        } else {
            i.reason.clone()
        }),
        message: (!i.message.is_empty()).then(|| i.message.clone()),
        started_at: time(i.started_at),
        finished_at: time(i.finished_at),
        signal: None,
    }
}

fn waiting(reason: &str, message: Option<String>) -> ContainerState {
    ContainerState {
        waiting: Some(ContainerStateWaiting {
            reason: Some(reason.to_owned()),
            message,
        }),
        ..Default::default()
    }
}

fn container_status(spec: &super::spec::ContainerSpec, view: &ContainerView) -> ContainerStatus {
    let current = view.current.as_ref();
    let (state, last) = match (&view.waiting, current) {
        (Some((reason, message)), Some(c)) if c.state == InstanceState::Exited => {
            (waiting(reason, Some(message.clone())), Some(terminated(c)))
        }
        (Some((reason, message)), _) => (
            waiting(reason, Some(message.clone())),
            view.previous.as_ref().map(terminated),
        ),
        (None, None) => (waiting("ContainerCreating", None), None),
        (None, Some(c)) => {
            let state = match c.state {
                InstanceState::Running => ContainerState {
                    running: Some(ContainerStateRunning {
                        started_at: time(c.started_at),
                    }),
                    ..Default::default()
                },
                InstanceState::Exited => ContainerState {
                    terminated: Some(terminated(c)),
                    ..Default::default()
                },
                InstanceState::Created | InstanceState::Unknown => {
                    waiting("ContainerCreating", None)
                }
            };
            (state, view.previous.as_ref().map(terminated))
        }
    };
    let running = state.running.is_some();
    let ready = running && view.ready.unwrap_or(true);
    ContainerStatus {
        name: spec.name.clone(),
        image: spec.image.clone(),
        image_id: current.map(|c| c.image_ref.clone()).unwrap_or_default(),
        container_id: current.map(|c| format!("containerd://{}", c.id)),
        ready,
        started: Some(running),
        restart_count: current.map_or(0, |c| i32::try_from(c.attempt).unwrap_or(i32::MAX)),
        state: Some(state),
        last_state: Some(ContainerState {
            terminated: last,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// kubelet's `getPhase` for a pod without init containers.
fn phase(policy: RestartPolicy, statuses: &[ContainerStatus]) -> &'static str {
    let (mut waiting, mut running, mut stopped, mut succeeded) = (0, 0, 0, 0);
    for s in statuses {
        let state = s.state.clone().unwrap_or_default();
        let restarting = s
            .last_state
            .as_ref()
            .is_some_and(|l| l.terminated.is_some());
        if state.running.is_some() {
            running += 1;
        } else if let Some(t) = &state.terminated {
            stopped += 1;
            if t.exit_code == 0 {
                succeeded += 1;
            }
        } else if restarting {
            stopped += 1;
        } else {
            waiting += 1;
        }
    }
    if waiting > 0 {
        return "Pending";
    }
    if running > 0 {
        return "Running";
    }
    if stopped == 0 {
        return "Pending";
    }
    match policy {
        RestartPolicy::Always => "Running",
        RestartPolicy::OnFailure if stopped == succeeded => "Succeeded",
        RestartPolicy::OnFailure => "Running",
        RestartPolicy::Never if stopped == succeeded => "Succeeded",
        RestartPolicy::Never => "Failed",
    }
}

/// A condition, keeping the previous `lastTransitionTime` when its status did not change.
fn condition(pod: &Pod, kind: &str, ok: bool, reason: Option<&str>, now: &Time) -> PodCondition {
    let status = if ok { "True" } else { "False" };
    let before = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == kind));
    let since = match before {
        Some(b) if b.status == status => b.last_transition_time.clone(),
        _ => None,
    };
    PodCondition {
        type_: kind.to_owned(),
        status: status.to_owned(),
        reason: reason.filter(|_| !ok).map(str::to_owned),
        last_transition_time: Some(since.unwrap_or_else(|| now.clone())),
        observed_generation: pod.metadata.generation,
        ..Default::default()
    }
}

/// The PodStatus of `pod` given what the runner saw, at `now`.
pub fn pod_status(
    pod: &Pod,
    spec: &PodSpec,
    sandbox: Option<&SandboxView>,
    views: &[ContainerView],
    host_ip: Option<&str>,
    now: Timestamp,
) -> PodStatus {
    let now = Time(now);
    let statuses: Vec<ContainerStatus> = spec
        .containers
        .iter()
        .zip(views)
        .map(|(c, v)| container_status(c, v))
        .collect();
    let phase = phase(spec.restart_policy, &statuses);
    let all_ready = statuses.iter().all(|s| s.ready);
    let not_ready = if all_ready {
        None
    } else {
        Some("ContainersNotReady")
    };
    let sandbox_ready = sandbox.is_some_and(|s| s.ready);
    let ips: Vec<String> = sandbox.map(|s| s.ips.clone()).unwrap_or_default();
    let start_time = pod
        .status
        .as_ref()
        .and_then(|s| s.start_time.clone())
        .unwrap_or_else(|| now.clone());
    PodStatus {
        phase: Some(phase.to_owned()),
        conditions: Some(vec![
            condition(pod, "PodReadyToStartContainers", sandbox_ready, None, &now),
            condition(pod, "Initialized", true, None, &now),
            condition(pod, "Ready", all_ready, not_ready, &now),
            condition(pod, "ContainersReady", all_ready, not_ready, &now),
            condition(pod, "PodScheduled", true, None, &now),
        ]),
        pod_ip: ips.first().cloned(),
        pod_ips: (!ips.is_empty()).then(|| ips.iter().map(|ip| PodIP { ip: ip.clone() }).collect()),
        host_ip: host_ip.map(str::to_owned),
        start_time: Some(start_time),
        container_statuses: Some(statuses),
        qos_class: Some(qos_class(spec).to_owned()),
        ..Default::default()
    }
}

/// The status of a Pod whose sandbox could not be made: Pending, every container waiting in
/// ContainerCreating with the runtime's error, PodReadyToStartContainers False.
pub fn sandbox_failed(
    pod: &Pod,
    spec: &PodSpec,
    message: &str,
    host_ip: Option<&str>,
    now: Timestamp,
) -> PodStatus {
    let views: Vec<ContainerView> = spec
        .containers
        .iter()
        .map(|_| ContainerView {
            waiting: Some((
                "ContainerCreating".to_owned(),
                format!("FailedCreatePodSandBox: {message}"),
            )),
            ..Default::default()
        })
        .collect();
    let mut status = pod_status(pod, spec, None, &views, host_ip, now);
    for c in status.conditions.iter_mut().flatten() {
        if c.type_ == "PodReadyToStartContainers" {
            c.reason = Some("FailedCreatePodSandBox".to_owned());
            c.message = Some(message.to_owned());
        }
    }
    status
}

/// The status of a Pod the runner refused: phase Failed, nothing created.
pub fn refused(pod: &Pod, reason: &str, message: String) -> PodStatus {
    PodStatus {
        phase: Some("Failed".to_owned()),
        reason: Some(reason.to_owned()),
        message: Some(message),
        conditions: pod.status.as_ref().and_then(|s| s.conditions.clone()),
        ..Default::default()
    }
}

fn qos_class(spec: &PodSpec) -> &'static str {
    let limited = |c: &super::spec::ContainerSpec| {
        c.resources.cpu_quota > 0 && c.resources.memory_limit_in_bytes > 0
    };
    if spec
        .containers
        .iter()
        .all(|c| c.resources.cpu_shares <= 2 && c.resources.memory_limit_in_bytes == 0)
    {
        "BestEffort"
    } else if spec.containers.iter().all(limited) {
        "Guaranteed"
    } else {
        "Burstable"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn back_off_doubles_from_the_second_restart_up_to_the_cap() {
        let b = Backoff::default();
        let ran = Duration::from_secs(1);
        let delays: Vec<u64> = (0..8).map(|n| b.delay(n, ran).as_secs()).collect();
        assert_eq!(delays, [0, 10, 20, 40, 80, 160, 300, 300]);
        assert_eq!(b.delay(40, ran), b.max);
        // A container that ran long enough starts the sequence again.
        assert_eq!(b.delay(5, Duration::from_secs(601)), Duration::ZERO);
    }

    fn fixture(policy: &str) -> (Pod, PodSpec) {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p", "uid": "u", "generation": 2},
            "spec": {"restartPolicy": policy, "containers": [{"name": "c", "image": "busybox"}]}
        }))
        .unwrap();
        let spec = PodSpec::from_pod(&pod).unwrap();
        (pod, spec)
    }

    fn instance(state: InstanceState, exit_code: i32, attempt: u32) -> Instance {
        Instance {
            id: format!("id{attempt}"),
            state,
            started_at: 1_000_000_000,
            finished_at: if state == InstanceState::Exited {
                2_000_000_000
            } else {
                0
            },
            exit_code,
            reason: String::new(),
            message: String::new(),
            image_ref: "sha256:abc".into(),
            attempt,
        }
    }

    #[test]
    fn next_steps_follow_policy_back_off_and_spec_changes() {
        let b = Backoff::default();
        let secs = |s: i128| s * 1_000_000_000;
        let step =
            |i: Option<&Instance>, changed, policy, now| next_step(i, changed, policy, &b, now);
        assert_eq!(
            step(None, false, RestartPolicy::Never, 0),
            Step::Create { attempt: 0 }
        );
        let created = instance(InstanceState::Created, 0, 0);
        assert_eq!(
            step(Some(&created), false, RestartPolicy::Always, 0),
            Step::Start { id: "id0".into() }
        );
        let running = instance(InstanceState::Running, 0, 2);
        assert_eq!(
            step(Some(&running), false, RestartPolicy::Always, 0),
            Step::Keep
        );
        assert_eq!(
            step(Some(&running), true, RestartPolicy::Always, 0),
            Step::Replace {
                id: "id2".into(),
                attempt: 3
            }
        );
        // Exited at 2 s after its 2nd restart: back-off 20 s.
        let crashed = instance(InstanceState::Exited, 1, 2);
        assert_eq!(
            step(Some(&crashed), false, RestartPolicy::Always, secs(10)),
            Step::BackOff {
                delay: Duration::from_secs(20)
            }
        );
        assert_eq!(
            step(Some(&crashed), false, RestartPolicy::OnFailure, secs(22)),
            Step::Create { attempt: 3 }
        );
        assert_eq!(
            step(Some(&crashed), false, RestartPolicy::Never, secs(22)),
            Step::Keep
        );
        // A changed spec restarts an exited container at once.
        assert_eq!(
            step(Some(&crashed), true, RestartPolicy::Never, secs(3)),
            Step::Create { attempt: 3 }
        );
        let done = instance(InstanceState::Exited, 0, 0);
        assert_eq!(
            step(Some(&done), false, RestartPolicy::OnFailure, secs(99)),
            Step::Keep
        );
        // The first restart is immediate.
        let first = instance(InstanceState::Exited, 1, 0);
        assert_eq!(
            step(Some(&first), false, RestartPolicy::Always, secs(2)),
            Step::Create { attempt: 1 }
        );
    }

    #[test]
    fn a_running_pod_is_running_ready_with_its_ip() {
        let (pod, spec) = fixture("Always");
        let sandbox = SandboxView {
            ready: true,
            ips: vec!["10.244.1.5".into()],
            created_at: 1,
        };
        let views = [ContainerView {
            current: Some(instance(InstanceState::Running, 0, 2)),
            previous: Some(instance(InstanceState::Exited, 1, 1)),
            waiting: None,
            ready: None,
        }];
        let s = pod_status(
            &pod,
            &spec,
            Some(&sandbox),
            &views,
            Some("192.168.0.1"),
            Timestamp::now(),
        );
        assert_eq!(s.phase.as_deref(), Some("Running"));
        assert_eq!(s.pod_ip.as_deref(), Some("10.244.1.5"));
        assert_eq!(s.host_ip.as_deref(), Some("192.168.0.1"));
        let c = &s.container_statuses.unwrap()[0];
        assert_eq!(c.restart_count, 2);
        assert!(c.ready);
        assert_eq!(
            c.last_state
                .as_ref()
                .unwrap()
                .terminated
                .as_ref()
                .unwrap()
                .exit_code,
            1
        );
        for cond in s.conditions.unwrap() {
            assert_eq!(cond.status, "True", "{cond:?}");
            assert_eq!(cond.observed_generation, Some(2));
        }
    }

    #[test]
    fn phases_follow_kubelet() {
        let run = |policy: &str, view: ContainerView| {
            let (pod, spec) = fixture(policy);
            pod_status(&pod, &spec, None, &[view], None, Timestamp::now())
        };
        let exited = |code| ContainerView {
            current: Some(instance(InstanceState::Exited, code, 0)),
            ..Default::default()
        };
        assert_eq!(run("Never", exited(0)).phase.as_deref(), Some("Succeeded"));
        assert_eq!(run("Never", exited(1)).phase.as_deref(), Some("Failed"));
        assert_eq!(
            run("OnFailure", exited(0)).phase.as_deref(),
            Some("Succeeded")
        );
        assert_eq!(run("Always", exited(0)).phase.as_deref(), Some("Running"));
        let crash = ContainerView {
            current: Some(instance(InstanceState::Exited, 1, 3)),
            previous: None,
            waiting: Some(("CrashLoopBackOff".into(), "back-off 40s".into())),
            ready: None,
        };
        let s = run("Always", crash);
        assert_eq!(s.phase.as_deref(), Some("Running"));
        let c = &s.container_statuses.unwrap()[0];
        assert_eq!(
            c.state
                .as_ref()
                .unwrap()
                .waiting
                .as_ref()
                .unwrap()
                .reason
                .as_deref(),
            Some("CrashLoopBackOff")
        );
        assert_eq!(
            c.last_state
                .as_ref()
                .unwrap()
                .terminated
                .as_ref()
                .unwrap()
                .exit_code,
            1
        );
        assert_eq!(c.restart_count, 3);
        let never_pulled = ContainerView {
            waiting: Some(("ErrImageNeverPull".into(), "not present".into())),
            ..Default::default()
        };
        let s = run("Always", never_pulled);
        assert_eq!(s.phase.as_deref(), Some("Pending"));
        let ready = s
            .conditions
            .unwrap()
            .into_iter()
            .find(|c| c.type_ == "Ready")
            .unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_deref()),
            ("False", Some("ContainersNotReady"))
        );
    }

    #[test]
    fn a_sandbox_that_failed_leaves_the_pod_pending_with_the_reason() {
        let (pod, spec) = fixture("Always");
        let s = sandbox_failed(&pod, &spec, "CNI ADD: no address", None, Timestamp::now());
        assert_eq!(s.phase.as_deref(), Some("Pending"));
        let waiting = s.container_statuses.as_ref().unwrap()[0]
            .state
            .as_ref()
            .unwrap()
            .waiting
            .clone()
            .unwrap();
        assert_eq!(waiting.reason.as_deref(), Some("ContainerCreating"));
        assert!(waiting.message.unwrap().contains("CNI ADD: no address"));
        let c = s
            .conditions
            .unwrap()
            .into_iter()
            .find(|c| c.type_ == "PodReadyToStartContainers")
            .unwrap();
        assert_eq!(c.status, "False");
        assert_eq!(c.reason.as_deref(), Some("FailedCreatePodSandBox"));
    }

    #[test]
    fn an_unchanged_condition_keeps_its_transition_time() {
        let (mut pod, spec) = fixture("Always");
        let first = pod_status(
            &pod,
            &spec,
            None,
            &[ContainerView::default()],
            None,
            Timestamp::from_second(1000).unwrap(),
        );
        pod.status = Some(first.clone());
        let second = pod_status(
            &pod,
            &spec,
            None,
            &[ContainerView::default()],
            None,
            Timestamp::from_second(2000).unwrap(),
        );
        assert_eq!(first.conditions, second.conditions);
        assert_eq!(first.start_time, second.start_time);
    }
}
