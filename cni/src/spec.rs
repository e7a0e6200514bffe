//! The CNI protocol, spec 1.1.0 (containernetworking/cni SPEC.md): the environment a runtime
//! sets, the network configuration on stdin, the result and error objects on stdout, and the
//! well-known error codes. Pure: no I/O beyond what it is handed.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The version this plugin speaks natively.
pub const CNI_VERSION: &str = "1.1.0";

/// Versions accepted on stdin (the result is written in the version asked for).
pub const SUPPORTED_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// Well-known error codes (SPEC.md "Well-known Error Codes"); 100 and up are Slipway's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Code {
    IncompatibleVersion = 1,
    UnsupportedField = 2,
    UnknownContainer = 3,
    InvalidEnvironment = 4,
    Io = 5,
    Decode = 6,
    InvalidConfig = 7,
    TryAgainLater = 11,
    NotAvailable = 50,
    LimitedConnectivity = 51,
    /// The attachment differs from what ADD made (CHECK).
    CheckFailed = 100,
    /// The address block has no free address.
    NoAddresses = 101,
    /// The kernel refused an operation (netlink, BPF).
    Datapath = 102,
    /// A requested static address is held by another pod.
    AddressInUse = 103,
}

/// An error as the spec's error object (`code`, `msg`, `details`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{msg}")]
pub struct CniError {
    pub code: Code,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: Code, msg: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    /// The JSON error object a plugin prints on stdout.
    pub fn to_json(&self, cni_version: &str) -> Value {
        let mut out = serde_json::json!({
            "cniVersion": cni_version,
            "code": self.code as u32,
            "msg": self.msg,
        });
        if !self.details.is_empty() {
            out["details"] = Value::String(self.details.clone());
        }
        out
    }
}

impl From<slipway_dataplane::DataplaneError> for CniError {
    fn from(error: slipway_dataplane::DataplaneError) -> Self {
        let mut details = String::new();
        let mut source = std::error::Error::source(&error);
        while let Some(cause) = source {
            details.push_str(&cause.to_string());
            details.push_str("; ");
            source = cause.source();
        }
        CniError::new(Code::Datapath, error.to_string())
            .with_details(details.trim_end_matches("; "))
    }
}

/// The command a runtime asks for (`CNI_COMMAND`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Status,
    Gc,
    Version,
}

/// The runtime's environment variables, checked for what each command needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Env {
    pub command: Command,
    pub container_id: String,
    pub netns: Option<String>,
    pub ifname: String,
    pub args: BTreeMap<String, String>,
    pub path: Vec<String>,
}

impl Env {
    /// Reads the CNI_* variables through `get`. Every missing or bad variable a command needs is
    /// named in one error.
    pub fn parse(get: impl Fn(&str) -> Option<String>) -> Result<Self, CniError> {
        let command = match get("CNI_COMMAND").as_deref() {
            Some("ADD") => Command::Add,
            Some("DEL") => Command::Del,
            Some("CHECK") => Command::Check,
            Some("STATUS") => Command::Status,
            Some("GC") => Command::Gc,
            Some("VERSION") => Command::Version,
            Some(other) => {
                return Err(CniError::new(
                    Code::InvalidEnvironment,
                    format!("CNI_COMMAND: unknown command {other:?}"),
                ));
            }
            None => {
                return Err(CniError::new(
                    Code::InvalidEnvironment,
                    "CNI_COMMAND: not set",
                ));
            }
        };
        let per_container = matches!(command, Command::Add | Command::Del | Command::Check);
        let mut problems = Vec::new();
        let container_id = get("CNI_CONTAINERID").unwrap_or_default();
        if per_container {
            if container_id.is_empty() {
                problems.push("CNI_CONTAINERID: not set".to_owned());
            } else if !container_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
            {
                problems.push(
                    "CNI_CONTAINERID: only letters, digits, '_', '.' and '-' are allowed"
                        .to_owned(),
                );
            }
        }
        let netns = get("CNI_NETNS").filter(|n| !n.is_empty());
        if matches!(command, Command::Add | Command::Check) && netns.is_none() {
            problems.push("CNI_NETNS: not set".to_owned());
        }
        let ifname = get("CNI_IFNAME").unwrap_or_default();
        if per_container {
            if ifname.is_empty() {
                problems.push("CNI_IFNAME: not set".to_owned());
            } else if ifname.len() > 15
                || ifname.contains(['/', ' ', ':'])
                || ifname == "."
                || ifname == ".."
            {
                problems.push(format!(
                    "CNI_IFNAME: {ifname:?} is not a valid interface name"
                ));
            }
        }
        let mut args = BTreeMap::new();
        for pair in get("CNI_ARGS")
            .unwrap_or_default()
            .split(';')
            .filter(|p| !p.is_empty())
        {
            match pair.split_once('=') {
                Some((k, v)) => {
                    args.insert(k.to_owned(), v.to_owned());
                }
                None => problems.push(format!("CNI_ARGS: {pair:?} is not KEY=VALUE")),
            }
        }
        if !problems.is_empty() {
            return Err(CniError::new(Code::InvalidEnvironment, problems.join("; ")));
        }
        let path = get("CNI_PATH")
            .unwrap_or_default()
            .split(':')
            .filter(|p| !p.is_empty())
            .map(str::to_owned)
            .collect();
        Ok(Self {
            command,
            container_id,
            netns,
            ifname,
            args,
            path,
        })
    }
}

