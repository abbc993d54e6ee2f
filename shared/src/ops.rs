//! The operations HTTP endpoint each binary serves when `http_addr` is set:
//! `/metrics` (Prometheus text), `/healthz` (the process is alive) and
//! `/readyz` (connected to Redis and the broker; the producer adds its role).

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use futures::future::BoxFuture;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

/// Histogram buckets (seconds) for every `*_seconds` metric.
const BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0, 900.0, 3600.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide Prometheus recorder (once) and returns its handle.
pub fn metrics_handle() -> Result<PrometheusHandle, String> {
    if let Some(h) = HANDLE.get() {
        return Ok(h.clone());
    }
    let builder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), BUCKETS)
        .map_err(|e| format!("configuring metric buckets: {e}"))?;
    let handle = match builder.install_recorder() {
        Ok(h) => h,
        // Another caller won the race; use theirs.
        Err(_) => {
            return HANDLE
                .get()
                .cloned()
                .ok_or_else(|| "a different metrics recorder is installed".to_string())
        }
    };
    Ok(HANDLE.get_or_init(|| handle).clone())
}

/// What `/readyz` reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Readiness {
    /// True when the process can do its work.
    pub ready: bool,
    /// Details (connections, role).
    #[serde(flatten)]
    pub detail: serde_json::Map<String, serde_json::Value>,
}

/// Computes readiness on each `/readyz` request.
pub type ReadyCheck = Arc<dyn Fn() -> BoxFuture<'static, Readiness> + Send + Sync>;

#[derive(Clone)]
struct AppState {
    metrics: PrometheusHandle,
    ready: ReadyCheck,
}

async fn metrics(State(s): State<AppState>) -> impl IntoResponse {
    s.metrics.run_upkeep();
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        s.metrics.render(),
    )
}

async fn healthz() -> impl IntoResponse {
    (StatusCode::OK, "ok\n")
}

async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    let r = (s.ready)().await;
    let code = if r.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(r))
}

/// Binds `addr` and serves the endpoints until `shutdown`. Returns the bound
/// address (useful with port 0) and the server task.
pub async fn serve(
    addr: SocketAddr,
    ready: ReadyCheck,
    extra: Option<Router>,
    shutdown: CancellationToken,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let handle = metrics_handle().map_err(std::io::Error::other)?;
    let mut app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(AppState {
            metrics: handle,
            ready,
        });
    if let Some(extra) = extra {
        app = app.merge(extra);
    }
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "Ops HTTP server failed");
        }
    });
    tracing::info!(addr = %bound, "Serving /metrics, /healthz and /readyz");
    Ok((bound, task))
}

/// Connections a binary reports readiness on; filled once connected.
pub type Connections = Arc<OnceLock<(crate::Store, crate::Broker)>>;

/// A readiness check: ready when Redis answers as a primary (within 1 s; see
/// [`Store::ping`](crate::Store::ping)) and the broker connection is up. `role` adds fields (the producer's leader state).
pub fn readiness(
    conns: Connections,
    role: Option<Arc<dyn Fn() -> serde_json::Map<String, serde_json::Value> + Send + Sync>>,
) -> ReadyCheck {
    Arc::new(move || {
        let conns = conns.clone();
        let role = role.clone();
        Box::pin(async move {
            let mut detail = serde_json::Map::new();
            let (redis, broker) = match conns.get() {
                None => (false, false),
                Some((store, broker)) => {
                    let redis = matches!(
                        tokio::time::timeout(std::time::Duration::from_secs(1), store.ping()).await,
                        Ok(Ok(()))
                    );
                    (redis, broker.is_connected())
                }
            };
            detail.insert("redis".into(), redis.into());
            detail.insert("broker".into(), broker.into());
            if let Some(role) = role {
                detail.extend(role());
            }
            Readiness {
                ready: redis && broker,
                detail,
            }
        })
    })
}
