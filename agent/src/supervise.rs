//! A child process the agent keeps running: started again with back-off whenever it exits,
//! its output appended to a log file, killed when the task that supervises it is dropped.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tracing::warn;

/// First delay before a restart; it doubles up to [`MAX_DELAY`] while the child keeps dying.
const FIRST_DELAY: Duration = Duration::from_millis(200);
const MAX_DELAY: Duration = Duration::from_secs(10);
/// A child that ran this long had started fine: its next exit restarts it at once again.
const STABLE: Duration = Duration::from_secs(30);

/// Runs `command()` (built again for every start, so it can read settings that changed) until
/// the task is dropped; `what` names the child in the log.
pub async fn supervise(
    what: &str,
    log: &Path,
    mut command: impl FnMut() -> anyhow::Result<tokio::process::Command>,
) -> anyhow::Result<()> {
    let mut delay = FIRST_DELAY;
    loop {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("{what}'s log {}", log.display()))?;
        let started = Instant::now();
        let status = command()?
            .stdout(out.try_clone()?)
            .stderr(out)
            .kill_on_drop(true)
            .status()
            .await
            .with_context(|| format!("starting {what}"))?;
        if started.elapsed() > STABLE {
            delay = FIRST_DELAY;
        }
        warn!(%status, retry_in = ?delay, "{what} exited; restarting it");
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(MAX_DELAY);
    }
}
