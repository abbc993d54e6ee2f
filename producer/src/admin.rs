//! Operating a deployment, shared by the CLI (`producer status`, `producer
//! schedule …`, `producer enqueue`) and the admin HTTP API: status, runtime
//! schedules (validated exactly like config-file schedules), pause/resume,
//! and ad-hoc tasks published through the same path other publishers use.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use cronpipe_shared::config::{valid_name, ScheduleConfig};
use cronpipe_shared::{Broker, Config, Envelope, Store};
use serde::{Deserialize, Serialize};

/// What went wrong with an admin operation.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// No such schedule.
    #[error("{0}")]
    NotFound(String),
    /// The name is taken, or the schedule cannot be changed this way.
    #[error("{0}")]
    Conflict(String),
    /// The input is invalid; the message names the field.
    #[error("{0}")]
    Invalid(String),
    /// Redis or the broker did not answer.
    #[error("{0}")]
    Unavailable(String),
}

impl AdminError {
    fn status(&self) -> StatusCode {
        match self {
            AdminError::NotFound(_) => StatusCode::NOT_FOUND,
            AdminError::Conflict(_) => StatusCode::CONFLICT,
            AdminError::Invalid(_) => StatusCode::BAD_REQUEST,
            AdminError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

impl From<cronpipe_shared::store::StoreError> for AdminError {
    fn from(e: cronpipe_shared::store::StoreError) -> Self {
        AdminError::Unavailable(e.to_string())
    }
}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        (
            self.status(),
            Json(serde_json::json!({ "error": self.to_string() })),
        )
            .into_response()
    }
}

/// Where a schedule is defined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// The config file (change it by editing the file).
    File,
    /// Redis, managed at runtime.
    Runtime,
}

/// One schedule as operators see it.
#[derive(Debug, Clone, Serialize)]
pub struct ScheduleView {
    /// Name.
    pub name: String,
    /// Where it is defined.
    pub source: Source,
    /// Its definition.
    pub spec: ScheduleConfig,
    /// Timezone of cron fields.
    pub timezone: String,
    /// Misfire policy.
    pub misfire: &'static str,
    /// Paused (by flag or `enabled = false`).
    pub paused: bool,
    /// Watermark: the last slot handled (published, or skipped by policy).
    pub last_slot: Option<DateTime<Utc>>,
    /// The next slot it would fire, if not paused.
    pub next_slot: Option<DateTime<Utc>>,
}

/// The current leader.
#[derive(Debug, Clone, Serialize)]
pub struct LeaderView {
    /// Instance id of the leader.
    pub instance: String,
    /// Its fencing token.
    pub fencing_token: u64,
    /// Time left on its lease, in milliseconds.
    pub lease_left_ms: u64,
}

/// Deployment status.
#[derive(Debug, Clone, Serialize)]
pub struct StatusView {
    /// The leader, if any.
    pub leader: Option<LeaderView>,
    /// Every schedule.
    pub schedules: Vec<ScheduleView>,
}

/// A request to publish an ad-hoc task.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnqueueRequest {
    /// Task name (must have a `[task.NAME]` handler in config).
    pub task: String,
    /// JSON payload.
    #[serde(default)]
    pub payload: serde_json::Value,
    /// Idempotency key (defaults to the message id).
    #[serde(default)]
    pub idempotency_key: Option<String>,
    /// Delay before the task is delivered, such as `"30s"`.
    #[serde(default)]
    pub delay: Option<String>,
}

/// Admin operations on one namespace.
#[derive(Clone)]
pub struct Admin {
    store: Store,
    config: Arc<Config>,
}

/// Parses a lease value `<token>:<instance>:<nonce>`.
pub fn parse_lease(value: &str) -> Option<(u64, String)> {
    let (token, rest) = value.split_once(':')?;
    let (instance, _nonce) = rest.rsplit_once(':')?;
    Some((token.parse().ok()?, instance.to_string()))
}

impl Admin {
    /// Operations with `config` (file schedules, task names) against `store`.
    pub fn new(store: Store, config: Arc<Config>) -> Self {
        Admin { store, config }
    }

    fn check(&self, name: &str, spec: &ScheduleConfig) -> Result<String, AdminError> {
        if !valid_name(name) {
            return Err(AdminError::Invalid(format!(
                "schedule name `{name}`: expected 1 to 200 characters from letters, digits, '-', '_', '.' and ':'"
            )));
        }
        spec.build(name)
            .map_err(|e| AdminError::Invalid(e.to_string()))?;
        if !self.config.tasks.contains_key(&spec.task) {
            let known: Vec<&str> = self.config.tasks.keys().map(String::as_str).collect();
            return Err(AdminError::Invalid(format!(
                "schedule \"{name}\".task = {:?}: no handler is configured for this task; expected one of: {}",
                spec.task,
                if known.is_empty() { "none".into() } else { known.join(", ") }
            )));
        }
        serde_json::to_string(spec).map_err(|e| AdminError::Invalid(e.to_string()))
    }

