//! The f32 matrix products of both libraries against an f64 reference, over the layouts a
//! training step produces: plain, transposed, batched, broadcast, narrowed, split or not.

use candle_core::{Device, Tensor};
use frugal_nn::matmul::{library, use_library, MatmulLibrary};

/// Checks `lhs · rhs` (the last two dims, batched over the rest) against f64 sums, each
/// element within 1e-5 of the sum of the magnitudes of its terms.
fn check(lhs: &Tensor, rhs: &Tensor, what: &str) {
    let got = lhs.matmul(rhs).unwrap();
    let dims = lhs.dims().to_vec();
    let (m, k) = (dims[dims.len() - 2], dims[dims.len() - 1]);
    let n = rhs.dims()[rhs.rank() - 1];
    let batch: usize = dims[..dims.len() - 2].iter().product();
    let a: Vec<f32> = lhs.flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = rhs.flatten_all().unwrap().to_vec1().unwrap();
    let c: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(c.len(), batch * m * n, "{what}: output size");
    for s in 0..batch {
        for i in 0..m {
            for j in 0..n {
                let (mut sum, mut size) = (0f64, 0f64);
                for l in 0..k {
                    let term = a[s * m * k + i * k + l] as f64 * b[s * k * n + l * n + j] as f64;
                    sum += term;
                    size += term.abs();
                }
                let err = (c[s * m * n + i * n + j] as f64 - sum).abs();
                assert!(
                    err <= 1e-5 * size + 1e-30,
                    "{what} ({}): [{s}, {i}, {j}] = {} instead of {sum}",
                    library(),
                    c[s * m * n + i * n + j]
                );
            }
        }
    }
}

/// A tensor of shape `dims` with deterministic entries in [-1, 1).
fn tensor(dims: &[usize], seed: u64) -> Tensor {
    let len: usize = dims.iter().product();
    let data: Vec<f32> = (0..len)
        .map(|i| {
            let x = (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seed;
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(data, dims, &Device::Cpu).unwrap()
}

/// Every layout, and the gradients through transposed operands, against the reference in the
/// library now installed.
fn check_layouts() {
    // Large enough to be split among workers, by rows (m ≥ n) and by columns (n > m), with
    // sizes that are not multiples of the parts' alignment.
    for &(m, k, n) in &[
        (67, 129, 301),
        (301, 129, 67),
        (5, 3, 7),
        (1, 64, 1),
        (64, 1, 64),
    ] {
        let a = tensor(&[m, k], 1);
        let b = tensor(&[k, n], 2);
        check(&a, &b, &format!("plain {m}×{k}·{k}×{n}"));
        let at = tensor(&[k, m], 3).t().unwrap();
        let bt = tensor(&[n, k], 4).t().unwrap();
        check(&at, &b, &format!("lhs transposed {m}×{k}·{k}×{n}"));
        check(&a, &bt, &format!("rhs transposed {m}×{k}·{k}×{n}"));
        check(&at, &bt, &format!("both transposed {m}×{k}·{k}×{n}"));
    }
    // Batched (attention), and with a transposed right operand (scores = q · kᵀ).
    let q = tensor(&[3, 4, 33, 16], 5);
    let kt = tensor(&[3, 4, 33, 16], 6).transpose(2, 3).unwrap();
    check(&q, &kt, "batched q·kᵀ");
    let v = tensor(&[3, 4, 33, 16], 7);
    check(&q.matmul(&kt).unwrap(), &v, "batched p·v");
    // A weight shared by the batch (stride 0 on rhs), folded into one product, and on lhs.
    let x = tensor(&[2, 50, 40], 8);
    let w = tensor(&[40, 30], 9).broadcast_as((2, 40, 30)).unwrap();
    check(&x, &w, "rhs broadcast over the batch");
    let wl = tensor(&[30, 50], 10).broadcast_as((2, 30, 50)).unwrap();
    check(&wl, &x, "lhs broadcast over the batch");
    // Narrowed views: rows further apart than their length (a padded leading dimension).
    let wide = tensor(&[40, 90], 11);
    let narrow = wide.narrow(1, 10, 60).unwrap();
    check(
        &narrow,
        &tensor(&[60, 20], 12),
        "lhs narrowed (padded rows)",
    );
    check(
        &tensor(&[20, 40], 13),
        &narrow,
        "rhs narrowed (padded rows)",
    );
    check_transposed_gradients();
}

#[test]
fn both_libraries_compute_every_layout_to_f32_accuracy() {
    use_library(MatmulLibrary::Gemm).unwrap();
    assert!(library().starts_with("gemm"), "{}", library());
    check_layouts();
    match use_library(MatmulLibrary::Openblas) {
        Ok(()) => {
            assert!(library().starts_with("OpenBLAS"), "{}", library());
            check_layouts();
            // auto picks OpenBLAS where it loads.
            use_library(MatmulLibrary::Gemm).unwrap();
            use_library(MatmulLibrary::Auto).unwrap();
            assert!(library().starts_with("OpenBLAS"), "{}", library());
        }
        Err(e) => eprintln!("OpenBLAS is not installed, only gemm was checked: {e}"),
    }
}

/// f64 product of row-major `a` (m × k) and `b` (k × n).
fn product64(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f64> {
    let mut c = vec![0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            c[i * n + j] = (0..k)
                .map(|l| a[i * k + l] as f64 * b[l * n + j] as f64)
                .sum();
        }
    }
    c
}

fn assert_close(got: &Tensor, want: &[f64], what: &str) {
    assert!(
        got.is_contiguous(),
        "{what}: the gradient is not contiguous"
    );
    let got: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g as f64 - w).abs() <= 1e-5 * (1.0 + w.abs()),
            "{what}[{i}]: {g} instead of {w}"
        );
    }
}

