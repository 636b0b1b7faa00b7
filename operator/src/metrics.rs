//! Prometheus metrics: cutovers by kind, cutover duration, reconcile errors by reason and step.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabel {
    pub reason: String,
    /// The reconcile step that failed (`controller::Error::step`).
    pub step: String,
}

fn duration_histogram() -> Histogram {
    // 0.25 s .. ~2 min: planned switchovers take seconds, failovers include the threshold.
    Histogram::new([0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0])
}

#[derive(Clone)]
pub struct Metrics {
    pub cutovers: Family<KindLabel, Counter>,
    pub cutover_duration: Family<KindLabel, Histogram, fn() -> Histogram>,
    pub reconcile_errors: Family<ErrorLabel, Counter>,
    pub reconciles: Counter,
    registry: Arc<Registry>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let cutovers = Family::<KindLabel, Counter>::default();
        let cutover_duration =
            Family::<KindLabel, Histogram, fn() -> Histogram>::new_with_constructor(
                duration_histogram,
            );
        let reconcile_errors = Family::<ErrorLabel, Counter>::default();
        let reconciles = Counter::default();
        let mut r = Registry::with_prefix("identitymesh_operator");
        r.register("cutovers", "Completed cutovers by kind", cutovers.clone());
        r.register(
            "cutover_duration_seconds",
            "Time from cutover start until the new active verified",
            cutover_duration.clone(),
        );
        r.register(
            "reconcile_errors",
            "Reconcile errors by reason and failed step",
            reconcile_errors.clone(),
        );
        r.register("reconciles", "Reconcile runs", reconciles.clone());
        Self {
            cutovers,
            cutover_duration,
            reconcile_errors,
            reconciles,
            registry: Arc::new(r),
        }
    }

    pub fn cutover_finished(&self, kind: &str, seconds: f64) {
        let l = KindLabel {
            kind: kind.to_string(),
        };
        self.cutovers.get_or_create(&l).inc();
        self.cutover_duration.get_or_create(&l).observe(seconds);
    }

    pub fn reconcile_error(&self, reason: &str, step: &str) {
        self.reconcile_errors
            .get_or_create(&ErrorLabel {
                reason: reason.to_string(),
                step: step.to_string(),
            })
            .inc();
    }

    /// Text exposition format.
    pub fn render(&self) -> String {
        let mut s = String::new();
        if prometheus_client::encoding::text::encode(&mut s, &self.registry).is_err() {
            s.clear();
        }
        s
    }
}

/// Serve /metrics and /healthz on `addr` until the process ends.
pub async fn serve(metrics: Metrics, addr: std::net::SocketAddr) -> std::io::Result<()> {
    use axum::routing::get;
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let m = metrics.clone();
                async move {
                    (
                        [(
                            "content-type",
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        m.render(),
                    )
                }
            }),
        )
        .route("/healthz", get(|| async { "ok" }));
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, app).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_histograms() {
        let m = Metrics::new();
        m.cutover_finished("Switchover", 1.2);
        m.cutover_finished("Failover", 4.0);
        m.reconcile_error("Kube", "read_secret");
        let out = m.render();
        assert!(
            out.contains("identitymesh_operator_cutovers_total{kind=\"Switchover\"} 1"),
            "{out}"
        );
        assert!(
            out.contains("identitymesh_operator_cutover_duration_seconds_bucket"),
            "{out}"
        );
        assert!(
            out.contains(
                "identitymesh_operator_reconcile_errors_total{reason=\"Kube\",step=\"read_secret\"} 1"
            ),
            "{out}"
        );
    }
}
