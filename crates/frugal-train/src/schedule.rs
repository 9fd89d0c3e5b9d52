//! Learning-rate schedules: linear warm-up, then cosine / linear decay to a floor, or constant.

use anyhow::{bail, Result};

/// Shape of the schedule after warm-up.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Decay {
    Cosine,
    Linear,
    Constant,
}

/// Learning rate as a function of the step.
#[derive(Clone, Debug)]
pub struct Schedule {
    pub peak: f64,
    pub warmup: usize,
    pub total: usize,
    pub decay: Decay,
    pub min_ratio: f64,
}

impl Schedule {
    /// Parses the decay name and checks the numbers.
    pub fn new(
        peak: f64,
        warmup: usize,
        total: usize,
        decay: &str,
        min_ratio: f64,
    ) -> Result<Self> {
        let decay = match decay {
            "cosine" => Decay::Cosine,
            "linear" => Decay::Linear,
            "constant" => Decay::Constant,
            other => bail!("unknown --schedule `{other}`; expected cosine, linear or constant"),
        };
        if !(0.0..=1.0).contains(&min_ratio) {
            bail!("--min-lr-ratio {min_ratio} is outside [0, 1]");
        }
        if warmup > total {
            bail!("--warmup {warmup} is longer than --steps {total}");
        }
        Ok(Schedule {
            peak,
            warmup,
            total,
            decay,
            min_ratio,
        })
    }

    /// Learning rate of step `step` (0-based): warm-up reaches the peak at step `warmup`.
    pub fn lr(&self, step: usize) -> f64 {
        if step < self.warmup {
            return self.peak * (step + 1) as f64 / (self.warmup + 1) as f64;
        }
        let span = (self.total - self.warmup).max(1) as f64;
        let progress = ((step - self.warmup) as f64 / span).min(1.0);
        let shape = match self.decay {
            Decay::Constant => return self.peak,
            Decay::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
            Decay::Linear => 1.0 - progress,
        };
        self.peak * (self.min_ratio + (1.0 - self.min_ratio) * shape)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine_to_floor() {
        let s = Schedule::new(1e-3, 10, 110, "cosine", 0.1).unwrap();
        assert!((s.lr(0) - 1e-3 / 11.0).abs() < 1e-12);
        assert!((s.lr(10) - 1e-3).abs() < 1e-12);
        assert!((s.lr(60) - 0.55e-3).abs() < 1e-12);
        assert!((s.lr(110) - 1e-4).abs() < 1e-12);
        let l = Schedule::new(1.0, 0, 10, "linear", 0.0).unwrap();
        assert!((l.lr(5) - 0.5).abs() < 1e-12);
        assert!(Schedule::new(1.0, 0, 10, "step", 0.0).is_err());
        assert!(Schedule::new(1.0, 20, 10, "cosine", 0.0).is_err());
    }
}
