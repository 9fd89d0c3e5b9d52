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

/// The backward pass from the loss of a model's top part, computed from `top` (its input):
/// the loss's value, the gradient reaching `top`, and the other gradients. `scale` multiplies
/// the loss first; a non-finite loss is an error before any backward pass.
pub(crate) fn top_backward(
    loss: Tensor,
    top: &Tensor,
    scale: f64,
) -> Result<(f32, Tensor, GradStore)> {
    let value = loss.to_scalar::<f32>()?;
    if !value.is_finite() {
        return Err(Error::NonFiniteLoss { loss: value });
    }
    let scaled = if scale == 1.0 { loss } else { (loss * scale)? };
    let mut grads = scaled.backward()?;
    let dy = take(&mut grads, top)?;
    Ok((value, dy, grads))
}

/// The gradients of the graph that made `y`, given `dy`, the gradient reaching `y`.
pub(crate) fn backward_from(y: &Tensor, dy: &Tensor) -> Result<GradStore> {
    Ok((y * dy)?.sum_all()?.backward()?)
}
