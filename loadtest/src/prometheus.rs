//! Reading a `/metrics` page (Prometheus text format): its samples, and the
//! histogram figures the scenarios report.

use std::collections::BTreeMap;

/// One sample: the metric's name, its labels as written (`{a="b"}`, or
/// empty), and its value. Comments and lines that do not parse are skipped.
pub fn samples(text: &str) -> impl Iterator<Item = (&str, &str, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let value = value.parse::<f64>().ok()?;
            let (name, labels) = match series.find('{') {
                Some(i) => series.split_at(i),
                None => (series, ""),
            };
            Some((name, labels, value))
        })
}

/// Sum and count of each series of the histograms in `families`, keyed
/// `family{labels}`.
pub fn histogram_totals(text: &str, families: &[&str]) -> BTreeMap<String, (f64, f64)> {
    let mut sums = BTreeMap::<String, (f64, f64)>::new();
    for (name, labels, value) in samples(text) {
        for f in families {
            let Some(rest) = name.strip_prefix(f) else {
                continue;
            };
            match rest {
                "_sum" => sums.entry(format!("{f}{labels}")).or_default().0 = value,
                "_count" => sums.entry(format!("{f}{labels}")).or_default().1 = value,
                _ => {}
            }
        }
    }
    sums
}

/// The value of label `key` in `labels` as [`samples`] gives them.
pub fn label<'a>(labels: &'a str, key: &str) -> Option<&'a str> {
    let start = labels.find(&format!("{key}=\""))? + key.len() + 2;
    labels[start..].split('"').next()
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: &str = "# HELP x_seconds a histogram\n\
        x_seconds_bucket{kind=\"a\",le=\"0.005\"} 3\n\
        x_seconds_bucket{kind=\"a\",le=\"+Inf\"} 4\n\
        x_seconds_sum{kind=\"a\"} 0.5\n\
        x_seconds_count{kind=\"a\"} 4\n\
        up 1\n\
        junk\n";

    #[test]
    fn samples_split_name_labels_and_value() {
        let all: Vec<_> = samples(PAGE).collect();
        assert_eq!(all.len(), 5, "{all:?}");
        assert_eq!(all[4], ("up", "", 1.0));
        assert_eq!(label(all[1].1, "le"), Some("+Inf"));
        assert_eq!(label(all[1].1, "kind"), Some("a"));
    }

    #[test]
    fn histogram_totals_pair_sum_and_count_by_series() {
        let t = histogram_totals(PAGE, &["x_seconds"]);
        assert_eq!(t.get("x_seconds{kind=\"a\"}"), Some(&(0.5, 4.0)));
        assert_eq!(t.len(), 1);
    }
}
