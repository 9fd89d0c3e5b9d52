//! The randomized top singular subspace of a gradient on its own device: the sweeps of
//! [`super::randomized`], with every product over the matrix (and over the tall p×w and q×w
//! blocks) a device matrix product, and only width×width eigenproblems and Cholesky factors on
//! the host. The gradient never leaves the device; per sweep a few w×w matrices cross.

use super::randomized::{
    eigen_descending, inverse_cholesky, resolved_count, start_vectors, symmetrized, to_f32, Sketch,
};
use candle_core::{Device, Result, Tensor};
use faer::{Mat, MatRef};
use rand::Rng;

/// A host matrix on `device`.
fn upload(m: MatRef<'_, f32>, device: &Device) -> Result<Tensor> {
    let data: Vec<f32> = (0..m.nrows())
        .flat_map(|i| (0..m.ncols()).map(move |j| m[(i, j)]))
        .collect();
    Tensor::from_vec(data, (m.nrows(), m.ncols()), device)
}

/// A device matrix on the host.
pub(crate) fn download(t: &Tensor) -> Result<Mat<f32>> {
    let rows = t.to_vec2::<f32>()?;
    let cols = rows.first().map_or(0, Vec::len);
    Ok(Mat::from_fn(rows.len(), cols, |i, j| rows[i][j]))
}

/// xᵀ·x (computed on the device), symmetrized in f64 on the host.
fn gram(x: &Tensor) -> Result<Mat<f64>> {
    Ok(symmetrized(&download(&x.t()?.matmul(x)?)?))
}

/// Orthonormal columns spanning those of `x` (Cholesky QR); `None` if the Gram is singular.
fn orthonormalize(x: &Tensor) -> Result<Option<Tensor>> {
    let Some(r_inv) = inverse_cholesky(&gram(x)?) else {
        return Ok(None);
    };
    Ok(Some(x.matmul(&upload(r_inv.as_ref(), x.device())?)?))
}

/// The first `count` columns: those of `resolved` (as many as it has), then `filler`'s,
/// re-orthonormalized.
fn fill(resolved: &Tensor, filler: &Tensor, count: usize) -> Result<Option<Tensor>> {
    let have = resolved.dim(1)?.min(count);
    let mut parts = vec![resolved.narrow(1, 0, have)?];
    if have < count {
        parts.push(filler.narrow(1, have, count - have)?);
    }
    orthonormalize(&Tensor::cat(&parts, 1)?)
}

/// One sweep's results (see `randomized::sweep`).
struct Sweep {
    right: Tensor,
    left: Option<Tensor>,
    ritz: Tensor,
}

/// `Ok(None)` when an eigenproblem fails (a zero or non-finite matrix).
fn sweep(a: &Tensor, x: &Tensor, left: bool) -> Result<Option<Sweep>> {
    let device = a.device();
    let y = a.matmul(x)?;
    let Some((lambda, w)) = eigen_descending(&gram(&y)?) else {
        return Ok(None);
    };
    let resolved = resolved_count(&lambda);
    let ritz = x.matmul(&upload(to_f32(w.as_ref()).as_ref(), device)?)?;
    let t = Mat::from_fn(w.nrows(), resolved, |i, j| w[(i, j)] / lambda[j].sqrt());
    let t = upload(to_f32(t.as_ref()).as_ref(), device)?;
    let z = a.t()?.matmul(&y)?.matmul(&t)?;
    let Some((sigma2, w2)) = eigen_descending(&gram(&z)?) else {
        return Ok(None);
    };
    let kept = resolved_count(&sigma2);
    let v_of = Mat::from_fn(resolved, kept, |i, j| w2[(i, j)] / sigma2[j].sqrt());
    let right = z.matmul(&upload(to_f32(v_of.as_ref()).as_ref(), device)?)?;
    let left = if left {
        let u_of = upload(to_f32(w2.as_ref().subcols(0, kept)).as_ref(), device)?;
        Some(y.matmul(&t.matmul(&u_of)?)?)
    } else {
        None
    };
    Ok(Some(Sweep { right, left, ritz }))
}

/// [`super::randomized::top_singular_vectors`] of `a` (p×q) on its device, with the same random
/// draws: U (p×k) if `left`, and V (q×k), on the host. `Ok(None)` if a factorization fails (use
/// the exact SVD).
#[allow(clippy::type_complexity)]
pub(crate) fn top_singular_vectors(
    a: &Tensor,
    k: usize,
    left: bool,
    sketch: Sketch,
    start: Option<MatRef<'_, f32>>,
    rng: &mut impl Rng,
) -> Result<Option<(Option<Mat<f32>>, Mat<f32>)>> {
    let (p, q) = a.dims2()?;
    let device = a.device();
    let width = sketch.width(k, p, q);
    let x = upload(start_vectors(q, width, start, rng).as_ref(), device)?;
    let Some(mut x) = orthonormalize(&x)? else {
        return Ok(None);
    };
    for _ in 0..sketch.power_iters {
        let Some(s) = sweep(a, &x, false)? else {
            return Ok(None);
        };
        let Some(next) = fill(&s.right, &s.ritz, width)? else {
            return Ok(None);
        };
        x = next;
    }
    let Some(s) = sweep(a, &x, left)? else {
        return Ok(None);
    };
    let Some(v) = fill(&s.right, &s.ritz, k)? else {
        return Ok(None);
    };
    let u = match s.left {
        Some(u) => {
            let filler = upload(start_vectors(p, k, None, rng).as_ref(), device)?;
            match fill(&u, &filler, k)? {
                Some(u) => Some(download(&u)?),
                None => return Ok(None),
            }
        }
        None => None,
    };
    Ok(Some((u, download(&v)?)))
}