/// An attachment the runtime still uses (GC's `cni.dev/valid-attachments`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

/// How packets reach pods on other hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Routing {
    /// VXLAN between hosts (works on any underlay).
    #[default]
    Vxlan,
    /// Unencapsulated on the underlay (hosts share an L2 segment).
    Native,
}

/// The plugin's network configuration (one entry of a conflist, as the runtime hands it over).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    /// Set by runtimes that negotiate versions (CNI 1.1 conflists); accepted and ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cni_versions: Option<Vec<String>>,
    pub name: String,
    #[serde(rename = "type")]
    pub plugin_type: String,
    /// The cluster's pod CIDR.
    #[serde(rename = "podCIDR")]
    pub pod_cidr: String,
    /// This host's block of the pod CIDR; read from the agent's node state when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_block: Option<String>,
    /// Pod MTU; detected from the underlay device (minus encapsulation) when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub underlay_device: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routing: Option<Routing>,
    /// bpffs directory of the node datapath.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bpffs: Option<String>,
    /// Where IPAM state and the agent's node state live.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<String>,
    /// Delegates address allocation to another IPAM plugin (e.g. `host-local`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipam: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev_result: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_config: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<Value>,
    #[serde(
        rename = "cni.dev/valid-attachments",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub valid_attachments: Option<Vec<Attachment>>,
}

impl NetConf {
    /// Parses stdin. Malformed JSON is a decode error (6); a field this plugin does not know is
    /// an unsupported field (2) naming it; a bad value is an invalid config (7) naming the field.
    pub fn parse(bytes: &[u8]) -> Result<Self, CniError> {
        let value: Value = serde_json::from_slice(bytes).map_err(|e| {
            CniError::new(
                Code::Decode,
                format!("network configuration is not valid JSON: {e}"),
            )
        })?;
        let version = value
            .get("cniVersion")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        check_version(&version)?;
        let conf: NetConf = serde_json::from_value(value).map_err(|e| {
            let text = e.to_string();
            if text.starts_with("unknown field") {
                CniError::new(
                    Code::UnsupportedField,
                    format!("network configuration: {text}"),
                )
            } else {
                CniError::new(
                    Code::InvalidConfig,
                    format!("network configuration: {text}"),
                )
            }
        })?;
        Ok(conf)
    }
}

/// Fails with code 1 unless `version` is one this plugin speaks.
pub fn check_version(version: &str) -> Result<(), CniError> {
    if SUPPORTED_VERSIONS.contains(&version) {
        Ok(())
    } else {
        Err(CniError::new(
            Code::IncompatibleVersion,
            format!(
                "cniVersion: {version:?} is not supported (supported: {})",
                SUPPORTED_VERSIONS.join(", ")
            ),
        ))
    }
}

/// The VERSION reply.
pub fn version_info() -> Value {
    serde_json::json!({ "cniVersion": CNI_VERSION, "supportedVersions": SUPPORTED_VERSIONS })
}

/// A value a runtime asked for, and the field it came in (for errors).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requested<T> {
    pub value: T,
    pub field: String,
}

