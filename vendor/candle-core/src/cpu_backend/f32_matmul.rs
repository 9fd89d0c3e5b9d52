//! A replaceable implementation of f32 matrix products on the CPU.
//!
//! By default candle multiplies with the `gemm` crate. A program that links a faster library
//! (a BLAS) installs it with [`set_f32_matmul`]; every f32 `matmul` on the CPU, forward and
//! backward, then goes to it first, and to `gemm` when it declines.

use std::sync::RwLock;

/// One batch of f32 products: for each step `s < batch`, `dst[s·m·n..]` (m × n, rows
/// contiguous, uninitialised on entry) = `lhs[s·lhs_skip..]` (m × k) · `rhs[s·rhs_skip..]`
/// (k × n), where each operand is addressed by its row and column strides in elements.
pub struct F32MatMul<'a> {
    pub batch: usize,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub lhs: &'a [f32],
    pub lhs_skip: usize,
    pub lhs_rs: usize,
    pub lhs_cs: usize,
    pub rhs: &'a [f32],
    pub rhs_skip: usize,
    pub rhs_rs: usize,
    pub rhs_cs: usize,
    /// `batch · m · n` uninitialised elements, which a product that is taken writes, every one.
    pub dst: &'a mut [std::mem::MaybeUninit<f32>],
}

/// An f32 matrix product: returns true when it has written all of `dst`, or false, to decline
/// a product (an unsupported layout), which `gemm` then computes.
pub type F32MatMulFn = fn(&mut F32MatMul<'_>) -> bool;

static F32_MATMUL: RwLock<Option<F32MatMulFn>> = RwLock::new(None);

/// Installs `f` for every later f32 matrix product on the CPU; `None` restores `gemm`.
pub fn set_f32_matmul(f: Option<F32MatMulFn>) {
    *F32_MATMUL.write().unwrap_or_else(|e| e.into_inner()) = f;
}

/// The installed f32 matrix product, if any.
pub(crate) fn f32_matmul() -> Option<F32MatMulFn> {
    *F32_MATMUL.read().unwrap_or_else(|e| e.into_inner())
}

/// True when an f32 matrix product is installed.
pub fn f32_matmul_installed() -> bool {
    f32_matmul().is_some()
}
