//! Randomized top singular subspaces (Halko, Martinsson & Tropp, 2011) by subspace iteration
//! started from the previous basis. Only two products per sweep, Y = A·X and Aᵀ·Y, touch the
//! matrix's values; the rest works on the short side or on small width×width matrices, so a
//! sweep costs about two matrix products per tensor.
//!
//! One sweep from X (q×w, orthonormal columns): Y = A·X; the eigenpairs (W, Λ) of YᵀY give an
//! orthonormal basis Q = Y·W·Λ^(-1/2) of range(Y), keeping the directions f32 resolves
//! (λ > 1e-6·λ₁: singular values above 0.1% of the largest); Z = Aᵀ·Q = Bᵀ for B = Qᵀ·A; the
//! eigenpairs (W₂, Σ²) of ZᵀZ = B·Bᵀ give B's SVD, so V = Z·W₂·Σ⁻¹ and U = Q·W₂. Eigenvectors
//! are well determined from Gram matrices even when the Grams are nearly singular, which a
//! Cholesky factor is not. Directions below f32 resolution are completed from the Ritz vectors of
//! the start, and a last Cholesky QR of the kept vectors (nearly orthonormal already) removes f32
//! rounding.

use super::basis::par;
use faer::linalg::matmul::matmul;
use faer::linalg::triangular_solve::solve_upper_triangular_in_place;
use faer::{Accum, Mat, MatRef, Par, Side};
use rand::Rng;
use rand_distr::StandardNormal;

/// Settings of the randomized refresh.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sketch {
    /// Extra columns sketched beyond the rank kept.
    pub oversample: usize,
    /// Extra sweeps (power iterations), each two more passes over the matrix.
    pub power_iters: usize,
}

/// Eigenvalues of the Grams (f32 products) below this share of the largest are rounding, not
/// signal: singular values below 0.1% of the largest. The directions left over are completed
/// (see [`fill`]); they carry almost no gradient energy.
const RESOLVED: f64 = 1e-6;

/// a·b as a new matrix.
fn product(a: MatRef<'_, f32>, b: MatRef<'_, f32>) -> Mat<f32> {
    let mut out = Mat::<f32>::zeros(a.nrows(), b.ncols());
    let work = a.nrows() * a.ncols() * b.ncols();
    matmul(out.as_mut(), Accum::Replace, a, b, 1.0, par(work));
    out
}

/// xᵀ·x, symmetrized, in f64.
fn gram(x: MatRef<'_, f32>) -> Mat<f64> {
    symmetrized(&product(x.transpose(), x))
}

/// (g + gᵀ)/2 in f64.
pub(crate) fn symmetrized(g: &Mat<f32>) -> Mat<f64> {
    Mat::from_fn(g.nrows(), g.ncols(), |i, j| {
        0.5 * (g[(i, j)] as f64 + g[(j, i)] as f64)
    })
}

pub(crate) fn to_f32(a: MatRef<'_, f64>) -> Mat<f32> {
    Mat::from_fn(a.nrows(), a.ncols(), |i, j| a[(i, j)] as f32)
}

/// How many of `values` (descending) are resolved in f32: above [`RESOLVED`] of the largest.
pub(crate) fn resolved_count(values: &[f64]) -> usize {
    values
        .iter()
        .take_while(|l| **l > RESOLVED * values[0] && values[0] > 0.0)
        .count()
}

/// Eigenpairs of a symmetric matrix, largest first: (values, vectors as columns).
pub(crate) fn eigen_descending(sym: &Mat<f64>) -> Option<(Vec<f64>, Mat<f64>)> {
    let w = sym.nrows();
    if w == 0 {
        return None; // nothing resolved before (a zero matrix)
    }
    let eig = to_f32(sym.as_ref()).self_adjoint_eigen(Side::Lower).ok()?;
    let values = (0..w).map(|j| eig.S()[w - 1 - j] as f64).collect();
    let vectors = Mat::from_fn(w, w, |i, j| eig.U()[(i, w - 1 - j)] as f64);
    Some((values, vectors))
}

/// R⁻¹ for the Cholesky factor R (RᵀR = `gram`): x·R⁻¹ has orthonormal columns when `gram` is
/// xᵀx. `None` if `gram` is not positive definite.
pub(crate) fn inverse_cholesky(gram: &Mat<f64>) -> Option<Mat<f32>> {
    let l = gram.llt(Side::Lower).ok()?.L().to_owned();
    let mut r_inv = Mat::<f64>::identity(l.nrows(), l.ncols());
    solve_upper_triangular_in_place(l.transpose(), r_inv.as_mut(), Par::Seq);
    Some(to_f32(r_inv.as_ref()))
}

/// x·R⁻¹ with RᵀR = xᵀx (Cholesky QR): orthonormal columns spanning those of a well-conditioned x.
fn orthonormalize(x: Mat<f32>) -> Option<Mat<f32>> {
    let r_inv = inverse_cholesky(&gram(x.as_ref()))?;
    Some(product(x.as_ref(), r_inv.as_ref()))
}

