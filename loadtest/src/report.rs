//! What a scenario measured: latency histograms, single values, ratios to
//! baselines and errors by gRPC code; printed as a table or written as JSON.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

/// A latency histogram in microseconds (1 µs to 1 h, 3 significant digits).
#[derive(Clone)]
pub struct Hist(hdrhistogram::Histogram<u64>);

impl Default for Hist {
    fn default() -> Self {
        Self::new()
    }
}

impl Hist {
    pub fn new() -> Self {
        Self(
            hdrhistogram::Histogram::new_with_bounds(1, 3_600_000_000, 3)
                .expect("static histogram bounds are valid"),
        )
    }

    pub fn record(&mut self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1);
        self.0.saturating_record(us);
    }

    pub fn len(&self) -> u64 {
        self.0.len()
    }

    /// The value at quantile `q` (0..=1), in microseconds.
    pub fn quantile_us(&self, q: f64) -> u64 {
        self.0.value_at_quantile(q)
    }

    pub fn stats(&self) -> Stats {
        Stats {
            count: self.0.len(),
            mean_us: self.0.mean(),
            p50_us: self.0.value_at_quantile(0.50),
            p90_us: self.0.value_at_quantile(0.90),
            p99_us: self.0.value_at_quantile(0.99),
            p999_us: self.0.value_at_quantile(0.999),
            max_us: self.0.max(),
        }
    }
}

/// Percentiles of one histogram.
#[derive(Debug, Clone, Serialize)]
pub struct Stats {
    pub count: u64,
    pub mean_us: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

/// Failed operations, by gRPC code name (or a short cause for non-gRPC errors).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Errors(pub BTreeMap<String, u64>);

impl Errors {
    pub fn add(&mut self, code: impl Into<String>) {
        *self.0.entry(code.into()).or_default() += 1;
    }

    pub fn status(&mut self, s: &tonic::Status) {
        self.add(format!("{:?}", s.code()));
    }

    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }
}

/// One line of a report.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub name: String,
    /// Latency percentiles, for a latency row.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency: Option<Stats>,
    /// A single value (throughput, ratio, bytes...), for a value row.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
    pub unit: String,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub errors: BTreeMap<String, u64>,
}

/// A measurement over its baseline, with the target when it has one.
#[derive(Debug, Clone, Serialize)]
pub struct Ratio {
    pub name: String,
    pub value: f64,
    /// e.g. `<= 1.3`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub met: Option<bool>,
}

/// Everything one scenario measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub scenario: String,
    /// The sizes it ran with.
    pub config: serde_json::Value,
    pub rows: Vec<Row>,
    /// Ratios to baselines, and checks against the targets.
    pub checks: Vec<Ratio>,
    pub notes: Vec<String>,
}

impl Report {
    pub fn new(scenario: &str, config: impl Serialize) -> Self {
        Self {
            scenario: scenario.into(),
            config: serde_json::to_value(config).unwrap_or_default(),
            rows: Vec::new(),
            checks: Vec::new(),
            notes: Vec::new(),
        }
    }

    pub fn latency(&mut self, name: impl Into<String>, h: &Hist, errors: &Errors) {
        self.rows.push(Row {
            name: name.into(),
            latency: Some(h.stats()),
            value: None,
            unit: "µs".into(),
            errors: errors.0.clone(),
        });
    }

    pub fn value(&mut self, name: impl Into<String>, value: f64, unit: &str) {
        self.rows.push(Row {
            name: name.into(),
            latency: None,
            value: Some(value),
            unit: unit.into(),
            errors: BTreeMap::new(),
        });
    }

    /// A ratio with no target.
    pub fn ratio(&mut self, name: impl Into<String>, value: f64) {
        self.checks.push(Ratio {
            name: name.into(),
            value,
            target: None,
            met: None,
        });
    }

    /// A ratio that should be at most `max`.
    pub fn ratio_at_most(&mut self, name: impl Into<String>, value: f64, max: f64) {
        self.checks.push(Ratio {
            name: name.into(),
            value,
            target: Some(format!("<= {max}")),
            met: Some(value <= max),
        });
    }

    /// An absolute value that should be at most `max` (a target in the
    /// unit the name gives).
    pub fn check_at_most(&mut self, name: impl Into<String>, value: f64, max: f64) {
        self.ratio_at_most(name, value, max);
    }

