//! State-full rules: AdamW, SGD with momentum, Lion, plain SGD.

use crate::config::{OptimizerConfig, StateFullRule};
use candle_core::Tensor;

/// A state-full element-wise rule: consumes a gradient entry, updates its moments, returns the
/// update to add to the weight (already multiplied by the learning rate, sign included).
pub trait FullRule: Copy + Send + Sync {
    /// Number of moment buffers used (0, 1 or 2); unused moments are never touched.
    const SLOTS: usize;
    /// Updates `m` (and `v`) from `g` and returns the weight update.
    fn update(self, g: f32, m: &mut f32, v: &mut f32) -> f32;
}

/// AdamW inside the subspace, with bias correction counted from the last reset.
#[derive(Clone, Copy, Debug)]
pub struct AdamW {
    b1: f32,
    b2: f32,
    /// lr / (1 − β1^t)
    step: f32,
    /// 1 / sqrt(1 − β2^t)
    inv_bc2_sqrt: f32,
    eps: f32,
}

impl FullRule for AdamW {
    const SLOTS: usize = 2;
    #[inline(always)]
    fn update(self, g: f32, m: &mut f32, v: &mut f32) -> f32 {
        *m = self.b1 * *m + (1.0 - self.b1) * g;
        *v = self.b2 * *v + (1.0 - self.b2) * g * g;
        -self.step * *m / (v.sqrt() * self.inv_bc2_sqrt + self.eps)
    }
}

/// SGD with momentum in EMA form: m = βm + (1−β)g, update −lr·m (Nesterov: −lr·(βm + (1−β)g)).
#[derive(Clone, Copy, Debug)]
pub struct Sgdm {
    beta: f32,
    lr: f32,
    nesterov: bool,
}

impl FullRule for Sgdm {
    const SLOTS: usize = 1;
    #[inline(always)]
    fn update(self, g: f32, m: &mut f32, _v: &mut f32) -> f32 {
        *m = self.beta * *m + (1.0 - self.beta) * g;
        let d = if self.nesterov {
            self.beta * *m + (1.0 - self.beta) * g
        } else {
            *m
        };
        -self.lr * d
    }
}

/// Lion: update −lr·sign(β1 m + (1−β1) g), then m = β2 m + (1−β2) g.
#[derive(Clone, Copy, Debug)]
pub struct Lion {
    b1: f32,
    b2: f32,
    lr: f32,
}

impl FullRule for Lion {
    const SLOTS: usize = 1;
    #[inline(always)]
    fn update(self, g: f32, m: &mut f32, _v: &mut f32) -> f32 {
        let c = self.b1 * *m + (1.0 - self.b1) * g;
        *m = self.b2 * *m + (1.0 - self.b2) * g;
        -self.lr * sign(c)
    }
}

/// Plain SGD: −lr·g, no state.
#[derive(Clone, Copy, Debug)]
pub struct Sgd {
    lr: f32,
}

impl FullRule for Sgd {
    const SLOTS: usize = 0;
    #[inline(always)]
    fn update(self, g: f32, _m: &mut f32, _v: &mut f32) -> f32 {
        -self.lr * g
    }
}

/// sign(x) with sign(0) = 0, branch-free.
#[inline(always)]
pub(crate) fn sign(x: f32) -> f32 {
    ((x > 0.0) as i32 - (x < 0.0) as i32) as f32
}

/// The configured state-full rule with this step's coefficients.
#[derive(Clone, Copy, Debug)]
pub enum Full {
    AdamW(AdamW),
    Sgdm(Sgdm),
    Lion(Lion),
    Sgd(Sgd),
}

impl Full {
    /// Coefficients for learning rate `lr` at step `t` (≥ 1) since the last reset.
    pub fn new(config: &OptimizerConfig, lr: f64, t: u64) -> Self {
        let t = t.max(1) as i32;
        match config.state_full {
            StateFullRule::AdamW => Full::AdamW(AdamW {
                b1: config.beta1 as f32,
                b2: config.beta2 as f32,
                step: (lr / (1.0 - config.beta1.powi(t))) as f32,
                inv_bc2_sqrt: (1.0 / (1.0 - config.beta2.powi(t)).sqrt()) as f32,
                eps: config.eps as f32,
            }),
            StateFullRule::Sgdm => Full::Sgdm(Sgdm {
                beta: config.momentum as f32,
                lr: lr as f32,
                nesterov: config.nesterov,
            }),
            StateFullRule::Lion => Full::Lion(Lion {
                b1: config.beta1 as f32,
                b2: config.beta2 as f32,
                lr: lr as f32,
            }),
            StateFullRule::Sgd => Full::Sgd(Sgd { lr: lr as f32 }),
        }
    }
}