    /// Adds a runtime schedule.
    pub async fn add(&self, name: &str, spec: &ScheduleConfig) -> Result<(), AdminError> {
        let json = self.check(name, spec)?;
        if self.config.schedules.contains_key(name) {
            return Err(AdminError::Conflict(format!(
                "schedule `{name}` is defined in the config file; the file wins, so pick another name"
            )));
        }
        if !self.store.put_dynamic_schedule(name, &json, true).await? {
            return Err(AdminError::Conflict(format!(
                "schedule `{name}` exists; use update"
            )));
        }
        Ok(())
    }

    /// Replaces a runtime schedule's definition (its watermark is kept).
    pub async fn update(&self, name: &str, spec: &ScheduleConfig) -> Result<(), AdminError> {
        let json = self.check(name, spec)?;
        if self.config.schedules.contains_key(name) {
            return Err(AdminError::Conflict(format!(
                "schedule `{name}` is defined in the config file; edit the file instead"
            )));
        }
        if !self.store.put_dynamic_schedule(name, &json, false).await? {
            return Err(AdminError::NotFound(format!(
                "no runtime schedule `{name}`; use add"
            )));
        }
        Ok(())
    }

    async fn exists(&self, name: &str) -> Result<bool, AdminError> {
        if self.config.schedules.contains_key(name) {
            return Ok(true);
        }
        let (defs, _) = self.store.dynamic_schedules().await?;
        Ok(defs.contains_key(name))
    }

    /// Pauses (true) or resumes (false) any schedule.
    pub async fn set_paused(&self, name: &str, paused: bool) -> Result<(), AdminError> {
        if !self.exists(name).await? {
            return Err(AdminError::NotFound(format!("no schedule `{name}`")));
        }
        self.store.set_paused(name, paused).await?;
        Ok(())
    }

    /// Removes a runtime schedule and its state (watermark, pause flag).
    pub async fn remove(&self, name: &str) -> Result<(), AdminError> {
        if self.config.schedules.contains_key(name) {
            return Err(AdminError::Conflict(format!(
                "schedule `{name}` is defined in the config file; remove it from the file"
            )));
        }
        if !self.store.remove_dynamic_schedule(name).await? {
            return Err(AdminError::NotFound(format!(
                "no runtime schedule `{name}`"
            )));
        }
        Ok(())
    }

    /// Every schedule with its state.
    pub async fn list(&self) -> Result<Vec<ScheduleView>, AdminError> {
        let (defs, paused) = self.store.dynamic_schedules().await?;
        let marks = self.store.watermarks().await?;
        let now = Utc::now();
        let mut specs: Vec<(String, Source, ScheduleConfig)> = self
            .config
            .schedules
            .iter()
            .map(|(n, s)| (n.clone(), Source::File, s.clone()))
            .collect();
        for (name, json) in &defs {
            if self.config.schedules.contains_key(name) {
                continue;
            }
            if let Ok(spec) = serde_json::from_str::<ScheduleConfig>(json) {
                specs.push((name.clone(), Source::Runtime, spec));
            }
        }
        specs.sort_by(|a, b| a.0.cmp(&b.0));
        let mut out = Vec::with_capacity(specs.len());
        for (name, source, spec) in specs {
            let Ok(built) = spec.build(&name) else {
                continue;
            };
            let is_paused = paused.contains(&name) || !spec.enabled;
            let last = marks.get(&name).copied();
            let from = last.map_or(now, |l| l.max(now));
            out.push(ScheduleView {
                next_slot: if is_paused {
                    None
                } else {
                    built.schedule.next_after(from)
                },
                timezone: built.timezone.clone(),
                misfire: built.misfire.as_str(),
                paused: is_paused,
                last_slot: last,
                name,
                source,
                spec,
            });
        }
        Ok(out)
    }

    /// Leader and schedules.
    pub async fn status(&self) -> Result<StatusView, AdminError> {
        let leader = self.store.lease_holder().await?.and_then(|(value, left)| {
            parse_lease(&value).map(|(token, instance)| LeaderView {
                instance,
                fencing_token: token,
                lease_left_ms: left.as_millis() as u64,
            })
        });
        Ok(StatusView {
            leader,
            schedules: self.list().await?,
        })
    }