/// The static address and MAC a runtime asks for (CONVENTIONS.md: the `ips` and `mac`
/// capabilities in `runtimeConfig`, the same keys under `args.cni`, and `IP` / `MAC` in
/// CNI_ARGS). Every request is honoured or refused; none is ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Requests {
    pub ip: Option<Requested<Ipv4Addr>>,
    pub mac: Option<Requested<[u8; 6]>>,
}

impl Requests {
    /// Collects the requests of every source; names the field of every malformed, unsupported
    /// or conflicting one in a single error.
    pub fn parse(env: &Env, conf: &NetConf) -> Result<Self, CniError> {
        let mut problems = Vec::new();
        let mut ips: Vec<(String, String)> = Vec::new();
        let mut macs: Vec<(String, String)> = Vec::new();
        let sources = [
            ("runtimeConfig", conf.runtime_config.as_ref()),
            ("args.cni", conf.args.as_ref().and_then(|a| a.get("cni"))),
        ];
        for (base, object) in sources {
            let Some(object) = object else { continue };
            match object.get("ips") {
                None | Some(Value::Null) => {}
                Some(Value::Array(list)) => {
                    for (i, item) in list.iter().enumerate() {
                        match item.as_str() {
                            Some(text) => ips.push((format!("{base}.ips[{i}]"), text.to_owned())),
                            None => problems.push(format!("{base}.ips[{i}]: not a string")),
                        }
                    }
                }
                Some(_) => problems.push(format!("{base}.ips: not a list of addresses")),
            }
            match object.get("mac") {
                None | Some(Value::Null) => {}
                Some(Value::String(text)) => macs.push((format!("{base}.mac"), text.clone())),
                Some(_) => problems.push(format!("{base}.mac: not a string")),
            }
        }
        if let Some(list) = env.args.get("IP") {
            for text in list.split(',').filter(|t| !t.is_empty()) {
                ips.push(("CNI_ARGS IP".to_owned(), text.to_owned()));
            }
        }
        if let Some(text) = env.args.get("MAC") {
            macs.push(("CNI_ARGS MAC".to_owned(), text.clone()));
        }

        let mut ip: Option<Requested<Ipv4Addr>> = None;
        for (field, text) in ips {
            let address = text.split_once('/').map_or(text.as_str(), |(a, _)| a);
            match address.parse::<Ipv4Addr>() {
                Err(_) => problems.push(format!(
                    "{field}: {text:?} is not an IPv4 address (a pod gets one IPv4 address here)"
                )),
                Ok(value) => match &ip {
                    Some(first) if first.value != value => problems.push(format!(
                        "{field}: asks for {value} besides {} ({}); a pod gets one IPv4 address",
                        first.value, first.field
                    )),
                    Some(_) => {}
                    None => ip = Some(Requested { value, field }),
                },
            }
        }
        let mut mac: Option<Requested<[u8; 6]>> = None;
        for (field, text) in macs {
            match parse_mac(&text) {
                Err(why) => problems.push(format!("{field}: {text:?} {why}")),
                Ok(value) => match &mac {
                    Some(first) if first.value != value => problems.push(format!(
                        "{field}: asks for {text} besides {} ({})",
                        slipway_dataplane::link::format_mac(&first.value),
                        first.field
                    )),
                    Some(_) => {}
                    None => mac = Some(Requested { value, field }),
                },
            }
        }
        if problems.is_empty() {
            Ok(Self { ip, mac })
        } else {
            Err(CniError::new(Code::InvalidConfig, problems.join("; ")))
        }
    }
}

/// A unicast MAC address in the `aa:bb:cc:dd:ee:ff` form.
fn parse_mac(text: &str) -> Result<[u8; 6], &'static str> {
    let mut mac = [0u8; 6];
    let parts: Vec<&str> = text.split([':', '-']).collect();
    if parts.len() != 6 {
        return Err("is not a MAC address (aa:bb:cc:dd:ee:ff)");
    }
    for (byte, part) in mac.iter_mut().zip(parts) {
        if part.len() != 2 {
            return Err("is not a MAC address (aa:bb:cc:dd:ee:ff)");
        }
        *byte =
            u8::from_str_radix(part, 16).map_err(|_| "is not a MAC address (aa:bb:cc:dd:ee:ff)")?;
    }
    if mac[0] & 1 == 1 || mac == [0; 6] {
        return Err("is not a unicast MAC address");
    }
    Ok(mac)
}

