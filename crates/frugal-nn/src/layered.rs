//! Helpers of layer-by-layer backward passes, which recompute each layer from its saved input
//! and hand each part's gradients over as soon as they exist.

use crate::error::{Error, Result};
use candle_core::backprop::GradStore;
use candle_core::Tensor;

/// The gradient of `t`, removed from `grads`.
pub(crate) fn take(grads: &mut GradStore, t: &Tensor) -> Result<Tensor> {
    grads.remove(t).ok_or_else(|| {
        Error::Input("the backward pass left a layer input without a gradient".into())
    })
}

/// The gradients of `params` alone (a backward pass also holds those of constants).
pub(crate) fn only(mut grads: GradStore, params: &[&Tensor]) -> GradStore {
    let mut kept = GradStore::default();
    for p in params {
        if let Some(g) = grads.remove(p) {
            kept.insert(p, g);
        }
    }
    kept
}