    /// Publishes an ad-hoc task (after `delay`, held by the broker).
    pub async fn enqueue(
        &self,
        broker: &Broker,
        req: &EnqueueRequest,
    ) -> Result<Envelope, AdminError> {
        if !self.config.tasks.contains_key(&req.task) {
            let known: Vec<&str> = self.config.tasks.keys().map(String::as_str).collect();
            return Err(AdminError::Invalid(format!(
                "task `{}`: no [task.{}] handler in the config; expected one of: {}",
                req.task,
                req.task,
                if known.is_empty() {
                    "none".into()
                } else {
                    known.join(", ")
                }
            )));
        }
        let delay = match &req.delay {
            None => None,
            Some(d) => Some(
                cronpipe_shared::duration::parse_duration(d)
                    .map_err(|e| AdminError::Invalid(format!("delay: {e}")))?,
            ),
        };
        let mut env = Envelope::new(req.task.clone(), req.payload.clone());
        if let Some(k) = &req.idempotency_key {
            if k.is_empty() || k.len() > cronpipe_shared::envelope::MAX_NAME_LEN {
                return Err(AdminError::Invalid(
                    "idempotency_key: expected 1 to 256 bytes".into(),
                ));
            }
            env.idempotency_key = Some(k.clone());
        }
        let published = match delay {
            Some(d) if d > Duration::ZERO => broker.publish_delayed(&env, d).await,
            _ => broker.publish(&env).await,
        };
        published.map_err(|e| AdminError::Unavailable(e.to_string()))?;
        Ok(env)
    }
}

#[derive(Clone)]
struct ApiState {
    admin: Admin,
    broker: Broker,
    token: Option<String>,
}

fn body<T>(b: Result<Json<T>, JsonRejection>) -> Result<T, AdminError> {
    b.map(|Json(v)| v)
        .map_err(|e| AdminError::Invalid(format!("request body: {}", e.body_text())))
}

async fn auth(State(s): State<ApiState>, req: Request, next: Next) -> Response {
    let Some(token) = &s.token else {
        return (
            StatusCode::FORBIDDEN,
            Json(serde_json::json!({"error": "the admin API is off: set producer.admin_token (or CRONPIPE__PRODUCER__ADMIN_TOKEN)"})),
        )
            .into_response();
    };
    let given = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    // Compare without an early exit, so timing does not leak a prefix.
    let ok = given.is_some_and(|g| {
        g.len() == token.len()
            && g.bytes()
                .zip(token.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    });
    if !ok {
        return (
            StatusCode::UNAUTHORIZED,
            [(axum::http::header::WWW_AUTHENTICATE, "Bearer")],
            Json(serde_json::json!({"error": "missing or wrong bearer token"})),
        )
            .into_response();
    }
    next.run(req).await
}

/// The admin API routes (`/api/v1/...`), all behind the bearer token.
pub fn router(admin: Admin, broker: Broker, token: Option<String>) -> Router {
    let state = ApiState {
        admin,
        broker,
        token,
    };
    Router::new()
        .route("/api/v1/status", get(|State(s): State<ApiState>| async move { s.admin.status().await.map(Json) }))
        .route("/api/v1/schedules", get(|State(s): State<ApiState>| async move { s.admin.list().await.map(Json) }))
        .route(
            "/api/v1/schedules/{name}",
            post(|State(s): State<ApiState>, Path(name): Path<String>, b: Result<Json<ScheduleConfig>, JsonRejection>| async move {
                let spec = body(b)?;
                s.admin.add(&name, &spec).await?;
                Ok::<_, AdminError>((StatusCode::CREATED, Json(serde_json::json!({"added": name}))))
            })
            .put(|State(s): State<ApiState>, Path(name): Path<String>, b: Result<Json<ScheduleConfig>, JsonRejection>| async move {
                let spec = body(b)?;
                s.admin.update(&name, &spec).await?;
                Ok::<_, AdminError>(Json(serde_json::json!({"updated": name})))
            })
            .delete(|State(s): State<ApiState>, Path(name): Path<String>| async move {
                s.admin.remove(&name).await?;
                Ok::<_, AdminError>(StatusCode::NO_CONTENT)
            }),
        )
        .route(
            "/api/v1/schedules/{name}/pause",
            post(|State(s): State<ApiState>, Path(name): Path<String>| async move {
                s.admin.set_paused(&name, true).await?;
                Ok::<_, AdminError>(Json(serde_json::json!({"paused": name})))
            }),
        )
        .route(
            "/api/v1/schedules/{name}/resume",
            post(|State(s): State<ApiState>, Path(name): Path<String>| async move {
                s.admin.set_paused(&name, false).await?;
                Ok::<_, AdminError>(Json(serde_json::json!({"resumed": name})))
            }),
        )
        .route(
            "/api/v1/enqueue",
            post(|State(s): State<ApiState>, b: Result<Json<EnqueueRequest>, JsonRejection>| async move {
                let req = body(b)?;
                let env = s.admin.enqueue(&s.broker, &req).await?;
                Ok::<_, AdminError>((StatusCode::ACCEPTED, Json(serde_json::json!({"id": env.id, "task": env.task}))))
            }),
        )
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), auth))
        .with_state(state)
}
