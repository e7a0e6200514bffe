//! `apps/v1` kinds: Deployment and ReplicaSet, the upstream types with kube-apiserver's
//! defaults (one replica, RollingUpdate 25%/25%, ten old ReplicaSets kept) and checks.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{DeploymentStrategy, RollingUpdateDeployment};
use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use slipway_api::networking::{check_selector, selector_matches};

use super::Validate;
use super::core::{check_enum, check_pod_spec, default_pod_spec};
use crate::error::FieldError;

/// A Deployment (apps/v1), the upstream type (unknown fields refused, see
/// `registry::decode_upstream`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(transparent)]
#[schemars(transparent)]
pub struct Deployment(pub k8s_openapi::api::apps::v1::Deployment);

/// A ReplicaSet (apps/v1), the upstream type.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(transparent)]
#[schemars(transparent)]
pub struct ReplicaSet(pub k8s_openapi::api::apps::v1::ReplicaSet);

fn check_replicas(field: &str, n: Option<i32>, errs: &mut Vec<FieldError>) {
    if let Some(n) = n
        && n < 0
    {
        errs.push(FieldError::invalid(
            field,
            n,
            "must be greater than or equal to 0",
        ));
    }
}

/// The selector and template of a workload: a selector that selects something, matching the
/// template's labels, and a valid Pod spec.
fn check_workload(
    selector: &LabelSelector,
    template: &PodTemplateSpec,
    errs: &mut Vec<FieldError>,
) {
    let empty = selector
        .match_labels
        .as_ref()
        .is_none_or(BTreeMap::is_empty)
        && selector
            .match_expressions
            .as_ref()
            .is_none_or(Vec::is_empty);
    if empty {
        errs.push(FieldError::invalid(
            "spec.selector",
            "{}",
            "empty selector is invalid for deployment",
        ));
    }
    check_selector("spec.selector", selector, errs);
    let labels = template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    if !empty && !selector_matches(selector, &labels) {
        errs.push(FieldError::invalid(
            "spec.template.metadata.labels",
            format!("{labels:?}"),
            "`selector` does not match template `labels`",
        ));
    }
    match &template.spec {
        Some(spec) => check_pod_spec("spec.template.spec", spec, errs),
        None => errs.push(FieldError::required("spec.template.spec")),
    }
}

/// An int-or-percent field's check: a non-negative int, or `N%`.
fn check_int_or_percent(field: &str, v: Option<&IntOrString>, errs: &mut Vec<FieldError>) {
    match v {
        Some(IntOrString::Int(n)) if *n < 0 => errs.push(FieldError::invalid(
            field,
            *n,
            "must be greater than or equal to 0",
        )),
        Some(IntOrString::String(s))
            if s.strip_suffix('%')
                .and_then(|n| n.parse::<u32>().ok())
                .is_none() =>
        {
            errs.push(FieldError::invalid(
                field,
                format!("{s:?}"),
                "must be an integer or percentage (e.g '5%')",
            ));
        }
        _ => {}
    }
}

fn is_zero(v: Option<&IntOrString>) -> bool {
    match v {
        Some(IntOrString::Int(n)) => *n == 0,
        Some(IntOrString::String(s)) => s == "0%",
        None => false,
    }
}

impl Validate for Deployment {
    fn default_fields(&mut self) {
        let spec = self.0.spec.get_or_insert_with(Default::default);
        spec.replicas.get_or_insert(1);
        spec.revision_history_limit.get_or_insert(10);
        spec.progress_deadline_seconds.get_or_insert(600);
        let strategy = spec
            .strategy
            .get_or_insert_with(DeploymentStrategy::default);
        let type_ = strategy.type_.get_or_insert_with(|| "RollingUpdate".into());
        if type_ == "RollingUpdate" {
            let ru = strategy
                .rolling_update
                .get_or_insert_with(RollingUpdateDeployment::default);
            ru.max_surge
                .get_or_insert_with(|| IntOrString::String("25%".into()));
            ru.max_unavailable
                .get_or_insert_with(|| IntOrString::String("25%".into()));
        }
        if let Some(t) = spec.template.spec.as_mut() {
            default_pod_spec(t);
        }
    }

    fn validate(&self, errs: &mut Vec<FieldError>) {
        let Some(spec) = &self.0.spec else {
            errs.push(FieldError::required("spec"));
            return;
        };
        check_replicas("spec.replicas", spec.replicas, errs);
        if let Some(n) = spec.revision_history_limit
            && n < 0
        {
            errs.push(FieldError::invalid(
                "spec.revisionHistoryLimit",
                n,
                "must be greater than or equal to 0",
            ));
        }
        check_workload(&spec.selector, &spec.template, errs);
        let Some(strategy) = &spec.strategy else {
            return;
        };
        check_enum(
            "spec.strategy.type",
            &strategy.type_,
            &["RollingUpdate", "Recreate"],
            errs,
        );
        if let Some(ru) = &strategy.rolling_update {
            if strategy.type_.as_deref() == Some("Recreate") {
                errs.push(FieldError::forbidden(
                    "spec.strategy.rollingUpdate",
                    "may not be specified when strategy `type` is 'Recreate'",
                ));
            }
            check_int_or_percent(
                "spec.strategy.rollingUpdate.maxSurge",
                ru.max_surge.as_ref(),
                errs,
            );
            check_int_or_percent(
                "spec.strategy.rollingUpdate.maxUnavailable",
                ru.max_unavailable.as_ref(),
                errs,
            );
            if is_zero(ru.max_surge.as_ref()) && is_zero(ru.max_unavailable.as_ref()) {
                errs.push(FieldError::invalid(
                    "spec.strategy.rollingUpdate.maxUnavailable",
                    0,
                    "may not be 0 when `maxSurge` is 0",
                ));
            }
        }
    }
}

impl Validate for ReplicaSet {
    fn default_fields(&mut self) {
        let spec = self.0.spec.get_or_insert_with(Default::default);
        spec.replicas.get_or_insert(1);
        if let Some(t) = spec.template.as_mut().and_then(|t| t.spec.as_mut()) {
            default_pod_spec(t);
        }
    }

    fn validate(&self, errs: &mut Vec<FieldError>) {
        let Some(spec) = &self.0.spec else {
            errs.push(FieldError::required("spec"));
            return;
        };
        check_replicas("spec.replicas", spec.replicas, errs);
        match &spec.template {
            Some(t) => check_workload(&spec.selector, t, errs),
            None => errs.push(FieldError::required("spec.template")),
        }
    }
}