/// A result's interface entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    pub name: String,
    pub mac: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
}

/// A result's IP entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpConfig {
    pub address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
}

/// A result's route entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub dst: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<String>,
}

/// The ADD result (also what an IPAM plugin returns, without interfaces).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct CniResult {
    pub cni_version: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<Interface>,
    #[serde(default)]
    pub ips: Vec<IpConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<Value>,
}

impl CniResult {
    /// The first IPv4 address of the result, with its prefix.
    pub fn first_ipv4(&self) -> Option<(Ipv4Addr, u8)> {
        self.ips.iter().find_map(|ip| {
            let (addr, prefix) = ip.address.split_once('/')?;
            Some((addr.parse().ok()?, prefix.parse().ok()?))
        })
    }

    /// The result in the shape of `version`: 0.3.x/0.4.0 results carry `"version": "4"` on each
    /// IP; 1.x results do not.
    pub fn to_json(&self, version: &str) -> Value {
        let mut out = serde_json::to_value(self).unwrap_or(Value::Null);
        out["cniVersion"] = Value::String(version.to_owned());
        if version.starts_with("0.")
            && let Some(ips) = out.get_mut("ips").and_then(Value::as_array_mut)
        {
            for ip in ips {
                ip["version"] = Value::String("4".into());
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> Result<Env, CniError> {
        let vars: BTreeMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Env::parse(|k| vars.get(k).cloned())
    }

    #[test]
    fn env_names_every_missing_variable() {
        let err = env(&[("CNI_COMMAND", "ADD")]).expect_err("incomplete");
        assert_eq!(err.code, Code::InvalidEnvironment);
        for name in ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"] {
            assert!(err.msg.contains(name), "{name} in {}", err.msg);
        }
        let err = env(&[("CNI_COMMAND", "FROB")]).expect_err("unknown command");
        assert!(err.msg.contains("CNI_COMMAND"));
        // DEL needs no netns (it may be gone); VERSION needs nothing.
        assert!(
            env(&[
                ("CNI_COMMAND", "DEL"),
                ("CNI_CONTAINERID", "c1"),
                ("CNI_IFNAME", "eth0")
            ])
            .is_ok()
        );
        assert!(env(&[("CNI_COMMAND", "VERSION")]).is_ok());
        let err = env(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "../x"),
            ("CNI_IFNAME", "eth0"),
        ])
        .expect_err("bad id");
        assert!(err.msg.contains("CNI_CONTAINERID"));
    }

