//! The one field error type of the workspace and the one conversion of validation errors into a
//! Kubernetes `metav1.Status` body (reason `Invalid`, one `details.causes` entry per field).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Status, StatusCause, StatusDetails};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a field was refused, as the Kubernetes `StatusCause.reason` vocabulary names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldReason {
    /// The value is malformed or out of range.
    Invalid,
    /// A required field is missing.
    Required,
    /// The value is not one of the supported values.
    NotSupported,
    /// The value repeats one that must be unique.
    Duplicate,
    /// The value is not allowed here (policy, admission).
    Forbidden,
}

impl FieldReason {
    const ALL: [Self; 5] = [
        Self::Invalid,
        Self::Required,
        Self::NotSupported,
        Self::Duplicate,
        Self::Forbidden,
    ];

    /// The `StatusCause.reason` (`FieldValueInvalid`, ...).
    pub fn cause(self) -> &'static str {
        match self {
            Self::Invalid => "FieldValueInvalid",
            Self::Required => "FieldValueRequired",
            Self::NotSupported => "FieldValueNotSupported",
            Self::Duplicate => "FieldValueDuplicate",
            Self::Forbidden => "FieldValueForbidden",
        }
    }

    /// The words kube-apiserver starts the cause's message with (`Invalid value`, ...).
    pub fn label(self) -> &'static str {
        match self {
            Self::Invalid => "Invalid value",
            Self::Required => "Required value",
            Self::NotSupported => "Unsupported value",
            Self::Duplicate => "Duplicate value",
            Self::Forbidden => "Forbidden",
        }
    }

    /// The reason named by a `StatusCause.reason`.
    pub fn from_cause(cause: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.cause() == cause)
    }
}

/// One bad field of an object or a configuration, named by its JSON path
/// (`spec.ports[0].port`). On the wire it is a Kubernetes `StatusCause`
/// (`{"reason": "FieldValueInvalid", "message": "Invalid value: ...", "field": "..."}`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {}", self.message())]
pub struct FieldError {
    /// JSON path of the field.
    pub field: String,
    /// Kind of failure.
    pub reason: FieldReason,
    /// Human-readable detail.
    pub detail: String,
}

impl FieldError {
    /// A field error with a free-form detail.
    pub fn new(field: impl Into<String>, reason: FieldReason, detail: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason,
            detail: detail.into(),
        }
    }

    /// A malformed or out-of-range value.
    pub fn invalid(
        field: impl Into<String>,
        value: impl std::fmt::Display,
        detail: impl Into<String>,
    ) -> Self {
        Self::new(
            field,
            FieldReason::Invalid,
            format!("{value}: {}", detail.into()),
        )
    }

    /// A missing required value.
    pub fn required(field: impl Into<String>) -> Self {
        Self::new(field, FieldReason::Required, String::new())
    }

    /// A value outside an enumeration.
    pub fn not_supported(field: impl Into<String>, value: &str, supported: &[&str]) -> Self {
        let list: Vec<String> = supported.iter().map(|s| format!("{s:?}")).collect();
        Self::new(
            field,
            FieldReason::NotSupported,
            format!("{value:?}: supported values: {}", list.join(", ")),
        )
    }

    /// A value that must be unique but repeats.
    pub fn duplicate(field: impl Into<String>, value: impl std::fmt::Display) -> Self {
        Self::new(field, FieldReason::Duplicate, value.to_string())
    }

    /// A value a policy forbids.
    pub fn forbidden(field: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::new(field, FieldReason::Forbidden, detail)
    }

    /// The message without the field (`Invalid value: 0: must be ...`), as a `StatusCause`
    /// carries it; clients print `field: message`.
    pub fn message(&self) -> String {
        if self.detail.is_empty() {
            self.reason.label().to_string()
        } else {
            format!("{}: {}", self.reason.label(), self.detail)
        }
    }

    /// This error as a `metav1.StatusCause`.
    pub fn to_cause(&self) -> StatusCause {
        StatusCause {
            field: Some(self.field.clone()),
            message: Some(self.message()),
            reason: Some(self.reason.cause().to_string()),
        }
    }
}

