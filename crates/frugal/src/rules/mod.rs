//! Element-wise update rules: the state-full rule (inside the subspace) and the state-free rule
//! (on the residual). Each rule is a small `Copy` value with its per-step coefficients folded in,
//! so the fused kernels in [`crate::kernels`] are monomorphised per pair of rules.

pub mod scaled;
mod state_free;
mod state_full;

pub use state_free::{Free, FreeRule, NoUpdate, SgdFree, SignFree};
pub use state_full::{AdamW, Full, FullRule, Lion, Sgd, Sgdm};

use crate::config::StateFullRule;

/// Number of moment buffers a state-full rule keeps per element.
pub fn moment_slots(rule: StateFullRule) -> usize {
    match rule {
        StateFullRule::AdamW => 2,
        StateFullRule::Sgdm | StateFullRule::Lion => 1,
        StateFullRule::Sgd => 0,
    }
}

/// Runs `$body` with `$r` bound to the concrete state-full rule and `$f` to the concrete
/// state-free rule, so that generic kernels are instantiated per pair (static dispatch).
#[macro_export]
#[doc(hidden)]
macro_rules! with_rules {
    ($full:expr, $free:expr, |$r:ident, $f:ident| $body:expr) => {
        match $full {
            $crate::rules::Full::AdamW($r) => $crate::with_rules!(@free $free, $f, $body),
            $crate::rules::Full::Sgdm($r) => $crate::with_rules!(@free $free, $f, $body),
            $crate::rules::Full::Lion($r) => $crate::with_rules!(@free $free, $f, $body),
            $crate::rules::Full::Sgd($r) => $crate::with_rules!(@free $free, $f, $body),
        }
    };
    (@free $free:expr, $f:ident, $body:expr) => {
        match $free {
            $crate::rules::Free::Sign($f) => $body,
            $crate::rules::Free::Sgd($f) => $body,
            $crate::rules::Free::None($f) => $body,
        }
    };
}