/// The gradients of a product with a transposed operand, x·Wᵀ and Aᵀ·B, which the backward
/// pass computes transposed when OpenBLAS is installed, so that W's and A's gradients come out
/// contiguous with no copy, and in the plain form with gemm; none for an operand out of the
/// graph.
fn check_transposed_gradients() {
    let (m, k, n) = (37, 21, 53);
    let x = candle_core::Var::from_tensor(&tensor(&[m, k], 21)).unwrap();
    let w = candle_core::Var::from_tensor(&tensor(&[n, k], 22)).unwrap();
    let c = tensor(&[m, n], 23);
    let loss = (x.matmul(&w.t().unwrap()).unwrap() * &c)
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    let v = |t: &Tensor| -> Vec<f32> { t.flatten_all().unwrap().to_vec1().unwrap() };
    // dx = c·W (m × n · n × k), dW = cᵀ·x (n × m · m × k).
    let ct = v(&c.t().unwrap().contiguous().unwrap());
    assert_close(
        grads.get(&x).unwrap(),
        &product64(&v(&c), &v(&w), m, n, k),
        "dx",
    );
    assert_close(
        grads.get(&w).unwrap(),
        &product64(&ct, &v(&x), n, m, k),
        "dW",
    );
    // y = Aᵀ·B with A (k × m): dA = B·cᵀ (k × n · n × m).
    let a = candle_core::Var::from_tensor(&tensor(&[k, m], 24)).unwrap();
    let b = tensor(&[k, n], 25);
    let loss = (a.t().unwrap().matmul(&b).unwrap() * &c)
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    assert_close(
        grads.get(&a).unwrap(),
        &product64(&v(&b), &ct, k, n, m),
        "dA",
    );
    // An operand out of the graph (a frozen weight, or B above) gets no gradient formed.
    assert!(grads.get(&b).is_none());
    let frozen = w.as_tensor().detach();
    let loss = (x.matmul(&frozen.t().unwrap()).unwrap() * &c)
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    assert!(grads.get(&frozen).is_none());
    assert_close(
        grads.get(&x).unwrap(),
        &product64(&v(&c), &v(&w), m, n, k),
        "dx, W frozen",
    );
}