/// The result of one sweep, largest singular value first.
struct Sweep {
    /// Right vectors V = Z·W₂·Σ⁻¹ of the resolved directions (q×w').
    right: Mat<f32>,
    /// Left vectors U = Q·W₂ of the resolved directions (p×w'), if asked for.
    left: Option<Mat<f32>>,
    /// Ritz vectors of span(X) (q×w, orthonormal): X·W.
    ritz: Mat<f32>,
}

/// One sweep from orthonormal `x` (q×w).
fn sweep(a: MatRef<'_, f32>, x: MatRef<'_, f32>, left: bool) -> Option<Sweep> {
    let y = product(a, x);
    let (lambda, w) = eigen_descending(&gram(y.as_ref()))?;
    let resolved = resolved_count(&lambda);
    let ritz = product(x, to_f32(w.as_ref()).as_ref());
    // Q = Y·T with T = W·Λ^(-1/2) over the resolved directions.
    let t = Mat::from_fn(w.nrows(), resolved, |i, j| w[(i, j)] / lambda[j].sqrt());
    let t = to_f32(t.as_ref());
    let z = product(product(a.transpose(), y.as_ref()).as_ref(), t.as_ref());
    let (sigma2, w2) = eigen_descending(&gram(z.as_ref()))?;
    let kept = resolved_count(&sigma2);
    let v_of = Mat::from_fn(resolved, kept, |i, j| w2[(i, j)] / sigma2[j].sqrt());
    let right = product(z.as_ref(), to_f32(v_of.as_ref()).as_ref());
    let left = left.then(|| {
        let u_of = to_f32(w2.as_ref().subcols(0, kept));
        product(y.as_ref(), product(t.as_ref(), u_of.as_ref()).as_ref())
    });
    Some(Sweep { right, left, ritz })
}

/// `count` orthonormal columns: the first of `resolved` (as many as fit), then the columns of
/// `filler` after the resolved count, re-orthonormalized together. Gradients often have fewer
/// resolvable directions than the rank; the rest carry almost no energy, and any orthonormal
/// completion serves.
fn fill(resolved: Mat<f32>, filler: MatRef<'_, f32>, count: usize) -> Option<Mat<f32>> {
    let have = resolved.ncols().min(count);
    let rows = resolved.nrows();
    let out = Mat::from_fn(rows, count, |i, j| {
        if j < have {
            resolved[(i, j)]
        } else {
            filler[(i, j)]
        }
    });
    orthonormalize(out)
}

/// Approximate top-`k` singular vectors of `a` (p×q), in decreasing order of singular value,
/// with orthonormal columns: U (p×k) if `left`, and V (q×k). `start` (q×c) seeds the first c
/// directions (the previous right singular vectors); the others are Gaussian. Directions below
/// f32 resolution are completed from the Ritz vectors of the start (right) and Gaussian vectors
/// (left). `None` if a factorization fails (a zero or non-finite matrix): use the exact SVD.
pub fn top_singular_vectors(
    a: MatRef<'_, f32>,
    k: usize,
    left: bool,
    sketch: Sketch,
    start: Option<MatRef<'_, f32>>,
    rng: &mut impl Rng,
) -> Option<(Option<Mat<f32>>, Mat<f32>)> {
    let (p, q) = (a.nrows(), a.ncols());
    let width = sketch.width(k, p, q);
    let mut x = orthonormalize(start_vectors(q, width, start, rng))?;
    for _ in 0..sketch.power_iters {
        let s = sweep(a, x.as_ref(), false)?;
        x = fill(s.right, s.ritz.as_ref(), width)?;
    }
    let s = sweep(a, x.as_ref(), left)?;
    let v = fill(s.right, s.ritz.as_ref(), k)?;
    let u = match s.left {
        Some(u) => Some(fill(u, start_vectors(p, k, None, rng).as_ref(), k)?),
        None => None,
    };
    Some((u, v))
}

impl Sketch {
    /// Columns sketched for rank `k` of a p×q matrix.
    pub(crate) fn width(self, k: usize, p: usize, q: usize) -> usize {
        (k + self.oversample).min(p).min(q).max(k)
    }
}

/// `cols` columns of `rows` entries: the first columns of `start` (as many as fit), then
/// Gaussian ones drawn from `rng` (column by column).
pub(crate) fn start_vectors(
    rows: usize,
    cols: usize,
    start: Option<MatRef<'_, f32>>,
    rng: &mut impl Rng,
) -> Mat<f32> {
    let seeded = start.map_or(0, |s| s.ncols().min(cols));
    Mat::<f32>::from_fn(rows, cols, |i, j| match start {
        Some(s) if j < seeded => s[(i, j)],
        _ => rng.sample(StandardNormal),
    })
}
