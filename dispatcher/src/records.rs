//! The records the operations keep in Postgres beyond sessions: schedules
//! and their fires, webhooks, subscriptions and their deliveries, and the
//! audit trail. Plain data, shared by the operations and the store.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use uuid::Uuid;

/// A schedule as stored.
#[derive(Debug, Clone)]
pub struct Schedule {
    pub id: Uuid,
    pub project: String,
    pub schedule_id: String,
    pub display_name: String,
    pub agent: String,
    pub cron: String,
    pub timezone: String,
    pub input: String,
    pub labels: BTreeMap<String, String>,
    pub suspended: bool,
    pub next_fire_time: Option<DateTime<Utc>>,
    pub last_fire_time: Option<DateTime<Utc>>,
    pub creator: String,
    pub create_time: DateTime<Utc>,
}

/// Why a fire happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FireKind {
    Cron,
    CatchUp,
    Manual,
    Missed,
}

impl FireKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cron => "cron",
            Self::CatchUp => "catch_up",
            Self::Manual => "manual",
            Self::Missed => "missed",
        }
    }

    pub fn parse(s: &str) -> Self {
        match s {
            "catch_up" => Self::CatchUp,
            "manual" => Self::Manual,
            "missed" => Self::Missed,
            _ => Self::Cron,
        }
    }
}

/// One fire of a schedule, as stored.
#[derive(Debug, Clone)]
pub struct Fire {
    pub schedule_id: String,
    pub fire_time: DateTime<Utc>,
    pub kind: FireKind,
    pub skipped: i32,
    pub session_id: Option<Uuid>,
    pub error: String,
    pub dispatcher: String,
    pub create_time: DateTime<Utc>,
}

/// What a due schedule does now.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub fire_time: DateTime<Utc>,
    pub kind: FireKind,
    pub skipped: i32,
    /// The next cron time after now.
    pub next: Option<DateTime<Utc>>,
}

/// What a new schedule holds, checked.
pub struct NewSchedule {
    pub schedule_id: String,
    pub display_name: String,
    pub agent: String,
    pub cron: String,
    pub timezone: String,
    pub input: String,
    pub labels: BTreeMap<String, String>,
    pub suspended: bool,
}

/// A webhook as stored (its secret apart).
#[derive(Debug, Clone)]
pub struct Webhook {
    pub id: Uuid,
    pub project: String,
    pub webhook_id: String,
    pub agent: String,
    pub labels: BTreeMap<String, String>,
    pub creator: String,
    pub create_time: DateTime<Utc>,
    /// A Slack app: the credential holding its bot token (its secret is
    /// then the app's signing secret).
    pub slack_bot_secret: Option<Uuid>,
}

#[derive(Debug, Clone)]
pub struct Subscription {
    pub id: Uuid,
    pub project: String,
    pub subscription_id: String,
    pub url: String,
    pub event_types: Vec<String>,
    pub creator: String,
    pub create_time: DateTime<Utc>,
}

/// A delivery as its log shows it.
#[derive(Debug, Clone)]
pub struct DeliveryRecord {
    pub id: Uuid,
    pub event_type: String,
    pub session_id: Uuid,
    pub seq: i64,
    pub status: String,
    pub attempts: i32,
    pub last_status_code: i32,
    pub last_error: String,
    pub create_time: DateTime<Utc>,
    pub next_attempt_time: DateTime<Utc>,
    pub deliver_time: Option<DateTime<Utc>>,
}

/// A delivery claimed for an attempt.
#[derive(Debug, Clone)]
pub struct DueDelivery {
    pub id: Uuid,
    pub project: String,
    pub subscription_id: String,
    pub url: String,
    pub secret: Vec<u8>,
    pub event_type: String,
    pub session_id: Uuid,
    pub seq: i64,
    pub payload: String,
    pub event_time: DateTime<Utc>,
    /// Attempts so far, this one included.
    pub attempts: i32,
}

/// One recorded action.
#[derive(Debug, Clone)]
pub struct AuditEvent {
    pub id: i64,
    pub time: DateTime<Utc>,
    pub identity: String,
    pub action: String,
    pub resource: String,
    pub detail: serde_json::Value,
}

/// A delivery already recorded for the webhook: its id, session and the
/// hash of what it signed (`None`: recorded before hashes were kept).
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub(crate) struct Recorded {
    pub delivery_id: String,
    pub session_id: uuid::Uuid,
    pub content_sha256: Option<Vec<u8>>,
}

/// A usable access token.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Access {
    pub value: String,
    pub expires: DateTime<Utc>,
    /// When to refresh it.
    pub refresh_at: DateTime<Utc>,
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Access")
            .field("value", &"<redacted>")
            .field("expires", &self.expires)
            .finish()
    }
}