impl Full {
    /// The rule on tensors (any device): replaces the moments `m`, `v` (those the rule keeps)
    /// with their updates and returns the weight update, as [`FullRule::update`] does per element.
    pub(crate) fn apply_tensor(
        self,
        g: &Tensor,
        m: &mut Option<Tensor>,
        v: &mut Option<Tensor>,
    ) -> candle_core::Result<Tensor> {
        let moment = |x: &Option<Tensor>| -> candle_core::Result<Tensor> {
            x.clone()
                .ok_or_else(|| candle_core::Error::Msg("a moment buffer is missing".into()))
        };
        // a·x + (1 − a)·g, with the coefficients rounded to f32 as the fused kernels do.
        let ema = |x: &Tensor, a: f32| -> candle_core::Result<Tensor> {
            (x * a as f64)? + (g * (1.0 - a) as f64)?
        };
        match self {
            Full::AdamW(r) => {
                let m1 = ema(&moment(m)?, r.b1)?;
                let v1 = ((moment(v)? * r.b2 as f64)? + (g.sqr()? * (1.0 - r.b2) as f64)?)?;
                let denominator = ((v1.sqrt()? * r.inv_bc2_sqrt as f64)? + r.eps as f64)?;
                let u = ((&m1 / denominator)? * -(r.step as f64))?;
                (*m, *v) = (Some(m1), Some(v1));
                Ok(u)
            }
            Full::Sgdm(r) => {
                let m1 = ema(&moment(m)?, r.beta)?;
                let d = if r.nesterov {
                    ema(&m1, r.beta)?
                } else {
                    m1.clone()
                };
                *m = Some(m1);
                d * -(r.lr as f64)
            }
            Full::Lion(r) => {
                let m0 = moment(m)?;
                let c = ema(&m0, r.b1)?;
                *m = Some(ema(&m0, r.b2)?);
                c.sign()? * -(r.lr as f64)
            }
            Full::Sgd(r) => g * -(r.lr as f64),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adamw_first_step_is_lr_times_sign() {
        // At t = 1 with zero moments, m̂ = g and v̂ = g², so the update is −lr·g/(|g|+eps).
        let c = OptimizerConfig::preset("adamw").unwrap();
        let Full::AdamW(r) = Full::new(&c, 0.01, 1) else {
            unreachable!()
        };
        let (mut m, mut v) = (0.0, 0.0);
        let u = r.update(-3.0, &mut m, &mut v);
        assert!((u - 0.01).abs() < 1e-7, "{u}");
        assert!((m + 0.3).abs() < 1e-6 && (v - 0.009).abs() < 1e-6);
    }

    #[test]
    fn lion_and_sgdm_by_hand() {
        let mut c = OptimizerConfig::preset("adamw").unwrap();
        c.beta1 = 0.9;
        c.beta2 = 0.99;
        c.momentum = 0.5;
        let Full::Lion(l) = ({
            c.state_full = StateFullRule::Lion;
            Full::new(&c, 0.1, 1)
        }) else {
            unreachable!()
        };
        let (mut m, mut v) = (1.0, 0.0);
        // c = 0.9·1 + 0.1·(−20) = −1.1 → update +0.1; m = 0.99 − 0.2 = 0.79
        assert_eq!(l.update(-20.0, &mut m, &mut v), 0.1);
        assert!((m - 0.79).abs() < 1e-6);
        c.state_full = StateFullRule::Sgdm;
        let Full::Sgdm(s) = Full::new(&c, 0.1, 1) else {
            unreachable!()
        };
        let mut m = 2.0;
        // m = 0.5·2 + 0.5·4 = 3 → update −0.3
        assert!((s.update(4.0, &mut m, &mut v) + 0.3).abs() < 1e-6);
        assert_eq!(sign(0.0), 0.0);
        assert_eq!(sign(-0.0), 0.0);
        assert_eq!(sign(-2.0), -1.0);
    }
}
