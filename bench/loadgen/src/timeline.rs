//! `run --interval-s`: the fixed-rate window cut into intervals (requests, failures and
//! latency in each), for runs that change the mesh under load (`cargo xtask bench chaos` and
//! `soak`), which need to know *when* requests failed or slowed, not only how many.
//!
//! Every measured request is kept as (when it was due, its latency or its failure) and cut
//! into intervals at the end: at the rates of those runs (hundreds of requests a second for
//! tens of minutes) that is a few megabytes, and exact.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::client::latency_histogram;

/// Error messages kept per connection: enough to say what failed in each interval of an
/// outage, bounded whatever the outage.
const MESSAGES_PER_CONN: usize = 200;

/// One connection's measured requests, by when they were due.
#[derive(Debug, Default)]
pub struct Timeline {
    /// (milliseconds from the window's start, latency in µs; `None` for a failure).
    events: Vec<(u32, Option<u32>)>,
    /// (milliseconds from the window's start, what failed), the first [`MESSAGES_PER_CONN`].
    messages: Vec<(u32, String)>,
}

impl Timeline {
    pub fn answered(&mut self, due: Duration, latency: Duration) {
        let us = u32::try_from(latency.as_micros()).unwrap_or(u32::MAX);
        self.events.push((millis(due), Some(us)));
    }

    pub fn failed(&mut self, due: Duration, error: &anyhow::Error) {
        self.events.push((millis(due), None));
        if self.messages.len() < MESSAGES_PER_CONN {
            self.messages.push((millis(due), format!("{error:#}")));
        }
    }

    pub fn merge(&mut self, other: Timeline) {
        self.events.extend(other.events);
        self.messages.extend(other.messages);
    }

    /// The window (`length` long) cut into intervals of `interval`; the last one may be
    /// shorter.
    pub fn intervals(mut self, interval: Duration, length: Duration) -> Vec<Interval> {
        let step = millis(interval).max(1);
        let count = millis(length).div_ceil(step).max(1) as usize;
        let mut out: Vec<Interval> = (0..count)
            .map(|i| Interval::new(f64::from(i as u32 * step) / 1000.0))
            .collect();
        let mut histograms: Vec<_> = (0..count).map(|_| latency_histogram()).collect();
        self.messages.sort_by_key(|(at, _)| *at);
        for (at, message) in self.messages {
            let slot = &mut out[((at / step) as usize).min(count - 1)];
            slot.first_error.get_or_insert(message);
        }
        for (at, outcome) in self.events {
            let i = ((at / step) as usize).min(count - 1);
            match outcome {
                Some(us) => {
                    out[i].requests += 1;
                    histograms[i].saturating_record(u64::from(us).max(1) * 1000);
                }
                None => out[i].errors += 1,
            }
        }
        for (slot, histogram) in out.iter_mut().zip(histograms) {
            if slot.requests > 0 {
                let us = |q: f64| round1(histogram.value_at_quantile(q) as f64 / 1000.0);
                slot.p50_us = us(0.5);
                slot.p99_us = us(0.99);
                slot.max_us = round1(histogram.max() as f64 / 1000.0);
            }
        }
        out
    }
}

/// What an interval of the window saw.
#[derive(Debug, Serialize, PartialEq)]
pub struct Interval {
    /// Seconds from the window's start to the interval's.
    pub t_s: f64,
    /// Requests due in the interval that were answered.
    pub requests: u64,
    /// Requests due in the interval that failed.
    pub errors: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    /// The first failure of the interval, for the operator.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
}

impl Interval {
    fn new(t_s: f64) -> Self {
        Self {
            t_s,
            requests: 0,
            errors: 0,
            p50_us: 0.0,
            p99_us: 0.0,
            max_us: 0.0,
            first_error: None,
        }
    }
}

/// When `at` is on the wall clock, milliseconds since the Unix epoch (for lining intervals up
/// with what others did meanwhile).
pub fn unix_ms(at: Instant) -> u64 {
    let now = Instant::now();
    let wall = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let wall = if at >= now {
        wall + (at - now)
    } else {
        wall.saturating_sub(now - at)
    };
    u64::try_from(wall.as_millis()).unwrap_or(u64::MAX)
}

fn millis(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

fn round1(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_failures_land_in_the_interval_they_were_due_in() {
        let mut a = Timeline::default();
        let mut b = Timeline::default();
        for ms in 0..1000 {
            a.answered(Duration::from_millis(ms), Duration::from_micros(100 + ms));
        }
        let refused = anyhow::anyhow!("connecting: refused");
        b.failed(Duration::from_millis(1500), &refused);
        b.failed(Duration::from_millis(1200), &anyhow::anyhow!("reset"));
        b.answered(Duration::from_millis(2100), Duration::from_millis(7));
        a.merge(b);
        let intervals = a.intervals(Duration::from_secs(1), Duration::from_millis(2500));
        assert_eq!(intervals.len(), 3);
        assert_eq!((intervals[0].requests, intervals[0].errors), (1000, 0));
        assert!((intervals[0].p50_us - 600.0).abs() < 2.0, "{intervals:?}");
        assert!((intervals[0].p99_us - 1090.0).abs() < 2.0, "{intervals:?}");
        assert_eq!(intervals[0].first_error, None);
        // The earliest failure of the interval is the one named.
        assert_eq!((intervals[1].requests, intervals[1].errors), (0, 2));
        assert_eq!(intervals[1].first_error.as_deref(), Some("reset"));
        assert_eq!(intervals[1].p99_us, 0.0);
        assert_eq!(intervals[2].t_s, 2.0);
        assert_eq!(intervals[2].requests, 1);
        assert!((intervals[2].max_us - 7000.0).abs() < 10.0, "{intervals:?}");
    }

    #[test]
    fn wall_clock_of_an_instant() {
        let now = Instant::now();
        let ms = unix_ms(now);
        assert!(unix_ms(now + Duration::from_secs(2)) - ms >= 1999);
        assert!(ms - unix_ms(now - Duration::from_secs(1)) >= 999);
    }
}
