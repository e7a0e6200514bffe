//! What wakes a level-triggered controller: any event on its watches, and a period, so that what
//! a watch missed (a restarted API server, a pass that failed) converges anyway.

use std::time::Duration;

use futures_util::stream::BoxStream;
use futures_util::{Stream, StreamExt as _};
use tokio::time::{Interval, MissedTickBehavior};

/// The wake-ups of one controller.
pub struct Wakeups {
    events: BoxStream<'static, ()>,
    tick: Interval,
}

impl std::fmt::Debug for Wakeups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wakeups")
            .field("period", &self.tick.period())
            .finish_non_exhaustive()
    }
}

impl Wakeups {
    /// Wakes on every item of `events` (its value is not looked at: a pass lists what it needs)
    /// and every `period`; the first wake-up is at once.
    pub fn new<S>(events: S, period: Duration) -> Self
    where
        S: Stream + Send + 'static,
    {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Self {
            events: events.map(|_| ()).fuse().boxed(),
            tick,
        }
    }

    /// Waits for the next wake-up. An ended watch stream leaves the period.
    pub async fn next(&mut self) {
        tokio::select! {
            _ = self.tick.tick() => {}
            Some(()) = self.events.next() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn wakes_at_once_then_on_events_and_the_period() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<u8>();
        let events =
            futures_util::stream::unfold(rx, |mut rx| async move { Some((rx.recv().await?, rx)) });
        let mut wake = Wakeups::new(events, Duration::from_secs(60));
        let start = tokio::time::Instant::now();
        wake.next().await;
        assert_eq!(
            start.elapsed(),
            Duration::ZERO,
            "the first wake-up is at once"
        );
        tx.send(1).unwrap();
        wake.next().await;
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "an event wakes before the period"
        );
        drop(tx);
        wake.next().await;
        assert_eq!(start.elapsed(), Duration::from_secs(60), "then the period");
    }
}
