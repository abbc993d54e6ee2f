//! The built-in `http` handler: calls a URL fixed in config (method and
//! headers fixed too; a message can never choose where a request goes), with
//! the task's payload as the JSON body. 2xx is success; 408, 429, 5xx and
//! connection failures are retryable and honour `Retry-After`; every other
//! status is permanent. TLS (https) is rustls with the bundled web PKI roots.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use reqwest::{Client, Method, StatusCode};

use crate::handler::{FailureDetail, Handler, Task, TaskError};

/// Most response body bytes read to fill a failure's output tail.
const MAX_BODY_READ: usize = 1024 * 1024;

/// An `http` task definition.
#[derive(Debug, Clone)]
pub struct HttpHandler {
    client: Client,
    url: String,
    method: Method,
    headers: HeaderMap,
    tail_bytes: usize,
}

/// Why an `http` task definition cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum HttpSetupError {
    /// The method is not an HTTP method.
    #[error("invalid HTTP method `{0}`")]
    Method(String),
    /// A header name or value cannot be sent.
    #[error("invalid header `{0}`: {1}")]
    Header(String, String),
    /// The HTTP client (its TLS setup) could not be built.
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
}

/// One HTTP client for every `http` task of a worker, so connections are pooled.
pub fn client() -> Result<Client, HttpSetupError> {
    Client::builder()
        .use_rustls_tls()
        .user_agent(concat!("cronpipe-worker/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| HttpSetupError::Client(e.to_string()))
}

impl HttpHandler {
    /// A handler calling `url` with `method` (default POST) and `headers`.
    pub fn new(
        client: Client,
        url: &str,
        method: Option<&str>,
        headers: &BTreeMap<String, String>,
        tail_bytes: usize,
    ) -> Result<Self, HttpSetupError> {
        let method = match method {
            None => Method::POST,
            Some(m) => Method::from_bytes(m.as_bytes())
                .map_err(|_| HttpSetupError::Method(m.to_string()))?,
        };
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            let name = HeaderName::from_bytes(k.as_bytes())
                .map_err(|e| HttpSetupError::Header(k.clone(), e.to_string()))?;
            let value = HeaderValue::from_str(v)
                .map_err(|e| HttpSetupError::Header(k.clone(), e.to_string()))?;
            map.insert(name, value);
        }
        Ok(HttpHandler {
            client,
            url: url.to_string(),
            method,
            headers: map,
            tail_bytes,
        })
    }

    async fn run(self, task: Task) -> Result<(), TaskError> {
        let env = &task.envelope;
        let mut req = self
            .client
            .request(self.method.clone(), &self.url)
            .headers(self.headers.clone())
            .header("Idempotency-Key", env.key())
            .header("X-Cronpipe-Task-Id", env.id.as_str())
            .header("X-Cronpipe-Task", env.task.as_str())
            .header("X-Cronpipe-Attempt", task.attempt.to_string());
        if self.method != Method::GET {
            if !self.headers.contains_key(CONTENT_TYPE) {
                req = req.header(CONTENT_TYPE, "application/json");
            }
            req = req.body(serde_json::to_vec(&env.payload).unwrap_or_default());
        }
        let sent = tokio::select! {
            r = req.send() => r,
            _ = task.cancel.cancelled() => {
                return Err(TaskError::retryable(format!("{} {} was stopped (timeout or shutdown)", self.method, self.url)));
            }
        };
        let mut resp = match sent {
            Ok(r) => r,
            Err(e) => {
                // No status: the request never got an answer (connect, TLS, reset).
                return Err(TaskError::retryable(format!(
                    "{} {} failed: {}",
                    self.method,
                    self.url,
                    error_chain(&e)
                )));
            }
        };
        let status = resp.status();
        if status.is_success() {
            return Ok(());
        }
        let retry_after = resp
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, Utc::now()));
        let tail = read_tail(&mut resp, self.tail_bytes).await;
        let detail = FailureDetail {
            exit_code: None,
            http_status: Some(status.as_u16()),
            output_tail: tail,
        };
        let message = format!("{} {} answered {status}", self.method, self.url);
        if is_retryable(status) {
            Err(TaskError::Retryable {
                message,
                retry_after,
                detail,
            })
        } else {
            Err(TaskError::Permanent { message, detail })
        }
    }
}

/// 408, 429 and 5xx are worth another try; other non-2xx statuses are not.
pub fn is_retryable(status: StatusCode) -> bool {
    status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
        || status.is_server_error()
}

/// Reads a `Retry-After` value: delay seconds, or an HTTP date (a date in the
/// past means "now"). `None` when unreadable.
pub fn parse_retry_after(value: &str, now: DateTime<Utc>) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    // IMF-fixdate ("Sun, 06 Nov 1994 08:49:37 GMT") is valid RFC 2822.
    let at = DateTime::parse_from_rfc2822(value)
        .ok()?
        .with_timezone(&Utc);
    Some((at - now).to_std().unwrap_or(Duration::ZERO))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

/// The last `cap` bytes of the body, reading at most [`MAX_BODY_READ`].
async fn read_tail(resp: &mut reqwest::Response, cap: usize) -> String {
    let mut kept: Vec<u8> = Vec::new();
    let mut read = 0usize;
    while let Ok(Some(chunk)) = resp.chunk().await {
        read += chunk.len();
        kept.extend_from_slice(&chunk);
        if kept.len() > cap {
            kept.drain(..kept.len() - cap);
        }
        if read >= MAX_BODY_READ {
            break;
        }
    }
    String::from_utf8_lossy(&kept).into_owned()
}

impl Handler for HttpHandler {
    fn handle(&self, task: Task) -> BoxFuture<'static, Result<(), TaskError>> {
        Box::pin(self.clone().run(task))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn retry_after_reads_seconds_and_http_dates() {
        let now = Utc.with_ymd_and_hms(2026, 1, 1, 12, 0, 0).unwrap();
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after("Thu, 01 Jan 2026 12:00:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_retry_after("Thu, 01 Jan 2026 11:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-5", now), None);
    }

    #[test]
    fn retryable_statuses() {
        for code in [408, 429, 500, 502, 503, 504] {
            assert!(is_retryable(StatusCode::from_u16(code).unwrap()), "{code}");
        }
        for code in [400, 401, 403, 404, 409, 410, 422, 304] {
            assert!(!is_retryable(StatusCode::from_u16(code).unwrap()), "{code}");
        }
    }

    #[test]
    fn bad_definitions_are_rejected() {
        let c = client().unwrap();
        let mut h = BTreeMap::new();
        assert!(HttpHandler::new(c.clone(), "http://x", Some("NO PE"), &h, 10).is_err());
        h.insert("bad header".into(), "v".into());
        assert!(HttpHandler::new(c, "http://x", None, &h, 10).is_err());
    }
}
