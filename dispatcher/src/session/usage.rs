//! Usage accounting: a turn's figures from what the runtime reported.
//!
//! Claude Code reports running totals of its conversation (cost in
//! `total_cost_usd`; tokens and cost per model in `modelUsage`), continued
//! across `--resume`. A turn is the rise of those totals since the previous
//! turn of the same conversation; a session's usage is the sum of its turns.
//! Running totals are never added up. Rules, for the whole turn and for
//! each model, for cost and tokens each:
//!
//! - a running total that rises (or stays): the turn is the rise;
//! - a running total that goes down: the conversation restarted (a resume
//!   that found no conversation starts from zero), so the turn is the new
//!   total, and it becomes the baseline;
//! - a figure the runtime reports per turn (the jsonl runtime, or a Claude
//!   Code result with no `modelUsage`): the turn is the figure, and the
//!   baseline stays;
//! - a cost the runtime could not give (missing, negative, not a number):
//!   the turn's cost is 0 and the baseline stays, so the next readable
//!   total counts everything since the last one.
//!
//! Per model: with no per-model figures the whole turn is the runtime's
//! model's. Models whose totals did not move are left out of the turn.
//!
//! Pure: the relay keeps the baseline, the store persists it with the turn.

use std::collections::BTreeMap;

use berth_common::TurnUsage;
use berth_common::usage::{Figures, ModelFigures, Reported};
use serde::{Deserialize, Serialize};

/// The running totals a runtime last reported for the conversation.
/// (Stored as JSON; rows written before per-model totals hold only the
/// flattened total, which still reads.)
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunningTotals {
    #[serde(flatten)]
    pub total: Figures,
    #[serde(default)]
    pub models: BTreeMap<String, Figures>,
}

/// One turn, accounted.
#[derive(Debug, Clone, PartialEq)]
pub struct Turn {
    /// The model the runtime runs.
    pub model: String,
    /// This turn's own figures, all models.
    pub usage: Figures,
    /// This turn's own figures per model (at least one entry), largest cost
    /// first.
    pub models: Vec<ModelFigures>,
    /// The baseline for the next turn.
    pub totals: RunningTotals,
    /// A running total went down: the runtime's conversation started over.
    pub restarted: bool,
}

/// This turn's figures from `reported`, against the baseline `prev`.
pub fn account(prev: &RunningTotals, reported: &TurnUsage) -> Turn {
    let (cumulative_cost, cumulative_tokens) =
        (reported.cumulative_cost, reported.cumulative_tokens);
    let (usage, total, mut restarted) = rise(
        &prev.total,
        &reported.total,
        cumulative_cost,
        cumulative_tokens,
    );
    let mut totals = RunningTotals {
        total,
        models: if cumulative_tokens {
            BTreeMap::new()
        } else {
            prev.models.clone()
        },
    };
    let mut models = Vec::new();
    if reported.models.is_empty() {
        models.push(ModelFigures {
            model: reported.total.model.clone(),
            figures: usage.clone(),
        });
    }
    for m in &reported.models {
        let before = prev.models.get(&m.model).cloned().unwrap_or_default();
        let (turn, after, restart) = rise(&before, m, cumulative_cost, cumulative_tokens);
        restarted |= restart;
        totals.models.insert(m.model.clone(), after);
        if !turn.is_zero() {
            models.push(ModelFigures {
                model: m.model.clone(),
                figures: turn,
            });
        }
    }
    models.sort_by(|a, b| b.figures.cost_usd.total_cmp(&a.figures.cost_usd));
    Turn {
        model: reported.total.model.clone(),
        usage,
        models,
        totals,
        restarted,
    }
}