impl Serialize for FieldError {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_cause().serialize(s)
    }
}

impl<'de> Deserialize<'de> for FieldError {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let cause = StatusCause::deserialize(d)?;
        let reason = cause.reason.as_deref().unwrap_or_default();
        let reason = FieldReason::from_cause(reason)
            .ok_or_else(|| D::Error::custom(format!("unknown field error reason {reason:?}")))?;
        let message = cause.message.unwrap_or_default();
        let detail = message
            .strip_prefix(reason.label())
            .map(|rest| rest.strip_prefix(": ").unwrap_or(rest))
            .unwrap_or(&message);
        Ok(Self::new(cause.field.unwrap_or_default(), reason, detail))
    }
}

/// `field: message`, or `[a: x, b: y]` for several, as kube-apiserver lists causes.
pub fn format_causes(causes: &[FieldError]) -> String {
    let parts: Vec<String> = causes.iter().map(ToString::to_string).collect();
    if parts.len() == 1 {
        parts.join("")
    } else {
        format!("[{}]", parts.join(", "))
    }
}

/// The message of an `Invalid` status: `Kind "name" is invalid: field: message`.
pub fn invalid_message(kind: &str, name: &str, causes: &[FieldError]) -> String {
    format!("{kind} {name:?} is invalid: {}", format_causes(causes))
}

/// The `metav1.Status` kube-apiserver answers an invalid object with (HTTP 422, reason
/// `Invalid`, one `details.causes` entry per bad field): the one place validation errors become
/// a Status.
pub fn invalid_status(kind: &str, name: &str, causes: &[FieldError]) -> Status {
    Status {
        code: Some(422),
        details: Some(StatusDetails {
            causes: Some(causes.iter().map(FieldError::to_cause).collect()),
            kind: Some(kind.to_string()),
            name: Some(name.to_string()),
            ..StatusDetails::default()
        }),
        message: Some(invalid_message(kind, name, causes)),
        metadata: Default::default(),
        reason: Some("Invalid".into()),
        status: Some("Failure".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_error_is_a_status_cause_on_the_wire() {
        let errs = [
            FieldError::invalid("spec.cpus", 0, "must be at least 1"),
            FieldError::required("spec.zone"),
            FieldError::not_supported("spec.provider", "vm", &["netns", "static"]),
        ];
        let json = serde_json::to_value(&errs).expect("serializes");
        assert_eq!(
            json[0],
            serde_json::json!({"field": "spec.cpus", "reason": "FieldValueInvalid",
                "message": "Invalid value: 0: must be at least 1"})
        );
        assert_eq!(json[1]["message"], "Required value");
        let back: Vec<FieldError> = serde_json::from_value(json).expect("deserializes");
        assert_eq!(back, errs);
        assert_eq!(
            errs[2].to_string(),
            r#"spec.provider: Unsupported value: "vm": supported values: "netns", "static""#
        );
        let bad = serde_json::json!({"field": "x", "reason": "Nope", "message": "m"});
        assert!(serde_json::from_value::<FieldError>(bad).is_err());
    }

    #[test]
    fn invalid_status_lists_every_cause() {
        let causes = [
            FieldError::required("spec.zone"),
            FieldError::invalid("spec.address", "\"x\"", "must be an IP address"),
        ];
        let status =
            serde_json::to_value(invalid_status("Host", "h1", &causes)).expect("serializes");
        assert_eq!(status["kind"], "Status");
        assert_eq!(status["apiVersion"], "v1");
        assert_eq!(status["reason"], "Invalid");
        assert_eq!(status["code"], 422);
        assert_eq!(status["status"], "Failure");
        assert_eq!(
            status["message"],
            r#"Host "h1" is invalid: [spec.zone: Required value, spec.address: Invalid value: "x": must be an IP address]"#
        );
        assert_eq!(status["details"]["name"], "h1");
        assert_eq!(status["details"]["kind"], "Host");
        assert_eq!(status["details"]["causes"][0]["field"], "spec.zone");
        assert_eq!(
            status["details"]["causes"][1]["reason"],
            "FieldValueInvalid"
        );
    }
}
