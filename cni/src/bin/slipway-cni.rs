//! The CNI plugin binary. Install it as `/opt/cni/bin/slipway` (the conflist's `"type"`):
//! runtimes exec it with CNI_* variables and the network configuration on stdin, and read a
//! result or an error object from stdout (SPEC.md "Section 4: Plugin Delegation" and
//! "Section 5: Result Types").

use std::io::{Read, Write};
use std::process::ExitCode;

use serde_json::Value;
use slipway_cni::plugin;
use slipway_cni::spec::{self, CniError, Code, Command, Env, NetConf};

fn main() -> ExitCode {
    let mut stdin = Vec::new();
    let read = std::io::stdin().read_to_end(&mut stdin);
    let (version, outcome) = match read {
        Ok(_) => run(&stdin),
        Err(e) => (
            spec::CNI_VERSION.to_owned(),
            Err(CniError::new(Code::Io, format!("reading stdin: {e}"))),
        ),
    };
    let mut out = std::io::stdout().lock();
    match outcome {
        Ok(Some(value)) => {
            let _ = writeln!(out, "{value}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(error) => {
            let _ = writeln!(out, "{}", error.to_json(&version));
            ExitCode::FAILURE
        }
    }
}

/// Returns the configuration's version (for the error object) and what to print.
fn run(stdin: &[u8]) -> (String, Result<Option<Value>, CniError>) {
    let env = match Env::parse(|name| std::env::var(name).ok()) {
        Ok(env) => env,
        Err(e) => return (spec::CNI_VERSION.to_owned(), Err(e)),
    };
    if env.command == Command::Version {
        return (spec::CNI_VERSION.to_owned(), Ok(Some(spec::version_info())));
    }
    let conf = match NetConf::parse(stdin) {
        Ok(conf) => conf,
        Err(e) => return (spec::CNI_VERSION.to_owned(), Err(e)),
    };
    let version = conf.cni_version.clone();
    let outcome = match env.command {
        Command::Add => plugin::add(&env, &conf).map(Some),
        Command::Del => plugin::del(&env, &conf).map(|()| None),
        Command::Check => plugin::check(&env, &conf).map(|()| None),
        Command::Status => plugin::status(&conf).map(|()| None),
        Command::Gc => plugin::gc(&env, &conf).map(|_| None),
        Command::Version => Ok(Some(spec::version_info())),
    };
    (version, outcome)
}
