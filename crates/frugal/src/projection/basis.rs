//! Matrix subspaces: orthonormal factors A (m×r, left) and/or B (r×n, right), from the SVD of the
//! gradient or from the QR of a Gaussian matrix. Linear algebra comes from faer.

use crate::error::{Error, Result};
use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatMut, MatRef, Par};
use rand::Rng;
use rand_distr::StandardNormal;

/// Orthonormal projection factors of an m×n matrix, stored row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Basis {
    pub m: usize,
    pub n: usize,
    /// A: m×r_left with orthonormal columns; down(G) starts with Aᵀ·G.
    pub left: Option<(Vec<f32>, usize)>,
    /// B: r_right×n with orthonormal rows; down(G) ends with ·Bᵀ.
    pub right: Option<(Vec<f32>, usize)>,
}

fn view(data: &[f32], rows: usize, cols: usize) -> MatRef<'_, f32> {
    MatRef::from_row_major_slice(data, rows, cols)
}

fn view_mut(data: &mut [f32], rows: usize, cols: usize) -> MatMut<'_, f32> {
    MatMut::from_row_major_slice_mut(data, rows, cols)
}

fn par(work: usize) -> Par {
    if work > 1 << 16 {
        Par::rayon(0)
    } else {
        Par::Seq
    }
}

fn to_row_major(m: MatRef<'_, f32>) -> Vec<f32> {
    let mut out = Vec::with_capacity(m.nrows() * m.ncols());
    for i in 0..m.nrows() {
        for j in 0..m.ncols() {
            out.push(m[(i, j)]);
        }
    }
    out
}

impl Basis {
    /// Shape of down(G).
    pub fn low_shape(&self) -> (usize, usize) {
        let rows = self.left.as_ref().map_or(self.m, |(_, r)| *r);
        let cols = self.right.as_ref().map_or(self.n, |(_, r)| *r);
        (rows, cols)
    }

    /// Number of stored projection values.
    pub fn numel(&self) -> usize {
        self.left.as_ref().map_or(0, |(a, _)| a.len())
            + self.right.as_ref().map_or(0, |(b, _)| b.len())
    }

    /// Top singular subspace of `g` (m×n): A = U[:, :r_left], B = Vᵀ[:r_right].
    pub fn svd(
        g: &[f32],
        m: usize,
        n: usize,
        r_left: Option<usize>,
        r_right: Option<usize>,
        name: &str,
    ) -> Result<Self> {
        let svd = view(g, m, n).thin_svd().map_err(|_| Error::SvdFailed {
            name: name.to_string(),
        })?;
        let left = r_left.map(|r| (to_row_major(svd.U().subcols(0, r)), r));
        let right = r_right.map(|r| (to_row_major(svd.V().subcols(0, r).transpose()), r));
        Ok(Basis { m, n, left, right })
    }

    /// Random semi-orthogonal factors of the same shapes (thin Q of a Gaussian matrix).
    pub fn random(
        m: usize,
        n: usize,
        r_left: Option<usize>,
        r_right: Option<usize>,
        rng: &mut impl Rng,
    ) -> Self {
        let mut q = |dim: usize, r: usize| -> Mat<f32> {
            let gauss = Mat::<f32>::from_fn(dim, r, |_, _| rng.sample::<f32, _>(StandardNormal));
            gauss.qr().compute_thin_Q()
        };
        let left = r_left.map(|r| (to_row_major(q(m, r).as_ref()), r));
        let right = r_right.map(|r| (to_row_major(q(n, r).as_ref().transpose()), r));
        Basis { m, n, left, right }
    }

    /// down(G) into `low` (length of `low_shape`); `tmp` is scratch for two-sided bases.
    pub fn down(&self, g: &[f32], low: &mut [f32], tmp: &mut Vec<f32>) {
        let (m, n) = (self.m, self.n);
        match (&self.left, &self.right) {
            (Some((a, r)), None) => {
                matmul(
                    view_mut(low, *r, n),
                    Accum::Replace,
                    view(a, m, *r).transpose(),
                    view(g, m, n),
                    1.0,
                    par(m * n * r),
                );
            }
            (None, Some((b, r))) => {
                matmul(
                    view_mut(low, m, *r),
                    Accum::Replace,
                    view(g, m, n),
                    view(b, *r, n).transpose(),
                    1.0,
                    par(m * n * r),
                );
            }
            (Some((a, rl)), Some((b, rr))) => {
                tmp.resize(rl * n, 0.0);
                matmul(
                    view_mut(tmp, *rl, n),
                    Accum::Replace,
                    view(a, m, *rl).transpose(),
                    view(g, m, n),
                    1.0,
                    par(m * n * rl),
                );
                matmul(
                    view_mut(low, *rl, *rr),
                    Accum::Replace,
                    view(tmp, *rl, n),
                    view(b, *rr, n).transpose(),
                    1.0,
                    par(n * rl * rr),
                );
            }
            (None, None) => low.copy_from_slice(g),
        }
    }

    /// up(x) into `full` (m×n); `tmp` is scratch for two-sided bases.
    pub fn up(&self, low: &[f32], full: &mut [f32], tmp: &mut Vec<f32>) {
        let (m, n) = (self.m, self.n);
        match (&self.left, &self.right) {
            (Some((a, r)), None) => {
                matmul(
                    view_mut(full, m, n),
                    Accum::Replace,
                    view(a, m, *r),
                    view(low, *r, n),
                    1.0,
                    par(m * n * r),
                );
            }
            (None, Some((b, r))) => {
                matmul(
                    view_mut(full, m, n),
                    Accum::Replace,
                    view(low, m, *r),
                    view(b, *r, n),
                    1.0,
                    par(m * n * r),
                );
            }
            (Some((a, rl)), Some((b, rr))) => {
                tmp.resize(m * rr, 0.0);
                matmul(
                    view_mut(tmp, m, *rr),
                    Accum::Replace,
                    view(a, m, *rl),
                    view(low, *rl, *rr),
                    1.0,
                    par(m * rl * rr),
                );
                matmul(
                    view_mut(full, m, n),
                    Accum::Replace,
                    view(tmp, m, *rr),
                    view(b, *rr, n),
                    1.0,
                    par(m * n * rr),
                );
            }
            (None, None) => full.copy_from_slice(low),
        }
    }
}
