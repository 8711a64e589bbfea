//! The HTTP endpoint: `/healthz` (the process is alive), `/readyz` (every
//! realm's last poll succeeded within three poll intervals) and `/metrics`
//! (Prometheus text format). HTTP/1 only; it serves nothing else.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use chrono::Utc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::metrics::Metrics;

#[derive(Debug, thiserror::Error)]
#[error("cannot listen on NOTIFIER_HTTP_ADDR={addr}: {source}")]
pub struct BindError {
    pub addr: SocketAddr,
    pub source: std::io::Error,
}

#[derive(Clone)]
struct AppState {
    metrics: Arc<Metrics>,
    realms: Vec<String>,
    ready_within: Duration,
}

/// Binds `addr` (at start-up, so that a taken port is a clear error).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, BindError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| BindError { addr, source })
}

/// Serves until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    realms: Vec<String>,
    poll_interval: Duration,
    shutdown: CancellationToken,
) {
    let state = AppState {
        metrics,
        realms,
        ready_within: poll_interval * 3,
    };
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(state);
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "serving /healthz, /readyz and /metrics");
    }
    let stopped = async move { shutdown.cancelled().await };
    if let Err(err) = axum::serve(listener, app)
        .with_graceful_shutdown(stopped)
        .await
    {
        warn!(error = %err, "the HTTP endpoint stopped");
    }
}

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let now = Utc::now().timestamp_millis();
    if state.metrics.ready(&state.realms, now, state.ready_within) {
        (StatusCode::OK, "ready\n".to_owned())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "not ready: no successful poll of every realm within the last {}\n",
                humantime::format_duration(state.ready_within)
            ),
        )
    }
}

async fn metrics_text(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(Utc::now().timestamp_millis()),
    )
}

/// `healthcheck` against a running notifier: `GET /healthz` on `addr` (an
/// unspecified address such as 0.0.0.0 means this host). Plain std
/// networking: it runs in the scratch image, every 30 s.
pub fn probe(addr: SocketAddr) -> Result<String, String> {
    use std::io::{Read, Write};
    let mut target = addr;
    if target.ip().is_unspecified() {
        target.set_ip(if addr.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    let timeout = Duration::from_secs(3);
    let fail = |err: std::io::Error| format!("unhealthy: http://{target}/healthz: {err}");
    let mut stream = std::net::TcpStream::connect_timeout(&target, timeout).map_err(fail)?;
    stream.set_read_timeout(Some(timeout)).map_err(fail)?;
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .map_err(fail)?;
    let mut response = String::new();
    stream.read_to_string(&mut response).map_err(fail)?;
    let status = response.lines().next().unwrap_or_default().to_owned();
    if status.starts_with("HTTP/1.1 200") {
        Ok(format!("alive: http://{target}/healthz answered {status}"))
    } else {
        Err(format!(
            "unhealthy: http://{target}/healthz answered {status:?}"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_endpoints_answer_and_readiness_follows_the_polls() {
        let metrics = Arc::new(Metrics::default());
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve(
            listener,
            metrics.clone(),
            vec!["test".into()],
            Duration::from_secs(10),
            shutdown.clone(),
        ));
        let get = |path: &'static str| async move {
            let response = reqwest::Client::builder()
                .tls_backend_preconfigured(crate::tls::client_config(&[]).unwrap())
                .build()
                .unwrap()
                .get(format!("http://{addr}{path}"))
                .send()
                .await
                .unwrap();
            (response.status().as_u16(), response.text().await.unwrap())
        };
        assert_eq!(get("/healthz").await, (200, "ok\n".to_owned()));
        assert_eq!(get("/readyz").await.0, 503);
        metrics.poll("test", true, Utc::now().timestamp_millis());
        metrics.event_seen("test", "REGISTER", 1);
        assert_eq!(get("/readyz").await, (200, "ready\n".to_owned()));
        let (status, text) = get("/metrics").await;
        assert_eq!(status, 200);
        assert!(
            text.contains(
                "keycloak_notifier_events_seen_total{realm=\"test\",type=\"REGISTER\"} 1"
            ),
            "{text}"
        );
        assert_eq!(get("/nope").await.0, 404);
        let alive = tokio::task::spawn_blocking(move || probe(addr))
            .await
            .unwrap();
        assert!(alive.unwrap().starts_with("alive"));
        shutdown.cancel();
        server.await.unwrap();
        let gone = tokio::task::spawn_blocking(move || probe(addr))
            .await
            .unwrap();
        assert!(gone.unwrap_err().starts_with("unhealthy"));
    }
}