/// One running total's turn: (the turn's figures, the new baseline,
/// whether it went down).
fn rise(
    prev: &Figures,
    now: &Reported,
    cumulative_cost: bool,
    cumulative_tokens: bool,
) -> (Figures, Figures, bool) {
    let mut turn = Figures::default();
    let mut base = prev.clone();
    let mut restarted = false;
    if cumulative_cost && !now.cost_unknown {
        let (c, p) = (now.figures.cost_usd, prev.cost_usd);
        base.cost_usd = c;
        turn.cost_usd = if c >= p {
            c - p
        } else {
            restarted = true;
            c
        };
    } else if !now.cost_unknown {
        turn.cost_usd = now.figures.cost_usd;
    }
    turn.cost_usd = turn.cost_usd.max(0.0);
    let t = now.figures.tokens();
    if cumulative_tokens {
        let before = prev.tokens();
        base.set_tokens(t);
        if t.iter().zip(&before).all(|(n, b)| n >= b) {
            turn.set_tokens([0, 1, 2, 3].map(|i| t[i] - before[i]));
        } else {
            restarted = true;
            turn.set_tokens(t);
        }
    } else {
        turn.set_tokens(t);
    }
    (turn, base, restarted)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figures(input: i64, output: i64, cost: f64) -> Figures {
        Figures {
            input_tokens: input,
            output_tokens: output,
            cost_usd: cost,
            ..Figures::default()
        }
    }

    fn reported(model: &str, f: Figures) -> Reported {
        Reported {
            model: model.into(),
            figures: f,
            cost_unknown: false,
        }
    }

    /// A Claude Code result: running totals, per model.
    fn running(models: &[(&str, Figures)]) -> TurnUsage {
        let mut total = Figures::default();
        for (_, f) in models {
            total.add(f);
        }
        TurnUsage {
            total: reported("main", total),
            models: models.iter().map(|(m, f)| reported(m, f.clone())).collect(),
            cumulative_cost: true,
            cumulative_tokens: true,
        }
    }

    #[test]
    fn running_totals_become_rises_and_turns_add_up_to_the_last_total() {
        let mut base = RunningTotals::default();
        let mut sum = Figures::default();
        // The real CLI's figures for three turns of one conversation.
        for (input, cost) in [(11, 0.000153), (24, 0.000312), (37, 0.000471)] {
            let t = account(&base, &running(&[("main", figures(input, 8, cost))]));
            assert!(!t.restarted);
            sum.add(&t.usage);
            base = t.totals;
        }
        assert_eq!(sum.input_tokens, 37);
        assert!((sum.cost_usd - 0.000471).abs() < 1e-12, "{}", sum.cost_usd);
        assert_eq!(base.total.cost_usd, 0.000471);
    }

    #[test]
    fn each_model_is_its_own_rise_and_idle_models_are_left_out() {
        // Turn 1: the main agent and a haiku sub-agent; turn 2: main only.
        let t1 = account(
            &RunningTotals::default(),
            &running(&[("main", figures(10, 5, 0.5)), ("haiku", figures(4, 2, 0.1))]),
        );
        assert_eq!(t1.models.len(), 2);
        assert_eq!(t1.models[0].model, "main", "largest cost first");
        let t2 = account(
            &t1.totals,
            &running(&[
                ("main", figures(30, 9, 0.75)),
                ("haiku", figures(4, 2, 0.1)),
            ]),
        );
        assert_eq!(t2.models.len(), 1, "haiku did not move: {:?}", t2.models);
        assert_eq!(t2.models[0].figures, figures(20, 4, 0.25));
        assert_eq!(t2.usage.input_tokens, 20);
        assert!((t2.usage.cost_usd - 0.25).abs() < 1e-12);
    }

    #[test]
    fn a_total_that_goes_down_is_a_new_conversation_counted_from_zero() {
        let base = RunningTotals {
            total: figures(100, 50, 1.0),
            models: [("main".to_string(), figures(100, 50, 1.0))].into(),
        };
        let t = account(&base, &running(&[("main", figures(10, 5, 0.25))]));
        assert!(t.restarted);
        assert_eq!((t.usage.input_tokens, t.usage.cost_usd), (10, 0.25));
        assert_eq!(
            t.totals.total.cost_usd, 0.25,
            "the new conversation is the baseline"
        );
        assert_eq!(t.models[0].figures, figures(10, 5, 0.25));
    }

    #[test]
    fn per_turn_figures_pass_through_and_keep_the_baseline() {
        let base = RunningTotals {
            total: figures(7, 0, 0.5),
            ..RunningTotals::default()
        };
        let per_turn = TurnUsage {
            total: reported("m", figures(3, 0, 0.1)),
            ..TurnUsage::default()
        };
        let t = account(&base, &per_turn);
        assert_eq!((t.usage.input_tokens, t.usage.cost_usd), (3, 0.1));
        assert_eq!(t.totals, base);
        assert_eq!(
            t.models,
            [ModelFigures {
                model: "m".into(),
                figures: figures(3, 0, 0.1)
            }]
        );
        // A CLI with no modelUsage: running cost, per-turn tokens.
        let mixed = TurnUsage {
            total: reported("m", figures(4, 2, 0.75)),
            cumulative_cost: true,
            ..TurnUsage::default()
        };
        let t = account(&base, &mixed);
        assert_eq!((t.usage.input_tokens, t.usage.cost_usd), (4, 0.25));
        assert_eq!(
            (t.totals.total.input_tokens, t.totals.total.cost_usd),
            (7, 0.75)
        );
    }

    #[test]
    fn an_unreadable_cost_counts_zero_and_the_next_total_catches_up() {
        let base = RunningTotals {
            total: figures(0, 0, 0.5),
            ..RunningTotals::default()
        };
        let mut unknown = running(&[("main", figures(1, 1, 0.0))]);
        unknown.total.cost_unknown = true;
        unknown.models[0].cost_unknown = true;
        let t = account(&base, &unknown);
        assert_eq!(t.usage.cost_usd, 0.0);
        assert!(!t.restarted, "an unknown cost is not a restart");
        assert_eq!(t.totals.total.cost_usd, 0.5);
        let t = account(&t.totals, &running(&[("main", figures(2, 2, 0.9))]));
        assert!((t.usage.cost_usd - 0.4).abs() < 1e-12);
    }

    #[test]
    fn old_baselines_without_models_still_read() {
        let old: RunningTotals =
            serde_json::from_str(r#"{"input_tokens":5,"output_tokens":1,"cost_usd":0.2}"#)
                .expect("reads");
        assert_eq!(old.total, figures(5, 1, 0.2));
        assert!(old.models.is_empty());
    }
}
