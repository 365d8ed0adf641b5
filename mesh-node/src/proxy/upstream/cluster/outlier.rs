//! Outlier detection: per-endpoint health counters and the ejection they decide.

use super::*;

/// Outlier detection settings, with Envoy's defaults applied (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outlier {
    /// Consecutive 5xx (and, without the split, local failures) that eject; `None`: off.
    pub consecutive_5xx: Option<u32>,
    /// Consecutive 502/503/504 (and, without the split, local failures) that eject.
    pub consecutive_gateway: Option<u32>,
    /// Consecutive local failures that eject; `Some` only with
    /// `splitExternalLocalOriginErrors`, which keeps local failures out of the other counters.
    pub consecutive_local_origin: Option<u32>,
    /// How often Envoy sweeps; here it only paces the decay of the backoff multiplier.
    pub interval: Duration,
    pub base_ejection_time: Duration,
    pub max_ejection_time: Duration,
    /// 0-100.
    pub max_ejection_percent: u32,
    /// 0-100; below this share of healthy endpoints, picks ignore ejections.
    pub min_health_percent: u32,
    /// Allows one ejection even when it exceeds `max_ejection_percent`. Envoy did so until
    /// 1.31; since then only with `always_eject_one_host`, which Istio does not set, so a
    /// cluster of fewer than 10 endpoints under the default 10% ejects none there.
    pub always_eject_one: bool,
}

impl Default for Outlier {
    /// An empty `outlierDetection: {}` block.
    fn default() -> Self {
        Self::from(&OutlierDetection::default())
    }
}

impl From<&OutlierDetection> for Outlier {
    fn from(detection: &OutlierDetection) -> Self {
        let base_ejection_time = detection
            .base_ejection_time
            .unwrap_or(Duration::from_secs(30));
        Self {
            consecutive_5xx: match detection.consecutive_5xx_errors {
                None => Some(5),
                errors => positive(errors),
            },
            consecutive_gateway: positive(detection.consecutive_gateway_errors),
            consecutive_local_origin: detection
                .split_external_local_origin_errors
                .then(|| positive(detection.consecutive_local_origin_failures).unwrap_or(5)),
            interval: detection.interval.unwrap_or(Duration::from_secs(10)),
            base_ejection_time,
            max_ejection_time: MAX_EJECTION_TIME.max(base_ejection_time),
            max_ejection_percent: positive(detection.max_ejection_percent).unwrap_or(10),
            min_health_percent: detection.min_health_percent.unwrap_or(0),
            always_eject_one: true,
        }
    }
}

/// Which detector an outcome tripped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Detector {
    FiveXx,
    Gateway,
    LocalOrigin,
}

/// Outlier state of one endpoint address; it outlives snapshots, kept by the [`ClusterState`].
#[derive(Debug)]
pub struct EndpointHealth {
    pub(super) addr: SocketAddrV4,
    pub(super) epoch: Instant,
    pub(super) active: AtomicU32,
    pub(super) consecutive_5xx: AtomicU32,
    pub(super) consecutive_gateway: AtomicU32,
    pub(super) consecutive_local: AtomicU32,
    /// When the last ejection ends, in nanoseconds since `epoch`; 0 if never ejected.
    pub(super) ejected_until: AtomicU64,
    /// Envoy's ejection time multiplier.
    pub(super) backoff: AtomicU32,
}

impl EndpointHealth {
    pub(super) fn new(addr: SocketAddrV4, epoch: Instant) -> Self {
        Self {
            addr,
            epoch,
            active: AtomicU32::new(0),
            consecutive_5xx: AtomicU32::new(0),
            consecutive_gateway: AtomicU32::new(0),
            consecutive_local: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            backoff: AtomicU32::new(0),
        }
    }

    pub fn addr(&self) -> SocketAddrV4 {
        self.addr
    }

    /// Requests in flight (picks not yet dropped).
    pub fn active_requests(&self) -> u32 {
        self.active.load(Ordering::Relaxed)
    }

    pub fn is_ejected(&self, now: Instant) -> bool {
        self.ejected_at(offset(self.epoch, now))
    }

    /// When the current ejection ends, if the endpoint is ejected.
    pub fn ejected_until(&self, now: Instant) -> Option<Instant> {
        let until = self.ejected_until.load(Ordering::Acquire);
        (offset(self.epoch, now) < until).then(|| self.epoch + Duration::from_nanos(until))
    }

    pub(super) fn ejected_at(&self, now: u64) -> bool {
        now < self.ejected_until.load(Ordering::Acquire)
    }

    pub(super) fn counter(&self, detector: Detector) -> &AtomicU32 {
        match detector {
            Detector::FiveXx => &self.consecutive_5xx,
            Detector::Gateway => &self.consecutive_gateway,
            Detector::LocalOrigin => &self.consecutive_local,
        }
    }

    /// Counts `outcome`; returns the detector whose threshold it reached.
    pub(super) fn record(&self, outcome: Outcome, outlier: &Outlier) -> Option<Detector> {
        let bump = |detector| self.counter(detector).fetch_add(1, Ordering::Relaxed) + 1;
        let reset = |detector| {
            let counter = self.counter(detector);
            // Most outcomes are successes: skip the write when there is nothing to reset.
            if counter.load(Ordering::Relaxed) != 0 {
                counter.store(0, Ordering::Relaxed);
            }
        };
        let status = match outcome {
            Outcome::ConnectFailure | Outcome::Reset | Outcome::Timeout
                if outlier.consecutive_local_origin.is_some() =>
            {
                let count = bump(Detector::LocalOrigin);
                return outlier
                    .consecutive_local_origin
                    .is_some_and(|t| count >= t)
                    .then_some(Detector::LocalOrigin);
            }
            Outcome::ConnectFailure | Outcome::Reset => 503,
            Outcome::Timeout => 504,
            Outcome::Status(status) => status,
            Outcome::Success => 200,
        };
        // A response means the connection worked.
        if matches!(outcome, Outcome::Status(_) | Outcome::Success) {
            reset(Detector::LocalOrigin);
        }
        if status < 500 {
            reset(Detector::FiveXx);
            reset(Detector::Gateway);
            return None;
        }
        let gateway = if matches!(status, 502..=504) {
            bump(Detector::Gateway)
        } else {
            reset(Detector::Gateway);
            0
        };
        let five_xx = bump(Detector::FiveXx);
        if outlier.consecutive_gateway.is_some_and(|t| gateway >= t) {
            Some(Detector::Gateway)
        } else if outlier.consecutive_5xx.is_some_and(|t| five_xx >= t) {
            Some(Detector::FiveXx)
        } else {
            None
        }
    }
}
