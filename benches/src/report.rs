//! The bench contract (docs/development.md, "Benchmarks"): every end-to-end metric is measured for
//! Slipway and for a real baseline in the same run, alternating A B A B, and reported as one
//! JSON object per line in `target/slipway-bench/<suite>.jsonl` with the medians and their ratio.

use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

/// Where suites write their JSONL unless told otherwise, relative to the working directory.
pub const DEFAULT_OUT_DIR: &str = "target/slipway-bench";

/// One metric of one suite: Slipway's median beside the baseline's median.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub suite: String,
    pub metric: String,
    pub unit: String,
    pub higher_is_better: bool,
    pub slipway: f64,
    pub baseline: String,
    pub baseline_value: f64,
    /// slipway / baseline when higher is better, baseline / slipway otherwise: >= 1.0 means
    /// Slipway wins.
    pub ratio: f64,
    pub runs: usize,
    /// "min..max" of the Slipway samples.
    pub spread: String,
    /// RFC 3339 time of the measurement.
    pub at: String,
}

/// What a metric is and which way is better.
#[derive(Debug, Clone, Copy)]
pub struct Metric<'a> {
    pub suite: &'a str,
    pub name: &'a str,
    pub unit: &'a str,
    pub higher_is_better: bool,
    /// Name of the baseline, e.g. "raw-veth", "haproxy", "nbdkit".
    pub baseline: &'a str,
}

/// Samples of one metric, collected alternately for Slipway and the baseline.
#[derive(Debug, Clone, Default)]
pub struct Samples {
    pub slipway: Vec<f64>,
    pub baseline: Vec<f64>,
}

impl Samples {
    /// Runs `slipway` and `baseline` alternately `runs` times each (A B A B ...), so that drift
    /// in the machine's state hits both sides alike.
    pub fn alternate(
        runs: usize,
        mut slipway: impl FnMut(usize) -> anyhow::Result<f64>,
        mut baseline: impl FnMut(usize) -> anyhow::Result<f64>,
    ) -> anyhow::Result<Self> {
        let mut samples = Self::default();
        for run in 0..runs {
            samples
                .slipway
                .push(slipway(run).with_context(|| format!("slipway run {run}"))?);
            samples
                .baseline
                .push(baseline(run).with_context(|| format!("baseline run {run}"))?);
        }
        Ok(samples)
    }

    /// The record for these samples; fails if either side has no sample or a median of zero.
    pub fn record(&self, metric: Metric<'_>) -> anyhow::Result<Record> {
        let slipway = median(&self.slipway).context("no slipway samples")?;
        let baseline_value = median(&self.baseline).context("no baseline samples")?;
        let ratio = ratio(slipway, baseline_value, metric.higher_is_better)
            .with_context(|| format!("{}: a median is zero, no ratio", metric.name))?;
        let (min, max) = self
            .slipway
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
                (lo.min(*v), hi.max(*v))
            });
        Ok(Record {
            suite: metric.suite.to_owned(),
            metric: metric.name.to_owned(),
            unit: metric.unit.to_owned(),
            higher_is_better: metric.higher_is_better,
            slipway,
            baseline: metric.baseline.to_owned(),
            baseline_value,
            ratio,
            runs: self.slipway.len(),
            spread: format!("{min:.3}..{max:.3}"),
            at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        })
    }
}

/// The median of `values`; the mean of the middle two for an even count.
pub fn median(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    Some(if sorted.len().is_multiple_of(2) {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    } else {
        sorted[mid]
    })
}

/// The ratio oriented so that >= 1.0 means Slipway wins; `None` if it would divide by zero.
pub fn ratio(slipway: f64, baseline: f64, higher_is_better: bool) -> Option<f64> {
    let (num, den) = if higher_is_better {
        (slipway, baseline)
    } else {
        (baseline, slipway)
    };
    (den != 0.0).then_some(num / den)
}

/// Writes `records` as `<dir>/<suite>.jsonl`, replacing the file of an earlier run of the suite.
pub fn write_jsonl(dir: &Path, suite: &str, records: &[Record]) -> anyhow::Result<PathBuf> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(format!("{suite}.jsonl"));
    let mut out = String::new();
    for record in records {
        out.push_str(&serde_json::to_string(record)?);
        out.push('\n');
    }
    let mut file =
        fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    file.write_all(out.as_bytes())?;
    file.sync_all()?;
    Ok(path)
}

/// A human table of `records`: metric, Slipway, baseline, ratio.
pub fn table(records: &[Record]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<34} {:>12} {:>12} {:<14} {:>7}  unit",
        "metric", "slipway", "baseline", "(baseline)", "ratio"
    );
    for r in records {
        let _ = writeln!(
            out,
            "{:<34} {:>12.3} {:>12.3} {:<14} {:>7.3}  {}{}",
            r.metric,
            r.slipway,
            r.baseline_value,
            r.baseline,
            r.ratio,
            r.unit,
            if r.higher_is_better {
                ""
            } else {
                " (lower is better)"
            }
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const METRIC: Metric<'static> = Metric {
        suite: "t",
        name: "m",
        unit: "Gbit/s",
        higher_is_better: true,
        baseline: "raw-veth",
    };

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn ratio_is_oriented_so_that_above_one_wins() {
        assert_eq!(ratio(20.0, 10.0, true), Some(2.0));
        assert_eq!(ratio(20.0, 10.0, false), Some(0.5));
        assert_eq!(ratio(1.0, 0.0, true), None);
    }

    #[test]
    fn alternate_interleaves_and_records_medians() {
        let order = std::cell::RefCell::new(Vec::new());
        let samples = Samples::alternate(
            3,
            |run| {
                order.borrow_mut().push(format!("A{run}"));
                Ok(10.0 + run as f64)
            },
            |run| {
                order.borrow_mut().push(format!("B{run}"));
                Ok(5.0 + run as f64)
            },
        )
        .expect("samples");
        assert_eq!(order.into_inner(), ["A0", "B0", "A1", "B1", "A2", "B2"]);
        let record = samples.record(METRIC).expect("record");
        assert_eq!((record.slipway, record.baseline_value), (11.0, 6.0));
        assert!((record.ratio - 11.0 / 6.0).abs() < 1e-12);
        assert_eq!(record.spread, "10.000..12.000");
        assert_eq!(record.runs, 3);
    }

    #[test]
    fn a_zero_median_is_an_error_not_an_infinite_ratio() {
        let samples = Samples {
            slipway: vec![1.0],
            baseline: vec![0.0],
        };
        assert!(samples.record(METRIC).is_err());
    }

    #[test]
    fn jsonl_round_trips() {
        let dir = std::env::temp_dir().join(format!("slipway-bench-test-{}", std::process::id()));
        let samples = Samples {
            slipway: vec![2.0],
            baseline: vec![1.0],
        };
        let record = samples.record(METRIC).expect("record");
        let path = write_jsonl(&dir, "t", std::slice::from_ref(&record)).expect("write");
        let text = fs::read_to_string(&path).expect("read");
        let _ = fs::remove_dir_all(&dir);
        let back: Record = serde_json::from_str(text.trim_end()).expect("parse");
        assert_eq!(back, record);
        assert_eq!(text.lines().count(), 1);
    }
}
