//! Token and cost figures, shared by the node's adapters (what a runtime
//! reported), the dispatcher's accounting (a turn's rise) and the payloads
//! of `session.usage`.

use berth_proto::node::v1 as pb;
use serde::{Deserialize, Serialize};

/// Tokens and cost, of one model or of all. Counts are never negative and
/// cost is finite and never negative: adapters clamp what a runtime wrote.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Figures {
    #[serde(default)]
    pub input_tokens: i64,
    #[serde(default)]
    pub output_tokens: i64,
    #[serde(default)]
    pub cache_read_input_tokens: i64,
    #[serde(default)]
    pub cache_creation_input_tokens: i64,
    #[serde(default)]
    pub cost_usd: f64,
}

impl Figures {
    /// The four token counts, in field order.
    pub fn tokens(&self) -> [i64; 4] {
        [
            self.input_tokens,
            self.output_tokens,
            self.cache_read_input_tokens,
            self.cache_creation_input_tokens,
        ]
    }

    pub fn set_tokens(&mut self, t: [i64; 4]) {
        [
            self.input_tokens,
            self.output_tokens,
            self.cache_read_input_tokens,
            self.cache_creation_input_tokens,
        ] = t;
    }

    /// Adds `o` (saturating).
    pub fn add(&mut self, o: &Figures) {
        let t = self.tokens();
        let u = o.tokens();
        self.set_tokens([0, 1, 2, 3].map(|i| t[i].saturating_add(u[i])));
        self.cost_usd += o.cost_usd;
    }

    /// No tokens and no cost.
    pub fn is_zero(&self) -> bool {
        self.tokens() == [0; 4] && self.cost_usd == 0.0
    }
}

/// One model's figures, as listed in `session.usage` and `Session.usage`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelFigures {
    pub model: String,
    #[serde(flatten)]
    pub figures: Figures,
}

/// What a runtime reported for one model, or for the whole turn.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Reported {
    pub model: String,
    pub figures: Figures,
    /// The runtime's cost was missing, negative or not a number: `cost_usd`
    /// is 0 and moves no running total.
    pub cost_unknown: bool,
}

/// A turn's usage as the runtime reported it: the whole turn, and per model
/// when the runtime says.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TurnUsage {
    /// All models, under the model the runtime runs.
    pub total: Reported,
    /// Per model (Claude Code's `modelUsage`); empty when the runtime
    /// reports no split: the whole turn is `total.model`'s.
    pub models: Vec<Reported>,
    /// Costs are the conversation's running totals (Claude Code's
    /// `total_cost_usd` and `modelUsage[*].costUSD`), not this turn's.
    pub cumulative_cost: bool,
    /// Token counts are running totals (Claude Code's `modelUsage`).
    pub cumulative_tokens: bool,
}

impl From<pb::ModelUsage> for Reported {
    fn from(m: pb::ModelUsage) -> Self {
        // A node is trusted to run sessions, not to send sane figures.
        let clamp = |n: i64| n.max(0);
        let cost_ok = m.cost_usd.is_finite() && m.cost_usd >= 0.0;
        Self {
            model: m.model,
            figures: Figures {
                input_tokens: clamp(m.input_tokens),
                output_tokens: clamp(m.output_tokens),
                cache_read_input_tokens: clamp(m.cache_read_input_tokens),
                cache_creation_input_tokens: clamp(m.cache_creation_input_tokens),
                cost_usd: if cost_ok { m.cost_usd } else { 0.0 },
            },
            cost_unknown: m.cost_unknown || !cost_ok,
        }
    }
}

impl From<Reported> for pb::ModelUsage {
    fn from(r: Reported) -> Self {
        let f = r.figures;
        Self {
            model: r.model,
            input_tokens: f.input_tokens,
            output_tokens: f.output_tokens,
            cache_read_input_tokens: f.cache_read_input_tokens,
            cache_creation_input_tokens: f.cache_creation_input_tokens,
            cost_usd: f.cost_usd,
            cost_unknown: r.cost_unknown,
        }
    }
}

impl From<pb::TurnUsage> for TurnUsage {
    fn from(u: pb::TurnUsage) -> Self {
        Self {
            total: u.total.map(Reported::from).unwrap_or_default(),
            models: u.models.into_iter().map(Reported::from).collect(),
            cumulative_cost: u.cumulative_cost,
            cumulative_tokens: u.cumulative_tokens,
        }
    }
}

impl From<TurnUsage> for pb::TurnUsage {
    fn from(u: TurnUsage) -> Self {
        Self {
            total: Some(u.total.into()),
            models: u.models.into_iter().map(pb::ModelUsage::from).collect(),
            cumulative_cost: u.cumulative_cost,
            cumulative_tokens: u.cumulative_tokens,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_figures_from_a_node_are_clamped_and_the_cost_marked_unknown() {
        let r = Reported::from(pb::ModelUsage {
            model: "m".into(),
            input_tokens: -4,
            output_tokens: 7,
            cost_usd: f64::NAN,
            ..Default::default()
        });
        assert_eq!((r.figures.input_tokens, r.figures.output_tokens), (0, 7));
        assert_eq!(r.figures.cost_usd, 0.0);
        assert!(r.cost_unknown);
    }

    #[test]
    fn figures_flatten_into_model_entries() {
        let m = ModelFigures {
            model: "haiku".into(),
            figures: Figures {
                output_tokens: 3,
                cost_usd: 0.5,
                ..Figures::default()
            },
        };
        let v: serde_json::Value = serde_json::to_value(&m).expect("json");
        assert_eq!(
            (v["model"].as_str(), v["output_tokens"].as_i64()),
            (Some("haiku"), Some(3))
        );
    }
}
