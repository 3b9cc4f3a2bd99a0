//! Usage accounting: a turn's figures from what the runtime reported.
//!
//! Claude Code reports running totals of its conversation (cost in
//! `total_cost_usd`, tokens summed over `modelUsage`), continued across
//! `--resume`. A turn is the rise of those totals since the previous turn of
//! the same conversation; a session's usage is the sum of its turns. Running
//! totals are never added up. Rules, for cost and tokens each:
//!
//! - a running total that rises: the turn is the rise;
//! - a running total that goes down: the conversation restarted (a resume
//!   that found no conversation starts from zero), so the turn is the new
//!   total, and it becomes the baseline;
//! - a figure the runtime reports per turn (the jsonl runtime, or a Claude
//!   Code result with no `modelUsage` or no readable cost): the turn is the
//!   figure, and the baseline stays.
//!
//! Pure: the relay keeps the baseline, the store persists it with the turn.

use berth_common::TurnUsage;
use serde::{Deserialize, Serialize};

/// The running totals a runtime last reported for the conversation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct RunningTotals {
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

/// One turn, accounted.
#[derive(Debug, Clone, PartialEq)]
pub struct Turn {
    /// This turn's own figures.
    pub usage: TurnUsage,
    /// The baseline for the next turn.
    pub totals: RunningTotals,
    /// A running total went down: the runtime's conversation started over.
    pub restarted: bool,
}

/// This turn's figures from `reported`, against the baseline `prev`.
pub fn account(prev: &RunningTotals, reported: &TurnUsage) -> Turn {
    let mut totals = *prev;
    let mut restarted = false;
    let cost = if reported.cumulative_cost {
        totals.cost_usd = reported.cost_usd;
        if reported.cost_usd >= prev.cost_usd {
            reported.cost_usd - prev.cost_usd
        } else {
            restarted = true;
            reported.cost_usd
        }
    } else {
        reported.cost_usd
    };
    let now = [
        reported.input_tokens,
        reported.output_tokens,
        reported.cache_read_input_tokens,
        reported.cache_creation_input_tokens,
    ];
    let tokens = if reported.cumulative_tokens {
        let before = [
            prev.input_tokens,
            prev.output_tokens,
            prev.cache_read_input_tokens,
            prev.cache_creation_input_tokens,
        ];
        [
            totals.input_tokens,
            totals.output_tokens,
            totals.cache_read_input_tokens,
            totals.cache_creation_input_tokens,
        ] = now;
        if now.iter().zip(&before).all(|(n, b)| n >= b) {
            [0, 1, 2, 3].map(|i| now[i] - before[i])
        } else {
            restarted = true;
            now
        }
    } else {
        now
    };
    Turn {
        usage: TurnUsage {
            input_tokens: tokens[0],
            output_tokens: tokens[1],
            cache_read_input_tokens: tokens[2],
            cache_creation_input_tokens: tokens[3],
            cost_usd: cost.max(0.0),
            model: reported.model.clone(),
            cumulative_cost: false,
            cumulative_tokens: false,
        },
        totals,
        restarted,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn running(input: i64, output: i64, cost: f64) -> TurnUsage {
        TurnUsage {
            input_tokens: input,
            output_tokens: output,
            cost_usd: cost,
            model: "m".into(),
            cumulative_cost: true,
            cumulative_tokens: true,
            ..TurnUsage::default()
        }
    }

    #[test]
    fn running_totals_become_rises_and_turns_add_up_to_the_last_total() {
        let mut base = RunningTotals::default();
        let mut sum = (0, 0.0);
        // The real CLI's figures for three turns of one conversation.
        for (input, cost) in [(11, 0.000153), (24, 0.000312), (37, 0.000471)] {
            let t = account(&base, &running(input, 8, cost));
            assert!(!t.restarted);
            sum = (sum.0 + t.usage.input_tokens, sum.1 + t.usage.cost_usd);
            base = t.totals;
        }
        assert_eq!(sum.0, 37);
        assert!((sum.1 - 0.000471).abs() < 1e-12, "{}", sum.1);
        assert_eq!(base.cost_usd, 0.000471);
    }

    #[test]
    fn a_total_that_goes_down_is_a_new_conversation_counted_from_zero() {
        let base = RunningTotals {
            input_tokens: 100,
            output_tokens: 50,
            cost_usd: 1.0,
            ..RunningTotals::default()
        };
        let t = account(&base, &running(10, 5, 0.25));
        assert!(t.restarted);
        assert_eq!((t.usage.input_tokens, t.usage.cost_usd), (10, 0.25));
        assert_eq!(
            t.totals.cost_usd, 0.25,
            "the new conversation is the baseline"
        );
        assert!(t.usage.cost_usd >= 0.0);
    }

    #[test]
    fn per_turn_figures_pass_through_and_keep_the_baseline() {
        let base = RunningTotals {
            input_tokens: 7,
            cost_usd: 0.5,
            ..RunningTotals::default()
        };
        let per_turn = TurnUsage {
            input_tokens: 3,
            cost_usd: 0.1,
            ..TurnUsage::default()
        };
        let t = account(&base, &per_turn);
        assert_eq!((t.usage.input_tokens, t.usage.cost_usd), (3, 0.1));
        assert_eq!(t.totals, base);
        // A CLI with no modelUsage: running cost, per-turn tokens.
        let mixed = TurnUsage {
            cumulative_cost: true,
            ..running(4, 2, 0.75)
        };
        let mixed = TurnUsage {
            cumulative_tokens: false,
            ..mixed
        };
        let t = account(&base, &mixed);
        assert_eq!((t.usage.input_tokens, t.usage.cost_usd), (4, 0.25));
        assert_eq!((t.totals.input_tokens, t.totals.cost_usd), (7, 0.75));
    }
}