    #[test]
    fn env_parses_args_and_path() {
        let e = env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_NETNS", "/run/netns/x"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_ARGS", "K8S_POD_NAME=a;K8S_POD_NAMESPACE=b"),
            ("CNI_PATH", "/opt/cni/bin:/usr/lib/cni"),
        ])
        .expect("valid");
        assert_eq!(e.args.get("K8S_POD_NAME").map(String::as_str), Some("a"));
        assert_eq!(e.path, ["/opt/cni/bin", "/usr/lib/cni"]);
    }

    #[test]
    fn conf_errors_carry_the_spec_codes() {
        let base = r#"{"cniVersion":"1.1.0","name":"n","type":"slipway","podCIDR":"10.244.0.0/16""#;
        assert!(NetConf::parse(format!("{base}}}").as_bytes()).is_ok());
        assert_eq!(
            NetConf::parse(b"{not json").expect_err("json").code,
            Code::Decode
        );
        let err =
            NetConf::parse(br#"{"cniVersion":"9.9.9","name":"n","type":"slipway","podCIDR":"x"}"#)
                .expect_err("version");
        assert_eq!(err.code, Code::IncompatibleVersion);
        assert!(err.msg.contains("9.9.9"));
        let err = NetConf::parse(format!(r#"{base},"bogus":1}}"#).as_bytes()).expect_err("field");
        assert_eq!(err.code, Code::UnsupportedField);
        assert!(err.msg.contains("bogus"));
        let err = NetConf::parse(format!(r#"{base},"mtu":"big"}}"#).as_bytes()).expect_err("type");
        assert_eq!(err.code, Code::InvalidConfig);
    }

    fn add_env(args: &str) -> Env {
        env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c"),
            ("CNI_NETNS", "/run/netns/x"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_ARGS", args),
        ])
        .expect("env")
    }

    fn conf_with(extra: &str) -> NetConf {
        NetConf::parse(
            format!(
                r#"{{"cniVersion":"1.0.0","name":"n","type":"slipway","podCIDR":"10.244.0.0/16"{extra}}}"#
            )
            .as_bytes(),
        )
        .expect("conf")
    }

    #[test]
    fn static_requests_come_from_every_source() {
        let none = Requests::parse(&add_env("K8S_POD_NAME=a"), &conf_with("")).expect("none");
        assert_eq!(none, Requests::default());
        let r = Requests::parse(
            &add_env(""),
            &conf_with(r#","runtimeConfig":{"ips":["10.244.1.9/24"],"mac":"02:00:00:00:00:09","portMappings":[]}"#),
        )
        .expect("capabilities");
        assert_eq!(
            r.ip.map(|i| (i.value, i.field)),
            Some((
                Ipv4Addr::new(10, 244, 1, 9),
                "runtimeConfig.ips[0]".to_owned()
            ))
        );
        assert_eq!(r.mac.map(|m| m.value), Some([2, 0, 0, 0, 0, 9]));
        let r = Requests::parse(
            &add_env("IP=10.244.1.7;MAC=02:00:00:00:00:07"),
            &conf_with(""),
        )
        .expect("CNI_ARGS");
        assert_eq!(r.ip.map(|i| i.field), Some("CNI_ARGS IP".to_owned()));
        assert_eq!(r.mac.map(|m| m.value), Some([2, 0, 0, 0, 0, 7]));
        let r = Requests::parse(
            &add_env(""),
            &conf_with(r#","args":{"cni":{"ips":["10.244.1.8"]}}"#),
        )
        .expect("args");
        assert_eq!(r.ip.map(|i| i.value), Some(Ipv4Addr::new(10, 244, 1, 8)));
    }

    #[test]
    fn static_requests_that_cannot_be_honoured_are_refused_by_field() {
        let cases = [
            (
                "",
                r#","runtimeConfig":{"ips":["fd00::5/64"]}"#,
                "runtimeConfig.ips[0]",
            ),
            (
                "",
                r#","runtimeConfig":{"ips":["10.244.1.5","10.244.1.6"]}"#,
                "runtimeConfig.ips[1]",
            ),
            (
                "IP=10.244.1.6",
                r#","runtimeConfig":{"ips":["10.244.1.5"]}"#,
                "CNI_ARGS IP",
            ),
            (
                "",
                r#","runtimeConfig":{"mac":"01:00:5e:00:00:01"}"#,
                "runtimeConfig.mac",
            ),
            ("MAC=zz", "", "CNI_ARGS MAC"),
            (
                "",
                r#","args":{"cni":{"ips":"10.244.1.5"}}"#,
                "args.cni.ips",
            ),
        ];
        for (args, extra, field) in cases {
            let err = Requests::parse(&add_env(args), &conf_with(extra)).expect_err(field);
            assert_eq!(err.code, Code::InvalidConfig, "{field}");
            assert!(err.msg.contains(field), "{field} not in {}", err.msg);
        }
    }

    #[test]
    fn results_follow_the_requested_version() {
        let result = CniResult {
            cni_version: CNI_VERSION.into(),
            ips: vec![IpConfig {
                address: "10.244.1.2/32".into(),
                gateway: None,
                interface: Some(0),
            }],
            ..CniResult::default()
        };
        assert_eq!(
            result.first_ipv4(),
            Some((Ipv4Addr::new(10, 244, 1, 2), 32))
        );
        assert_eq!(result.to_json("0.4.0")["ips"][0]["version"], "4");
        assert!(result.to_json("1.0.0")["ips"][0].get("version").is_none());
        let err = CniError::new(Code::TryAgainLater, "busy").to_json("1.1.0");
        assert_eq!(
            (err["code"].as_u64(), err["msg"].as_str()),
            (Some(11), Some("busy"))
        );
    }
}
