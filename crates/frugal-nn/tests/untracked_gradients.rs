//! The backward pass forms no gradient for an operand out of the graph (a constant: a mask,
//! dropout factors, a detached statistic), and the gradient of the tracked operand is still
//! right: checked against the derivatives by hand for each binary operation, the constant on
//! either side, broadcast or not.

use candle_core::{Device, Tensor, Var};

/// Entries in [0.5, 1.5) (no zeros to divide by, no ties for maximum).
fn values(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| 0.5 + ((i * 37 + seed * 101) % 97) as f32 / 97.0)
        .collect()
}

/// The gradient of the sum of `y` with respect to `x`, checking that no constant got one.
fn gradient(y: &Tensor, x: &Tensor, constants: &[&Tensor], what: &str) -> Vec<f32> {
    let grads = y.sum_all().unwrap().backward().unwrap();
    for c in constants {
        assert!(grads.get(c).is_none(), "{what}: a constant got a gradient");
    }
    grads
        .get(x)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn constants_get_no_gradient_and_tracked_operands_the_right_one() {
    let (rows, cols) = (3, 5);
    let x = values(rows * cols, 1);
    let c = values(rows * cols, 2);
    let row = values(cols, 3);
    let xv = Var::from_vec(x.clone(), (rows, cols), &Device::Cpu).unwrap();
    let ct = Tensor::from_vec(c.clone(), (rows, cols), &Device::Cpu).unwrap();
    let rt = Tensor::from_vec(row.clone(), cols, &Device::Cpu).unwrap();
    let xt = xv.as_tensor();
    type Op = fn(&Tensor, &Tensor, &Tensor) -> candle_core::Result<Tensor>;
    type Derivative = fn(f32, f32, f32) -> f32;
    // (name, y(x, c, row), dy/dx at entry i from x, c and row)
    let cases: [(&str, Op, Derivative); 9] = [
        ("x + c", |x, c, _| x + c, |_, _, _| 1.0),
        ("c - x", |x, c, _| c - x, |_, _, _| -1.0),
        ("x - c", |x, c, _| x - c, |_, _, _| 1.0),
        ("x * c", |x, c, _| x * c, |_, c, _| c),
        ("c / x", |x, c, _| c / x, |x, c, _| -c / (x * x)),
        ("x / c", |x, c, _| x / c, |_, c, _| 1.0 / c),
        (
            "max(x, c)",
            |x, c, _| x.maximum(c),
            |x, c, _| (x > c) as u8 as f32,
        ),
        ("x + row", |x, _, r| x.broadcast_add(r), |_, _, _| 1.0),
        ("x * row", |x, _, r| x.broadcast_mul(r), |_, _, r| r),
    ];
    for (name, op, derivative) in cases {
        let got = gradient(&op(xt, &ct, &rt).unwrap(), xt, &[&ct, &rt], name);
        for (i, g) in got.iter().enumerate() {
            let want = derivative(x[i], c[i], row[i % cols]);
            assert!(
                (g - want).abs() <= 1e-6,
                "{name}: dx[{i}] = {g}, not {want}"
            );
        }
    }
    // where_cond: the branch from a constant gets none, the tracked one the mask.
    let keep = Tensor::from_vec(
        (0..rows * cols)
            .map(|i| (i % 3 != 0) as u8)
            .collect::<Vec<u8>>(),
        (rows, cols),
        &Device::Cpu,
    )
    .unwrap();
    let y = keep.where_cond(xt, &ct).unwrap();
    let got = gradient(&y, xt, &[&ct], "where_cond");
    let want: Vec<f32> = (0..rows * cols)
        .map(|i| (i % 3 != 0) as u8 as f32)
        .collect();
    assert_eq!(got, want);
}
