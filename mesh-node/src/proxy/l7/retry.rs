//! The attempts of one request: pick an endpoint, send, and decide whether to try again, as
//! Envoy's router does under a route's retry policy.

use super::*;

/// Envoy's base interval between retries; each retry waits a random time up to
/// `25 ms × 2^(retry-1)`, capped at ten times the base.
pub(super) const RETRY_BASE: Duration = Duration::from_millis(25);

/// Istio's retry policy for routes that set none: two retries on connection failures,
/// refused streams and gRPC `UNAVAILABLE`/`CANCELLED`, and HTTP 503.
pub(super) fn default_retries() -> RetryPlan {
    RetryPlan::istio_default()
}

/// The attempts of one request: pick an endpoint, send, decide whether to retry.
pub(super) struct Attempts<'a> {
    pub(super) view: &'a View,
    pub(super) resolved: &'a Resolved,
    pub(super) plan: &'a RetryPlan,
    pub(super) idempotent_only: bool,
    pub(super) per_try_timeout: Option<Duration>,
    pub(super) proto: Proto,
}

pub(super) type Failure = (StatusCode, ResponseFlags, &'static str);

pub(super) const NO_HEALTHY_UPSTREAM: Failure = (
    StatusCode::SERVICE_UNAVAILABLE,
    ResponseFlags::UH,
    "no healthy upstream",
);

/// A request the AuthorizationPolicies of a pod of this node denied.
pub(super) const DENIED: Failure = (
    StatusCode::FORBIDDEN,
    ResponseFlags::NONE,
    authz::DENIED_BODY,
);

/// The client's request body was malformed or broke off (Envoy's `DPE`).
pub(super) const DOWNSTREAM_PROTOCOL_ERROR: Failure = (
    StatusCode::BAD_REQUEST,
    ResponseFlags::DPE,
    "downstream protocol error",
);

impl Attempts<'_> {
    pub(super) async fn run(
        &self,
        report: &mut Report,
        parts: &Parts,
        first_body: RequestBody,
        tape: Option<&Tape>,
    ) -> Result<(Response<UpstreamBody>, (InFlight, Pick)), Failure> {
        let conn = report.conn.clone();
        let cluster = &self.resolved.cluster;
        let hash = cluster.request_hash(&parts.headers, &parts.uri, *conn.client.ip());
        let idempotent = is_idempotent(&parts.method);
        let mut body = Some(first_body);
        let mut avoid = None;
        let mut retries_left = self.plan.attempts;
        let mut retried = false;
        let mut retry_slot;
        loop {
            // A retry slot taken while the response that asks for the retry is still in hand.
            let mut taken = None;
            let Some(pick) = conn.pick(cluster, hash, avoid) else {
                return Err(NO_HEALTHY_UPSTREAM);
            };
            let key = match conn.conn_key(self.view, cluster, &pick, self.proto) {
                Ok(key) => key,
                Err(e) => {
                    info!("{e}");
                    return Err(NO_HEALTHY_UPSTREAM);
                }
            };
            report.upstream = Some(pick.addr);
            report.destination = pick.pod.clone();
            // The pod's span opens before its policies decide, as at a destination proxy.
            Trace::attempt(
                &mut report.trace,
                self.view,
                &conn,
                pick.pod.as_ref(),
                &parts.headers,
            );
            if let Err(denied) = conn.authorize_local(self.view, pick.addr, parts) {
                report.details = Some(denied.detail);
                report.seen_by_destination = true;
                return Err(DENIED);
            }
            let request_body = match body.take() {
                Some(b) => b,
                None => match replay(tape) {
                    Some(b) => b,
                    None => unreachable!("a retry is only started with a replayable body"),
                },
            };
            let mut request = Request::from_parts(parts.clone(), request_body);
            Trace::sent(report.trace.as_deref(), request.headers_mut());
            conn.set_forwarded_client_cert(request.headers_mut(), pick.pod.as_deref());
            // A pod of this node that logs its requests sees them as this attempt sends them.
            if report.request_headers.is_some() {
                let local = pick
                    .pod
                    .as_ref()
                    .filter(|p| conn.ctx.dialer.serves(&self.view.snapshot, p));
                report.attempt_headers = local
                    .filter(|p| self.view.access_logs(p, false).is_some())
                    .map(|_| Box::new(request.headers().clone()));
            }
            let started = Instant::now();
            report.attempt_start = Some(started);
            let send = self.resolved.pool.send(
                cluster.state(),
                cluster.policy(),
                &key,
                conn.dial(cluster.policy()),
                request,
            );
            let result = match self.per_try_timeout {
                Some(t) => tokio::time::timeout(t, send).await.map_err(|_| ()),
                None => Ok(send.await),
            };
            let now = Instant::now();
            // Not processed upstream: as safe to send again as one never sent.
            let refused = matches!(&result, Ok(Err(e)) if e.refused());
            // What went wrong, whether the policy retries it, and how it is answered if not.
            let (retry_on, failure): (bool, Failure) = match result {
                Ok(Ok((response, in_flight))) => {
                    report.upstream_time = Some(now.duration_since(started));
                    let status = response.status().as_u16();
                    let grpc_status = body::grpc_status(response.headers());
                    let outcome = if status >= 500 {
                        Outcome::Status(status)
                    } else {
                        Outcome::Success
                    };
                    if cluster.report(&pick, outcome, now) {
                        info!(endpoint = %pick.addr, cluster = %cluster.key(), "outlier detection ejected an endpoint");
                    }
                    let retriable = self.plan.retries_status(status)
                        || grpc_status.is_some_and(|s| self.retries_grpc(s));
                    // Retried only with a slot of the cluster's `maxRetries`: without one the
                    // response goes to the client, as Envoy passes it on at retry overflow.
                    taken =
                        (retriable && retries_left > 0 && self.may_repeat(idempotent, tape, false))
                            .then(|| cluster.state().try_retry(&cluster.policy().limits))
                            .flatten();
                    if taken.is_none() {
                        if retriable && retried {
                            report.flags |= ResponseFlags::URX;
                        }
                        return Ok((response, (in_flight, pick)));
                    }
                    drop(response);
                    report.attempt_at_destination(
                        pick.pod.as_ref(),
                        (status, grpc_status),
                        ResponseFlags::NONE,
                        started,
                    );
                    (
                        true,
                        (StatusCode::SERVICE_UNAVAILABLE, ResponseFlags::NONE, ""),
                    )
                }
                Ok(Err(PoolError::Overflow(limit))) => {
                    debug!(cluster = %cluster.key(), "circuit breaker open: {limit}");
                    return Err((StatusCode::SERVICE_UNAVAILABLE, ResponseFlags::UO, "upstream connect error or disconnect/reset before headers. reset reason: overflow"));
                }
                Ok(Err(e)) if e.refused() => {
                    // A draining server's GOAWAY, or REFUSED_STREAM: the request was not
                    // processed (RFC 9113 §8.7), whatever its method; not the endpoint's failure.
                    debug!("{e}");
                    (
                        self.plan.on(RetryPolicy::RefusedStream)
                            || self.plan.on(RetryPolicy::ResetBeforeRequest)
                            || self.plan.on(RetryPolicy::Reset),
                        (StatusCode::SERVICE_UNAVAILABLE, ResponseFlags::UR, "upstream connect error or disconnect/reset before headers. reset reason: remote refused stream reset"),
                    )
                }
                Ok(Err(e)) if e.before_request() => {
                    // A certificate that does not verify is a configuration problem an
                    // operator has to see; a refused connection is routine.
                    let details = if e.is_tls() {
                        info!("{e}");
                        "upstream connect error or disconnect/reset before headers. reset reason: connection failure, transport failure reason: TLS error"
                    } else {
                        debug!("{e}");
                        "upstream connect error or disconnect/reset before headers. reset reason: connection failure"
                    };
                    cluster.report(&pick, Outcome::ConnectFailure, now);
                    (
                        self.plan.on(RetryPolicy::ConnectFailure)
                            || self.plan.on(RetryPolicy::ResetBeforeRequest)
                            || self.plan.on(RetryPolicy::FiveXx)
                            || self.plan.on(RetryPolicy::GatewayError),
                        (StatusCode::SERVICE_UNAVAILABLE, ResponseFlags::UF, details),
                    )
                }
                Ok(Err(e)) if tape.is_some_and(Tape::downstream_failed) => {
                    // The client's body was malformed or cut: not the upstream's failure.
                    debug!("request body from the client failed: {e}");
                    return Err(DOWNSTREAM_PROTOCOL_ERROR);
                }
                Ok(Err(e)) => {
                    debug!("{e}");
                    cluster.report(&pick, Outcome::Reset, now);
                    report.attempt_at_destination(
                        pick.pod.as_ref(),
                        (0, None),
                        ResponseFlags::UR,
                        started,
                    );
                    (
                        self.plan.on(RetryPolicy::Reset) || self.plan.on(RetryPolicy::FiveXx),
                        (StatusCode::SERVICE_UNAVAILABLE, ResponseFlags::UR, "upstream connect error or disconnect/reset before headers. reset reason: remote reset"),
                    )
                }
                Err(()) => {
                    cluster.report(&pick, Outcome::Timeout, now);
                    // The destination sees its client give up.
                    report.attempt_at_destination(
                        pick.pod.as_ref(),
                        (0, None),
                        ResponseFlags::DC,
                        started,
                    );
                    (
                        self.plan.on(RetryPolicy::FiveXx)
                            || self.plan.on(RetryPolicy::GatewayError),
                        (
                            StatusCode::GATEWAY_TIMEOUT,
                            ResponseFlags::UT,
                            "upstream request timeout",
                        ),
                    )
                }
            };
            let before_request = failure.1 == ResponseFlags::UF || refused;
            // `maxRetries` bounds the retries in flight in the cluster: the slot is held until
            // the next attempt ends.
            retry_slot = match taken {
                Some(slot) => Some(slot),
                None => (retry_on
                    && retries_left > 0
                    && self.may_repeat(idempotent, tape, before_request))
                .then(|| cluster.state().try_retry(&cluster.policy().limits))
                .flatten(),
            };
            if retry_slot.is_none() {
                let (status, mut flags, text) = failure;
                if retried && retry_on {
                    flags |= ResponseFlags::URX;
                }
                if status == StatusCode::SERVICE_UNAVAILABLE && flags == ResponseFlags::NONE {
                    unreachable!("a response is returned above when it is not retried");
                }
                return Err((status, flags, text));
            }
            retries_left -= 1;
            retried = true;
            avoid = Some(pick.addr);
            drop(pick);
            tokio::time::sleep(backoff(self.plan.attempts - retries_left)).await;
        }
    }

    /// Whether the request may be sent again: its body must be replayable, and without a
    /// retry policy the user configured, only idempotent requests (or requests that never
    /// reached the upstream) are repeated.
    fn may_repeat(&self, idempotent: bool, tape: Option<&Tape>, before_request: bool) -> bool {
        let replayable = tape.is_none_or(|t| t.replay().is_some());
        replayable && (before_request || idempotent || !self.idempotent_only)
    }

    fn retries_grpc(&self, status: u32) -> bool {
        let policy = match status {
            1 => RetryPolicy::Cancelled,
            4 => RetryPolicy::DeadlineExceeded,
            8 => RetryPolicy::ResourceExhausted,
            13 => RetryPolicy::Internal,
            14 => RetryPolicy::Unavailable,
            _ => return false,
        };
        self.plan.on(policy)
    }
}

