//! Time: conversions between chrono and protobuf well-known types, and the
//! duration parser every service's flags use.

use chrono::{DateTime, Utc};

/// A UTC time as a protobuf `Timestamp`.
pub fn to_timestamp(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: i32::try_from(t.timestamp_subsec_nanos()).unwrap_or(0),
    }
}

/// A protobuf `Timestamp` as a UTC time; `None` if out of range.
pub fn from_timestamp(t: &prost_types::Timestamp) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).ok()?)
}

/// A protobuf `Duration` as a std duration; `None` if negative or out of range.
pub fn from_duration(d: &prost_types::Duration) -> Option<std::time::Duration> {
    let secs = u64::try_from(d.seconds).ok()?;
    let nanos = u32::try_from(d.nanos).ok()?;
    Some(std::time::Duration::new(secs, nanos))
}

/// A std duration as a protobuf `Duration`.
pub fn to_duration(d: std::time::Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// Parses a flag's duration in seconds, fractional allowed (`0.5`, `30`).
pub fn parse_secs(s: &str) -> Result<std::time::Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| format!("`{s}` is not a number of seconds"))?;
    std::time::Duration::try_from_secs_f64(secs)
        .map_err(|_| format!("`{s}` is not a valid duration"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_durations_are_seconds() {
        assert_eq!(parse_secs("0.5"), Ok(std::time::Duration::from_millis(500)));
        assert!(parse_secs("-1").is_err());
        assert!(parse_secs("10m").is_err());
    }

    #[test]
    fn timestamps_round_trip() {
        let now = Utc::now();
        assert_eq!(from_timestamp(&to_timestamp(now)), Some(now));
    }

    #[test]
    fn negative_durations_are_rejected() {
        assert_eq!(
            from_duration(&prost_types::Duration {
                seconds: -1,
                nanos: 0
            }),
            None
        );
        let d = std::time::Duration::from_millis(1500);
        assert_eq!(from_duration(&to_duration(d)), Some(d));
    }
}
