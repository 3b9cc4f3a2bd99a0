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

/// Parses a flag's duration: seconds, fractional allowed (`0.5`, `30`), or
/// with units (`10m`, `2h`, `1h 30m`, `250ms`).
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<f64>() {
        return std::time::Duration::try_from_secs_f64(secs)
            .map_err(|_| format!("`{s}` is not a valid duration (e.g. 90, 0.5, 10m, 2h)"));
    }
    humantime::parse_duration(s).map_err(|e| format!("`{s}`: {e} (e.g. 90, 0.5, 10m, 2h)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_durations_are_seconds_or_units() {
        use std::time::Duration;
        assert_eq!(parse_duration("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("1h 30m"), Ok(Duration::from_secs(5400)));
        assert!(parse_duration("-1").is_err());
        assert!(parse_duration("soon").is_err());
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
