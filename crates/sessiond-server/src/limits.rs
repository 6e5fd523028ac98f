//! Load limits, so that overload turns into fast `503`s instead of a collapse:
//!
//! - a cap on requests in progress: past it, a request is refused at once with `503 overloaded`
//!   and `Retry-After`, without queueing (a queue only converts overload into latency);
//! - a request timeout: a request still running after it is answered `503 request_timeout`.
//!
//! The caps on open connections (in total and per peer address) are the accept loop's, in
//! [`crate::listen`].

use std::time::Duration;

use axum::Router;
use axum::error_handling::HandleErrorLayer;
use axum::response::{IntoResponse, Response};
use tower::{BoxError, ServiceBuilder};

use crate::error::ApiError;

/// The limits of one server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Requests in progress at once, over all routes it applies to.
    pub max_concurrent_requests: usize,
    /// Longest time a request may take.
    pub request_timeout: Duration,
}

/// Wraps every route of `router` in the concurrency cap and the request timeout.
pub fn apply<S>(router: Router<S>, limits: Limits) -> Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    router.layer(
        ServiceBuilder::new()
            .layer(HandleErrorLayer::new(refusal))
            .load_shed()
            .layer(tower::limit::GlobalConcurrencyLimitLayer::new(
                limits.max_concurrent_requests,
            ))
            .timeout(limits.request_timeout),
    )
}

async fn refusal(e: BoxError) -> Response {
    if e.is::<tower::load_shed::error::Overloaded>() {
        ApiError::Overloaded.into_response()
    } else if e.is::<tower::timeout::error::Elapsed>() {
        ApiError::RequestTimeout.into_response()
    } else {
        // The layers above produce no other error; answer as an internal error if one appears.
        tracing::error!(error = %e, "request failed in a load-limit layer");
        ApiError::Core(sessiond_core::CoreError::Internal(
            "load-limit layer".into(),
        ))
        .into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use axum::routing::get;
    use tower::ServiceExt;

    async fn slow() -> &'static str {
        tokio::time::sleep(Duration::from_secs(3600)).await;
        "done"
    }

    async fn body_of(res: Response) -> serde_json::Value {
        let bytes = axum::body::to_bytes(res.into_body(), 1 << 16)
            .await
            .unwrap_or_default();
        serde_json::from_slice(&bytes).unwrap_or_default()
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_past_the_timeout_is_a_503_request_timeout() {
        let app = apply(
            Router::new().route("/slow", get(slow)),
            Limits {
                max_concurrent_requests: 8,
                request_timeout: Duration::from_millis(500),
            },
        );
        let res = app
            .oneshot(Request::get("/slow").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body_of(res).await["code"], "request_timeout");
    }

    #[tokio::test(start_paused = true)]
    async fn past_the_concurrency_cap_requests_are_refused_at_once_across_routes() {
        let app = apply(
            Router::new()
                .route("/slow", get(slow))
                .route("/fast", get(|| async { "ok" })),
            Limits {
                max_concurrent_requests: 2,
                request_timeout: Duration::from_secs(7200),
            },
        );
        // Two slow requests hold both slots.
        let held: Vec<_> = (0..2)
            .map(|_| {
                let app = app.clone();
                tokio::spawn(async move {
                    app.oneshot(Request::get("/slow").body(Body::empty()).unwrap())
                        .await
                })
            })
            .collect();
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(10)).await;
        // A third, on another route, is refused without waiting.
        let res = app
            .clone()
            .oneshot(Request::get("/fast").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            res.headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok()),
            Some("1")
        );
        assert_eq!(body_of(res).await["code"], "overloaded");
        // Once the slow ones are gone, the route serves again.
        for h in held {
            h.abort();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        let res = app
            .oneshot(Request::get("/fast").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
    }
}
