//! Matrix subspaces: orthonormal factors A (m×r, left) and/or B (r×n, right), from the SVD of the
//! gradient (exact or randomized) or from the QR of a Gaussian matrix; or a Gaussian sketch.
//! Linear algebra comes from faer.

use super::device_sketch;
use super::randomized::{top_singular_vectors, Sketch};
use crate::error::{Error, Result};
use candle_core::Tensor;
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

/// Parallel matrix products above about 64K multiply-adds.
pub(crate) fn par(work: usize) -> Par {
    if work > 1 << 16 {
        Par::rayon(0)
    } else {
        Par::Seq
    }
}

/// `dst` (row-major) = a·b, in parallel above about 64K multiply-adds.
fn product_into(dst: &mut [f32], a: MatRef<'_, f32>, b: MatRef<'_, f32>) {
    let (m, k, n) = (a.nrows(), a.ncols(), b.ncols());
    matmul(
        view_mut(dst, m, n),
        Accum::Replace,
        a,
        b,
        1.0,
        par(m * n * k),
    );
}

/// The start vectors of a randomized refresh from the previous basis of the same m×n matrix:
/// its left vectors when only the left side is projected (the sketch then runs on Gᵀ), else its
/// right vectors.
fn warm_start(
    warm: Option<&Basis>,
    (m, n): (usize, usize),
    left_only: bool,
) -> Option<MatRef<'_, f32>> {
    let warm = warm.filter(|w| (w.m, w.n) == (m, n))?;
    if left_only {
        warm.left.as_ref().map(|(a, r)| view(a, m, *r))
    } else {
        warm.right.as_ref().map(|(b, r)| view(b, *r, n).transpose())
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

    /// Top singular subspace of `g` (m×n): A = `U[:, :r_left]`, B = `Vᵀ[:r_right]`.
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

    /// An approximate top singular subspace of `g` (m×n) by [`top_singular_vectors`], started from
    /// `warm` (the previous basis of the same matrix, if any): on the right (or both sides) from
    /// its right vectors, on the left alone from its left vectors, by sketching Gᵀ.
    pub fn randomized_svd(
        g: &[f32],
        (m, n): (usize, usize),
        (r_left, r_right): (Option<usize>, Option<usize>),
        sketch: Sketch,
        warm: Option<&Basis>,
        rng: &mut impl Rng,
        name: &str,
    ) -> Result<Self> {
        // A matrix the sketch cannot factor (all zero, or nearly rank one) gets the exact SVD.
        let failed = || Basis::svd(g, m, n, r_left, r_right, name);
        let left_only = r_right.is_none();
        let k = r_left.unwrap_or(0).max(r_right.unwrap_or(0));
        let start = warm_start(warm, (m, n), left_only);
        let (u, v) = if left_only {
            // The left vectors of G are the right vectors of Gᵀ.
            let t = view(g, m, n).transpose();
            let Some((_, u)) = top_singular_vectors(t, k, false, sketch, start, rng) else {
                return failed();
            };
            (Some(u), None)
        } else {
            let Some((u, v)) =
                top_singular_vectors(view(g, m, n), k, r_left.is_some(), sketch, start, rng)
            else {
                return failed();
            };
            (u, Some(v))
        };
        Ok(Basis::from_vectors((m, n), (r_left, r_right), u, v))
    }

    /// The factors from singular vectors: A = `U[:, :r_left]`, B = `V[:, :r_right]ᵀ`.
    fn from_vectors(
        (m, n): (usize, usize),
        (r_left, r_right): (Option<usize>, Option<usize>),
        u: Option<Mat<f32>>,
        v: Option<Mat<f32>>,
    ) -> Self {
        let left = r_left
            .zip(u)
            .map(|(r, u)| (to_row_major(u.subcols(0, r)), r));
        let right = r_right
            .zip(v)
            .map(|(r, v)| (to_row_major(v.subcols(0, r).transpose()), r));
        Basis { m, n, left, right }
    }

    /// [`Basis::randomized_svd`] of a gradient on its device (the products run there, with the
    /// same random draws); a matrix the sketch cannot factor gets the exact SVD on the host.
    pub fn randomized_svd_on_device(
        g: &Tensor,
        (r_left, r_right): (Option<usize>, Option<usize>),
        sketch: Sketch,
        warm: Option<&Basis>,
        rng: &mut impl Rng,
        name: &str,
    ) -> Result<Self> {
        let (m, n) = g.dims2()?;
        let k = r_left.unwrap_or(0).max(r_right.unwrap_or(0));
        let start = warm_start(warm, (m, n), r_right.is_none());
        let found = if r_right.is_none() {
            device_sketch::top_singular_vectors(&g.t()?, k, false, sketch, start, rng)?
                .map(|(_, u)| (Some(u), None))
        } else {
            device_sketch::top_singular_vectors(g, k, r_left.is_some(), sketch, start, rng)?
                .map(|(u, v)| (u, Some(v)))
        };
        match found {
            Some((u, v)) => Ok(Basis::from_vectors((m, n), (r_left, r_right), u, v)),
            None => {
                let host = g.flatten_all()?.to_vec1::<f32>()?;
                Basis::svd(&host, m, n, r_left, r_right, name)
            }
        }
    }

    /// A Gaussian sketch of the same shapes with entries N(0, 1/r) (APOLLO's random projection):
    /// norms are preserved in expectation, but the factors are not orthonormal.
    pub fn gaussian(
        m: usize,
        n: usize,
        r_left: Option<usize>,
        r_right: Option<usize>,
        rng: &mut impl Rng,
    ) -> Self {
        let mut draw = |len: usize, r: usize| -> (Vec<f32>, usize) {
            let scale = 1.0 / (r as f32).sqrt();
            let values = (0..len)
                .map(|_| rng.sample::<f32, _>(StandardNormal) * scale)
                .collect();
            (values, r)
        };
        let left = r_left.map(|r| draw(m * r, r));
        let right = r_right.map(|r| draw(r * n, r));
        Basis { m, n, left, right }
    }

    /// The gradient energy this basis captures, ‖down(G)‖² (for an orthonormal basis, the part of
    /// ‖G‖² inside the subspace).
    pub fn captured_energy(&self, g: &[f32]) -> f64 {
        let (rows, cols) = self.low_shape();
        let mut low = vec![0f32; rows * cols];
        self.down(g, &mut low, &mut Vec::new());
        low.iter().map(|&x| x as f64 * x as f64).sum()
    }

    /// Flips each vector of this basis whose dot product with the matching vector of `old` is
    /// negative, so that a new basis agrees in sign with the one it replaces.
    pub fn align_to(&mut self, old: &Basis) {
        let (m, n) = (self.m, self.n);
        if (old.m, old.n) != (m, n) {
            return;
        }
        if let (Some((a, r)), Some((a_old, r_old))) = (&mut self.left, &old.left) {
            // Columns of A (m×r, row-major).
            for j in 0..(*r).min(*r_old) {
                let dot: f32 = (0..m).map(|i| a[i * *r + j] * a_old[i * *r_old + j]).sum();
                if dot < 0.0 {
                    (0..m).for_each(|i| a[i * *r + j] = -a[i * *r + j]);
                }
            }
        }
        if let (Some((b, r)), Some((b_old, r_old))) = (&mut self.right, &old.right) {
            // Rows of B (r×n, row-major).
            for j in 0..(*r).min(*r_old) {
                let (row, old_row) = (&mut b[j * n..(j + 1) * n], &b_old[j * n..(j + 1) * n]);
                let dot: f32 = row.iter().zip(old_row).map(|(x, y)| x * y).sum();
                if dot < 0.0 {
                    row.iter_mut().for_each(|x| *x = -*x);
                }
            }
        }
    }

    /// Carries low-dimensional moments from `old`'s coordinates into this basis': on the left
    /// m ← C·m with C = Aᵀ·A_old, on the right m ← m·C with C = B_old·Bᵀ; v the same with C∘C.
    /// Both bases must have the same shape and ranks.
    pub fn carry(&self, old: &Basis, moments: [&mut Vec<f32>; 2]) {
        let (rows, cols) = self.low_shape();
        let change = |new: &[f32], old: &[f32], r: usize, dim: usize, left: bool| {
            // Left: C (r×r) = Aᵀ·A_old with A stored m×r; right: C = B_old·Bᵀ with B stored r×n.
            let mut c = vec![0f32; r * r];
            let (lhs, rhs) = if left {
                (view(new, dim, r).transpose(), view(old, dim, r))
            } else {
                (view(old, r, dim), view(new, r, dim).transpose())
            };
            matmul(
                view_mut(&mut c, r, r),
                Accum::Replace,
                lhs,
                rhs,
                1.0,
                Par::Seq,
            );
            c
        };
        // C for the first moment, C∘C for the second.
        let with_squares = |c: Vec<f32>| {
            let squared = c.iter().map(|v| v * v).collect();
            [c, squared]
        };
        let left = match (&self.left, &old.left) {
            (Some((a, r)), Some((a_old, _))) => {
                Some(with_squares(change(a, a_old, *r, self.m, true)))
            }
            _ => None,
        };
        let right = match (&self.right, &old.right) {
            (Some((b, r)), Some((b_old, _))) => {
                Some(with_squares(change(b, b_old, *r, self.n, false)))
            }
            _ => None,
        };
        for (k, x) in moments.into_iter().enumerate() {
            if x.len() != rows * cols {
                continue; // a rule without this moment
            }
            let mut out = vec![0f32; rows * cols];
            for (change, on_left) in [(&left, true), (&right, false)] {
                let Some(c) = change else { continue };
                let (lhs, rhs) = if on_left {
                    (view(&c[k], rows, rows), view(x, rows, cols))
                } else {
                    (view(x, rows, cols), view(&c[k], cols, cols))
                };
                let dst = view_mut(&mut out, rows, cols);
                matmul(dst, Accum::Replace, lhs, rhs, 1.0, Par::Seq);
                std::mem::swap(x, &mut out);
            }
        }
    }

    /// down(G) into `low` (length of `low_shape`); `tmp` is scratch for two-sided bases.
    pub fn down(&self, g: &[f32], low: &mut [f32], tmp: &mut Vec<f32>) {
        let (m, n) = (self.m, self.n);
        match (&self.left, &self.right) {
            (Some((a, r)), None) => product_into(low, view(a, m, *r).transpose(), view(g, m, n)),
            (None, Some((b, r))) => product_into(low, view(g, m, n), view(b, *r, n).transpose()),
            (Some((a, rl)), Some((b, rr))) => {
                tmp.resize(rl * n, 0.0);
                product_into(tmp, view(a, m, *rl).transpose(), view(g, m, n));
                product_into(low, view(tmp, *rl, n), view(b, *rr, n).transpose());
            }
            (None, None) => low.copy_from_slice(g),
        }
    }

    /// up(x) into `full` (m×n); `tmp` is scratch for two-sided bases.
    pub fn up(&self, low: &[f32], full: &mut [f32], tmp: &mut Vec<f32>) {
        let (m, n) = (self.m, self.n);
        match (&self.left, &self.right) {
            (Some((a, r)), None) => product_into(full, view(a, m, *r), view(low, *r, n)),
            (None, Some((b, r))) => product_into(full, view(low, m, *r), view(b, *r, n)),
            (Some((a, rl)), Some((b, rr))) => {
                tmp.resize(m * rr, 0.0);
                product_into(tmp, view(a, m, *rl), view(low, *rl, *rr));
                product_into(full, view(tmp, m, *rr), view(b, *rr, n));
            }
            (None, None) => full.copy_from_slice(low),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn gauss(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n)
            .map(|_| rng.sample::<f32, _>(StandardNormal))
            .collect()
    }

    /// The basis with the signs of its vectors 0 and 2 flipped (what another SVD may return).
    fn flipped(b: &Basis) -> Basis {
        let mut f = b.clone();
        if let Some((a, r)) = &mut f.left {
            for i in 0..b.m {
                a[i * *r] = -a[i * *r];
                a[i * *r + 2] = -a[i * *r + 2];
            }
        }
        if let Some((b_, _)) = &mut f.right {
            let n = b.n;
            b_[..n].iter_mut().for_each(|x| *x = -*x);
            b_[2 * n..3 * n].iter_mut().for_each(|x| *x = -*x);
        }
        f
    }

    fn up(b: &Basis, low: &[f32]) -> Vec<f32> {
        let mut full = vec![0f32; b.m * b.n];
        b.up(low, &mut full, &mut Vec::new());
        full
    }

    #[test]
    fn align_and_project_do_not_depend_on_the_signs_of_the_svd() {
        let (m, n) = (12, 9);
        for (l, r) in [(Some(4), None), (None, Some(3)), (Some(4), Some(3))] {
            let old = Basis::svd(&gauss(m * n, 1), m, n, l, r, "w").unwrap();
            let new = Basis::svd(&gauss(m * n, 2), m, n, l, r, "w").unwrap();
            let other = flipped(&new);
            let (rows, cols) = old.low_shape();
            let m_old = gauss(rows * cols, 3);
            let v_old: Vec<f32> = gauss(rows * cols, 4).iter().map(|x| x * x).collect();

            // Without a transfer the kept moments meet flipped vectors: the update changes.
            let diff =
                |a: &[f32], b: &[f32]| a.iter().zip(b).fold(0f32, |d, (x, y)| d.max((x - y).abs()));
            assert!(diff(&up(&new, &m_old), &up(&other, &m_old)) > 1e-2);

            // align: both versions become the same basis.
            let (mut a1, mut a2) = (new.clone(), other.clone());
            a1.align_to(&old);
            a2.align_to(&old);
            assert_eq!(a1, a2, "{l:?} {r:?}");

            // project: the carried moments give the same full-space update; v is identical.
            let (mut m1, mut v1) = (m_old.clone(), v_old.clone());
            let (mut m2, mut v2) = (m_old.clone(), v_old.clone());
            new.carry(&old, [&mut m1, &mut v1]);
            other.carry(&old, [&mut m2, &mut v2]);
            assert!(diff(&up(&new, &m1), &up(&other, &m2)) < 1e-5, "{l:?} {r:?}");
            assert_eq!(v1, v2);

            // Carrying into the same basis changes nothing (C = I).
            let (mut m3, mut v3) = (m_old.clone(), v_old.clone());
            old.carry(&old, [&mut m3, &mut v3]);
            let (dm, dv) = (diff(&m3, &m_old), diff(&v3, &v_old));
            // Rounding of C ≈ I only (v holds squares up to ~10).
            assert!(dm < 1e-5 && dv < 5e-5, "{l:?} {r:?}: {dm} {dv}");
        }
    }
}