    /// A ratio that should be at least `min`.
    pub fn ratio_at_least(&mut self, name: impl Into<String>, value: f64, min: f64) {
        self.checks.push(Ratio {
            name: name.into(),
            value,
            target: Some(format!(">= {min}")),
            met: Some(value >= min),
        });
    }

    pub fn note(&mut self, text: impl Into<String>) {
        self.notes.push(text.into());
    }

    /// The report as a readable table.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "\n== {} ==  {}", self.scenario, self.config);
        let width = self
            .rows
            .iter()
            .map(|r| r.name.chars().count())
            .chain(self.checks.iter().map(|r| r.name.chars().count()))
            .max()
            .unwrap_or(10)
            .max(10);
        let lat: Vec<&Row> = self.rows.iter().filter(|r| r.latency.is_some()).collect();
        if !lat.is_empty() {
            let _ = writeln!(
                out,
                "{:<width$} {:>7} {:>9} {:>9} {:>9} {:>9} {:>9}  errors",
                "latency", "n", "p50", "p90", "p99", "p99.9", "max"
            );
            for r in lat {
                let Some(s) = &r.latency else { continue };
                let errors = if r.errors.is_empty() {
                    "-".to_string()
                } else {
                    r.errors
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join(" ")
                };
                let _ = writeln!(
                    out,
                    "{:<width$} {:>7} {:>9} {:>9} {:>9} {:>9} {:>9}  {errors}",
                    r.name,
                    s.count,
                    human_us(s.p50_us),
                    human_us(s.p90_us),
                    human_us(s.p99_us),
                    human_us(s.p999_us),
                    human_us(s.max_us),
                );
            }
        }
        let vals: Vec<&Row> = self.rows.iter().filter(|r| r.value.is_some()).collect();
        if !vals.is_empty() {
            let _ = writeln!(out, "{:<width$} {:>14}", "measured", "value");
            for r in vals {
                let _ = writeln!(
                    out,
                    "{:<width$} {:>14} {}",
                    r.name,
                    human_value(r.value.unwrap_or_default()),
                    r.unit
                );
            }
        }
        if !self.checks.is_empty() {
            let _ = writeln!(out, "{:<width$} {:>14}  target", "ratio / check", "value");
            for r in &self.checks {
                let verdict = match (&r.target, r.met) {
                    (Some(t), Some(true)) => format!("{t}  met"),
                    (Some(t), Some(false)) => format!("{t}  MISSED"),
                    _ => String::new(),
                };
                let _ = writeln!(out, "{:<width$} {:>14.3}  {verdict}", r.name, r.value);
            }
        }
        for n in &self.notes {
            let _ = writeln!(out, "note: {n}");
        }
        out
    }
}

/// `1234` µs as `1.23ms`.
pub fn human_us(us: u64) -> String {
    match us {
        0..1_000 => format!("{us}µs"),
        1_000..1_000_000 => format!("{:.2}ms", us as f64 / 1e3),
        _ => format!("{:.2}s", us as f64 / 1e6),
    }
}

fn human_value(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
    }
}

/// `a / b`, or 0 when `b` is 0.
pub fn ratio(a: f64, b: f64) -> f64 {
    if b == 0.0 { 0.0 } else { a / b }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_come_from_what_was_recorded() {
        let mut h = Hist::new();
        for ms in 1..=100 {
            h.record(Duration::from_millis(ms));
        }
        let s = h.stats();
        assert_eq!(s.count, 100);
        // 3 significant digits: within 0.1 %.
        assert!((49_900..=50_100).contains(&s.p50_us), "{s:?}");
        assert!((98_900..=99_100).contains(&s.p99_us), "{s:?}");
        assert!((99_900..=100_100).contains(&s.max_us), "{s:?}");
    }

    #[test]
    fn the_table_names_missed_targets_and_errors() {
        let mut r = Report::new("demo", serde_json::json!({"n": 1}));
        let mut h = Hist::new();
        h.record(Duration::from_micros(1500));
        let mut e = Errors::default();
        e.status(&tonic::Status::unavailable("gone"));
        r.latency("berth", &h, &e);
        r.ratio_at_most("berth / baseline", 2.0, 1.3);
        let t = r.table();
        assert!(t.contains("1.50ms"), "{t}");
        assert!(t.contains("Unavailable=1"), "{t}");
        assert!(t.contains("MISSED"), "{t}");
    }
}
