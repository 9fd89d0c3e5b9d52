//! When the subspaces change: every T steps, with T growing by `gap_growth` whenever the
//! training loss has plateaued over the period just ended.

use crate::config::OptimizerConfig;
use serde::{Deserialize, Serialize};

/// The update gap in force, the step of the next subspace change and the plateau detector's
/// running means; saved with the optimizer state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UpdateGap {
    /// T now.
    pub gap: u64,
    /// Step (completed steps) at which the next subspace change happens.
    pub next: u64,
    /// Sum and count of the training losses observed since the last change.
    sum: f64,
    count: u64,
    /// Mean loss of the previous period.
    previous: Option<f64>,
}

impl UpdateGap {
    /// The first period: T = `update_gap`, a change at step 0.
    pub fn new(config: &OptimizerConfig) -> Self {
        UpdateGap {
            gap: config.update_gap as u64,
            next: 0,
            sum: 0.0,
            count: 0,
            previous: None,
        }
    }

    /// The state of a fixed T after `step` steps (for states saved before T could grow).
    pub fn fixed_at(config: &OptimizerConfig, step: u64) -> Self {
        let gap = config.update_gap as u64;
        UpdateGap {
            next: step.div_ceil(gap) * gap,
            ..Self::new(config)
        }
    }

    /// True if the subspaces change before step `step + 1`.
    pub fn due(&self, step: u64) -> bool {
        step >= self.next
    }

    /// Records the training loss of a completed step.
    pub fn observe(&mut self, loss: f64) {
        if loss.is_finite() {
            self.sum += loss;
            self.count += 1;
        }
    }

    /// Ends the period at a subspace change at `step`: grows T if the loss plateaued, and
    /// schedules the next change.
    pub fn advance(&mut self, config: &OptimizerConfig, step: u64) {
        if self.count > 0 {
            let mean = self.sum / self.count as f64;
            if let Some(before) = self.previous {
                let plateaued = before - mean < config.plateau_tolerance * before.abs();
                if plateaued && config.gap_growth > 1.0 {
                    let grown = (self.gap as f64 * config.gap_growth).round() as u64;
                    let cap = if config.gap_max == 0 {
                        u64::MAX
                    } else {
                        config.gap_max as u64
                    };
                    self.gap = grown.max(self.gap + 1).min(cap);
                }
            }
            self.previous = Some(mean);
        }
        (self.sum, self.count) = (0.0, 0);
        self.next = step + self.gap;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(growth: f64, max: usize) -> OptimizerConfig {
        let mut c = OptimizerConfig::parse_spec("frugal:update_gap=10").unwrap();
        c.gap_growth = growth;
        c.gap_max = max;
        c
    }

    /// Steps at which the subspaces change over `steps` steps with the given losses.
    fn changes(c: &OptimizerConfig, losses: impl Fn(u64) -> f64, steps: u64) -> Vec<u64> {
        let mut g = UpdateGap::new(c);
        let mut at = Vec::new();
        for step in 0..steps {
            if g.due(step) {
                g.advance(c, step);
                at.push(step);
            }
            g.observe(losses(step));
        }
        at
    }

    #[test]
    fn a_fixed_gap_changes_every_t_steps() {
        let c = config(1.0, 0);
        assert_eq!(changes(&c, |_| 1.0, 35), [0, 10, 20, 30]);
        for step in [0, 1, 10, 11, 29] {
            let g = UpdateGap::fixed_at(&c, step);
            assert_eq!(g.next, step.div_ceil(10) * 10);
        }
    }

    #[test]
    fn the_gap_grows_only_while_the_loss_stalls_and_stops_at_its_limit() {
        let c = config(2.0, 40);
        // A falling loss never triggers growth.
        assert_eq!(
            changes(&c, |s| 10.0 - 0.1 * s as f64, 45),
            [0, 10, 20, 30, 40]
        );
        // Flat: the first period (steps 0-9) sets the reference, then T doubles at each change up
        // to 40: 20 → 40 (T 20) → 80 (T 40) → 120 (T 40).
        assert_eq!(changes(&c, |_| 3.0, 125), [0, 10, 20, 40, 80, 120]);
        // Falling until step 30, flat afterwards: the period 30-39 still improves on 20-29, the
        // period 40-49 does not, so T grows from step 50 on: 15, then round(22.5) = 23.
        let knee = |s: u64| if s < 30 { 10.0 - 0.5 * s as f64 } else { -5.0 };
        assert_eq!(
            changes(&config(1.5, 0), knee, 100),
            [0, 10, 20, 30, 40, 50, 65, 88]
        );
    }
}
