//! `rbac.authorization.k8s.io/v1` RoleBinding: grants a namespace role (view, edit, owner).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::meta::ObjectMeta;
use super::{Validate, at};
use crate::error::FieldError;

/// The roles a RoleBinding may grant.
pub const ROLES: &[&str] = &["view", "edit", "owner"];

/// Who is bound.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Subject {
    /// User, Group or ServiceAccount.
    pub kind: String,
    /// Name.
    pub name: String,
    /// Namespace of a ServiceAccount.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// `rbac.authorization.k8s.io` for users and groups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_group: Option<String>,
}

/// The role granted.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RoleRef {
    /// `rbac.authorization.k8s.io`.
    #[serde(default)]
    pub api_group: String,
    /// `ClusterRole`.
    pub kind: String,
    /// view, edit or owner.
    pub name: String,
}

/// A RoleBinding (namespaced).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RoleBinding {
    /// `rbac.authorization.k8s.io/v1`.
    #[serde(default)]
    pub api_version: String,
    /// `RoleBinding`.
    #[serde(default)]
    pub kind: String,
    /// Metadata.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// Who.
    #[serde(default)]
    pub subjects: Vec<Subject>,
    /// Which role.
    #[serde(default)]
    pub role_ref: RoleRef,
}

impl Validate for RoleBinding {
    fn default_fields(&mut self) {
        if self.role_ref.api_group.is_empty() {
            self.role_ref.api_group = "rbac.authorization.k8s.io".into();
        }
    }
    fn validate(&self, errs: &mut Vec<FieldError>) {
        if self.role_ref.kind != "ClusterRole" && self.role_ref.kind != "Role" {
            errs.push(FieldError::not_supported(
                "roleRef.kind",
                &self.role_ref.kind,
                &["ClusterRole", "Role"],
            ));
        }
        if !ROLES.contains(&self.role_ref.name.as_str()) {
            errs.push(FieldError::not_supported(
                "roleRef.name",
                &self.role_ref.name,
                ROLES,
            ));
        }
        for (i, s) in self.subjects.iter().enumerate() {
            if !["User", "Group", "ServiceAccount"].contains(&s.kind.as_str()) {
                errs.push(FieldError::not_supported(
                    format!("{}.kind", at("subjects", i)),
                    &s.kind,
                    &["User", "Group", "ServiceAccount"],
                ));
            }
            if s.name.is_empty() {
                errs.push(FieldError::required(format!("{}.name", at("subjects", i))));
            }
        }
    }
}
