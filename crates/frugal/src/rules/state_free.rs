//! State-free rules applied to the residual R = G − up(down(G)).

use super::state_full::sign;
use crate::config::StateFreeRule;
use candle_core::Tensor;

/// A state-free element-wise rule: returns the update for one residual entry.
pub trait FreeRule: Copy + Send + Sync {
    /// False for the rule that leaves the residual alone (lets kernels skip work).
    const UPDATES: bool;
    /// The weight update for residual entry `r`.
    fn update(self, r: f32) -> f32;
}

/// signSGD: −step·sign(R).
#[derive(Clone, Copy, Debug)]
pub struct SignFree {
    step: f32,
}

impl FreeRule for SignFree {
    const UPDATES: bool = true;
    #[inline(always)]
    fn update(self, r: f32) -> f32 {
        -self.step * sign(r)
    }
}

/// SGD: −step·R.
#[derive(Clone, Copy, Debug)]
pub struct SgdFree {
    step: f32,
}

impl FreeRule for SgdFree {
    const UPDATES: bool = true;
    #[inline(always)]
    fn update(self, r: f32) -> f32 {
        -self.step * r
    }
}

/// No update of the residual.
#[derive(Clone, Copy, Debug)]
pub struct NoUpdate;

impl FreeRule for NoUpdate {
    const UPDATES: bool = false;
    #[inline(always)]
    fn update(self, _r: f32) -> f32 {
        0.0
    }
}

/// The configured state-free rule with this step's learning rate.
#[derive(Clone, Copy, Debug)]
pub enum Free {
    Sign(SignFree),
    Sgd(SgdFree),
    None(NoUpdate),
}

impl Free {
    /// The rule `kind` with step size `lr` (already scaled).
    pub fn new(kind: StateFreeRule, lr: f64) -> Self {
        let step = lr as f32;
        match kind {
            StateFreeRule::SignSgd => Free::Sign(SignFree { step }),
            StateFreeRule::Sgd => Free::Sgd(SgdFree { step }),
            // The scaled rules run in their own pass (see `rules::scaled`); where a tensor has no
            // subspace to measure a scale in, its residual is left alone.
            StateFreeRule::None | StateFreeRule::ScaledResidual | StateFreeRule::ScaledGradient => {
                Free::None(NoUpdate)
            }
        }
    }
}

impl Free {
    /// The rule on a residual tensor (any device): the weight update, or `None` for the rule
    /// that leaves the residual alone.
    pub(crate) fn apply_tensor(self, r: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(match self {
            Free::Sign(f) => Some((r.sign()? * -(f.step as f64))?),
            Free::Sgd(f) => Some((r * -(f.step as f64))?),
            Free::None(_) => None,
        })
    }
}