pub(super) fn replay(tape: Option<&Tape>) -> Option<RequestBody> {
    match tape {
        None => Some(RequestBody::Empty),
        Some(t) => t.replay(),
    }
}

/// Envoy's jittered exponential back-off before retry number `n` (1-based).
pub(super) fn backoff(n: u32) -> Duration {
    let ceiling = RETRY_BASE
        .saturating_mul(1 << n.saturating_sub(1).min(16))
        .min(RETRY_BASE * 10);
    ceiling.mul_f64(fastrand::f64())
}

pub(super) fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

#[cfg(test)]
mod tests {
    use crate::{
        model::Snapshot,
        proxy::{
            route::RetryPolicies,
            upstream::cluster::{ClusterState, Clusters},
        },
    };

    use super::*;

    fn plan(policies: &[RetryPolicy]) -> RetryPlan {
        let mut set = RetryPolicies::default();
        for p in policies {
            set.insert(*p);
        }
        RetryPlan {
            attempts: 2,
            per_try_timeout: None,
            policies: set,
            statuses: Arc::from([]),
        }
    }

    /// The attempts of a request to an empty cluster, under `plan`.
    fn with_attempts<T>(
        plan: &RetryPlan,
        idempotent_only: bool,
        test: impl FnOnce(&Attempts<'_>) -> T,
    ) -> T {
        let clusters = Clusters::default();
        let snapshot = Arc::new(Snapshot::default());
        let view = View::new(snapshot.clone(), None, &clusters);
        let key = ClusterKey::new(ObjectKey::new("bookinfo", "reviews"), 9080, None);
        let cluster = Cluster::build(
            &snapshot,
            key,
            ClusterPolicy::default(),
            Arc::new(ClusterState::new()),
        )
        .unwrap();
        let resolved = Resolved {
            cluster: Arc::new(cluster),
            pool: Arc::default(),
        };
        test(&Attempts {
            view: &view,
            resolved: &resolved,
            plan,
            idempotent_only,
            per_try_timeout: None,
            proto: Proto::Http1,
        })
    }

    #[test]
    fn backoff_stays_within_envoys_bounds() {
        for n in 1..=40 {
            let ceiling = RETRY_BASE
                .saturating_mul(1 << (n - 1).min(16))
                .min(Duration::from_millis(250));
            let waits: Vec<Duration> = (0..200).map(|_| backoff(n)).collect();
            assert!(waits.iter().all(|w| *w <= ceiling), "retry {n}: {waits:?}");
            assert!(
                waits.windows(2).any(|w| w[0] != w[1]),
                "retry {n} is jittered"
            );
        }
        assert!((0..200).all(|_| backoff(1) <= Duration::from_millis(25)));
        assert!((0..200).all(|_| backoff(40) <= Duration::from_millis(250)));
    }

    #[test]
    fn idempotent_methods_are_those_rfc_9110_names() {
        for method in [
            Method::GET,
            Method::HEAD,
            Method::OPTIONS,
            Method::PUT,
            Method::DELETE,
            Method::TRACE,
        ] {
            assert!(is_idempotent(&method), "{method}");
        }
        for method in [Method::POST, Method::PATCH, Method::CONNECT] {
            assert!(!is_idempotent(&method), "{method}");
        }
    }

    #[test]
    fn without_a_configured_policy_only_safe_requests_are_repeated() {
        let plan = default_retries();
        with_attempts(&plan, true, |attempts| {
            // No body: always replayable.
            assert!(attempts.may_repeat(true, None, false), "GET");
            assert!(
                !attempts.may_repeat(false, None, false),
                "a POST that reached the upstream"
            );
            assert!(
                attempts.may_repeat(false, None, true),
                "a POST that never left"
            );
        });
    }

    #[test]
    fn a_configured_policy_repeats_any_method() {
        let plan = plan(&[RetryPolicy::FiveXx]);
        with_attempts(&plan, false, |attempts| {
            assert!(attempts.may_repeat(false, None, false));
        });
    }

    #[test]
    fn a_body_that_cannot_be_replayed_is_never_repeated() {
        // A tape that has not seen the end of its body (or lost it past the limit).
        let tape = Tape::default();
        assert!(replay(Some(&tape)).is_none());
        let plan = plan(&[RetryPolicy::FiveXx]);
        with_attempts(&plan, false, |attempts| {
            assert!(!attempts.may_repeat(true, Some(&tape), true));
        });
        assert!(matches!(replay(None), Some(RequestBody::Empty)));
    }

    #[test]
    fn grpc_statuses_are_retried_by_their_policy_names() {
        let istio = default_retries();
        with_attempts(&istio, true, |attempts| {
            assert!(attempts.retries_grpc(14), "unavailable");
            assert!(attempts.retries_grpc(1), "cancelled");
            assert!(
                !attempts.retries_grpc(4),
                "deadline-exceeded is not in Istio's default"
            );
            assert!(!attempts.retries_grpc(0), "OK");
        });
        let custom = plan(&[
            RetryPolicy::DeadlineExceeded,
            RetryPolicy::ResourceExhausted,
            RetryPolicy::Internal,
        ]);
        with_attempts(&custom, false, |attempts| {
            assert!(attempts.retries_grpc(4));
            assert!(attempts.retries_grpc(8));
            assert!(attempts.retries_grpc(13));
            assert!(!attempts.retries_grpc(14));
            assert!(!attempts.retries_grpc(2), "UNKNOWN has no policy");
        });
    }

    #[test]
    fn istios_default_retries_twice_on_503_only() {
        let plan = default_retries();
        assert_eq!(plan.attempts, 2);
        assert!(plan.retries_status(503));
        for status in [500, 502, 504, 404] {
            assert!(!plan.retries_status(status), "{status}");
        }
        assert!(plan.on(RetryPolicy::ConnectFailure));
        assert!(!plan.on(RetryPolicy::Reset));
    }
}
