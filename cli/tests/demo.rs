//! `slipway demo`, the README's main job, end to end: the real binary builds a world, moves
//! traffic, prints its table and writes `demo.jsonl` with ratios, and leaves nothing behind.
//! Privileged (root, BPF, netns): run by scripts/test.sh.

use std::process::Command;

/// Every network namespace, bpffs entry and cgroup named `slipway-*`, and every link of the
/// root namespace the world could have made (`slipway-*`, `lxc*`, `veth*`).
fn leftovers() -> Vec<String> {
    let mut found = Vec::new();
    for dir in ["/run/netns", "/sys/fs/bpf", "/sys/fs/cgroup/unified"] {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("slipway-") {
                found.push(format!("{dir}/{name}"));
            }
        }
    }
    for entry in std::fs::read_dir("/sys/class/net")
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        if ["slipway-", "lxc", "veth"]
            .iter()
            .any(|p| name.starts_with(p))
        {
            found.push(format!("link {name}"));
        }
    }
    found
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF + netns; run scripts/test.sh"
)]
fn demo_measures_both_sides_and_writes_jsonl() {
    let before = leftovers();
    let out_dir = std::env::temp_dir().join(format!("slipway-demo-test-{}", std::process::id()));
    let output = Command::new(env!("CARGO_BIN_EXE_slipway"))
        .args(["demo", "--runs", "1", "--seconds", "1", "--out-dir"])
        .arg(&out_dir)
        .output()
        .expect("run slipway demo");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "demo failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("pod_to_pod_tcp_same_host"), "{stdout}");
    assert_eq!(
        stdout.matches(": match").count(),
        2,
        "counters match both ways: {stdout}"
    );

    let jsonl = std::fs::read_to_string(out_dir.join("demo.jsonl")).expect("demo.jsonl");
    let _ = std::fs::remove_dir_all(&out_dir);
    let after = leftovers();
    let leaked: Vec<_> = after.iter().filter(|n| !before.contains(n)).collect();
    assert!(leaked.is_empty(), "the demo left behind: {leaked:?}");
    let records: Vec<serde_json::Value> = jsonl
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON object per line"))
        .collect();
    assert_eq!(records.len(), 2);
    for record in &records {
        assert_eq!(record["suite"], "demo");
        assert_eq!(record["baseline"], "raw-veth");
        for field in ["slipway", "baseline_value", "ratio"] {
            let value = record[field].as_f64().unwrap_or_default();
            assert!(
                value.is_finite() && value > 0.0,
                "{field} = {value} in {record}"
            );
        }
    }
}

#[test]
fn bench_refuses_bad_arguments_with_the_field_named() {
    let output = Command::new(env!("CARGO_BIN_EXE_slipway"))
        .args(["bench", "no-such-suite"])
        .output()
        .expect("run slipway");
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("no-such-suite"));
}
