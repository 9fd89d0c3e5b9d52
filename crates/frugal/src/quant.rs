//! Block-wise 8-bit moments (dynamic quantization, as in 8-bit Adam). Each block of [`BLOCK`]
//! values keeps its absolute maximum as an f32 scale and one byte per value: an 8-bit float code
//! of value / scale, so small values keep their relative precision.
//!
//! - First moments (signed): sign, 4 exponent bits, 3 mantissa bits. Codes cover 15 binades below
//!   the block's maximum (down to 2⁻¹⁴ of it); smaller values become 0.
//! - Second moments (non-negative): 5 exponent bits, 3 mantissa bits, 31 binades (to 2⁻³⁰). A
//!   positive value never becomes 0 (that would turn m/√v into m/ε): it rounds up to the
//!   smallest code.
//!
//! Values round to the nearest code: the relative error is at most 1/16 (half a mantissa step).
//! Exponent field 0 is reserved for zero; the seven codes above 1 in the top binade are unused.

use std::sync::LazyLock;

/// Values per block (one scale each).
pub const BLOCK: usize = 256;

/// Which code a buffer uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    /// Sign, 4 exponent and 3 mantissa bits (first moments).
    Signed,
    /// 5 exponent and 3 mantissa bits (second moments).
    Unsigned,
}

impl Code {
    fn exponent_bias(self) -> i32 {
        match self {
            Code::Signed => 15,
            Code::Unsigned => 31,
        }
    }

    fn table(self) -> &'static [f32; 256] {
        match self {
            Code::Signed => &SIGNED,
            Code::Unsigned => &UNSIGNED,
        }
    }
}

fn decode_table(code: Code) -> [f32; 256] {
    let mut table = [0f32; 256];
    let bias = code.exponent_bias();
    for (c, value) in table.iter_mut().enumerate() {
        let (sign, rest) = match code {
            Code::Signed => (if c & 0x80 != 0 { -1.0 } else { 1.0 }, c & 0x7f),
            Code::Unsigned => (1.0, c),
        };
        let (exponent, mantissa) = ((rest >> 3) as i32, (rest & 7) as f32);
        *value = if exponent == 0 {
            0.0
        } else {
            sign * 2f32.powi(exponent - bias) * (1.0 + mantissa / 8.0)
        };
    }
    table
}

static SIGNED: LazyLock<[f32; 256]> = LazyLock::new(|| decode_table(Code::Signed));
static UNSIGNED: LazyLock<[f32; 256]> = LazyLock::new(|| decode_table(Code::Unsigned));

/// The code of `a` (|a| ≤ 1, a value divided by its block's scale).
#[inline(always)]
fn encode(a: f32, code: Code) -> u8 {
    let bits = a.to_bits();
    // |a| clamped to 1, then rounded to 3 mantissa bits (the carry may raise the exponent).
    let magnitude = (bits & 0x7fff_ffff).min(1f32.to_bits()) + (1 << 19);
    let exponent = (magnitude >> 23) as i32 - 127 + code.exponent_bias();
    let mantissa = ((magnitude >> 20) & 7) as u8;
    match code {
        Code::Signed => {
            if exponent < 1 {
                return 0;
            }
            (((bits >> 31) as u8) << 7) | ((exponent as u8) << 3) | mantissa
        }
        Code::Unsigned => {
            if a <= 0.0 {
                0
            } else if exponent < 1 {
                1 << 3
            } else {
                ((exponent as u8) << 3) | mantissa
            }
        }
    }
}

/// Quantizes `values` into `codes` (same length) and `scales` (one per block of [`BLOCK`]).
pub fn pack(values: &[f32], code: Code, codes: &mut [u8], scales: &mut [f32]) {
    for ((block, out), scale) in values
        .chunks(BLOCK)
        .zip(codes.chunks_mut(BLOCK))
        .zip(scales.iter_mut())
    {
        let absmax = block.iter().fold(0f32, |m, x| m.max(x.abs()));
        *scale = absmax;
        let inverse = if absmax > 0.0 { 1.0 / absmax } else { 0.0 };
        for (c, &x) in out.iter_mut().zip(block) {
            *c = encode(x * inverse, code);
        }
    }
}

/// The values of `codes` with their block `scales`, into `out` (same length as `codes`).
pub fn unpack(codes: &[u8], scales: &[f32], code: Code, out: &mut [f32]) {
    let table = code.table();
    for ((block, out), &scale) in codes.chunks(BLOCK).zip(out.chunks_mut(BLOCK)).zip(scales) {
        for (o, &c) in out.iter_mut().zip(block) {
            *o = table[c as usize] * scale;
        }
    }
}

/// A moment buffer stored in 8 bits per value.
#[derive(Clone, Debug, PartialEq)]
pub struct Packed {
    pub codes: Vec<u8>,
    pub scales: Vec<f32>,
    pub code: Code,
}

impl Packed {
    /// `len` zeros.
    pub fn zeros(len: usize, code: Code) -> Self {
        Packed {
            codes: vec![0; len],
            scales: vec![0.0; len.div_ceil(BLOCK)],
            code,
        }
    }

    /// Number of values.
    pub fn len(&self) -> usize {
        self.codes.len()
    }

    /// True when it holds no values.
    pub fn is_empty(&self) -> bool {
        self.codes.is_empty()
    }

    /// Bytes of a buffer of `len` values: one per value and four per block.
    pub fn bytes_for(len: usize) -> usize {
        len + 4 * len.div_ceil(BLOCK)
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.codes.capacity() + 4 * self.scales.capacity()
    }

    /// The values as f32, into `out` (resized to the length).
    pub fn unpack_into(&self, out: &mut Vec<f32>) {
        out.resize(self.len(), 0.0);
        unpack(&self.codes, &self.scales, self.code, out);
    }

    /// Stores `values` (of this buffer's length).
    pub fn pack_from(&mut self, values: &[f32]) {
        pack(values, self.code, &mut self.codes, &mut self.scales);
    }

    /// The values in `range`, which starts at a block boundary, with their blocks' scales.
    pub fn slice(&self, range: &std::ops::Range<usize>) -> Packed {
        debug_assert!(range.start.is_multiple_of(BLOCK));
        Packed {
            codes: self.codes[range.clone()].to_vec(),
            scales: self.scales[range.start / BLOCK..range.end.div_ceil(BLOCK)].to_vec(),
            code: self.code,
        }
    }

    /// Appends `more`'s values to these, which end at a block boundary.
    pub fn append(&mut self, more: &Packed) {
        debug_assert!(self.len().is_multiple_of(BLOCK));
        self.codes.extend_from_slice(&more.codes);
        self.scales.extend_from_slice(&more.scales);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_decodes_and_encodes_back_to_itself() {
        for code in [Code::Signed, Code::Unsigned] {
            let table = code.table();
            for c in 0..=255u8 {
                let value = table[c as usize];
                if value.abs() > 1.0 {
                    continue; // above the block's maximum: never produced
                }
                let zero = value == 0.0;
                // Signed zero has two codes; both decode to 0 and 0 encodes to code 0.
                let expect = if zero { 0 } else { c };
                assert_eq!(encode(value, code), expect, "{code:?} code {c}: {value}");
            }
        }
    }

    #[test]
    fn round_trip_error_is_within_a_sixteenth() {
        let mut seed = 7u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 11) as f64 / (1u64 << 53) as f64
        };
        // Values over eight decades, both signs; the first block holds the largest.
        let values: Vec<f32> = (0..1000)
            .map(|i| {
                let magnitude = 10f64.powf(-8.0 * next()) as f32;
                if i % 3 == 0 {
                    -magnitude
                } else {
                    magnitude
                }
            })
            .collect();
        for code in [Code::Signed, Code::Unsigned] {
            let values: Vec<f32> = match code {
                Code::Signed => values.clone(),
                Code::Unsigned => values.iter().map(|v| v.abs()).collect(),
            };
            let mut packed = Packed::zeros(values.len(), code);
            packed.pack_from(&values);
            assert_eq!(packed.scales.len(), 4);
            let mut back = Vec::new();
            packed.unpack_into(&mut back);
            let floor = match code {
                Code::Signed => 2f32.powi(-14),
                Code::Unsigned => 2f32.powi(-30),
            };
            for (b, (x, y)) in values.iter().zip(&back).enumerate() {
                let scale = packed.scales[b / BLOCK];
                if x.abs() >= floor * scale {
                    assert!((x - y).abs() <= x.abs() / 16.0, "{code:?}: {x} → {y}");
                } else if code == Code::Signed {
                    assert!(*y == 0.0 || (x - y).abs() <= x.abs() / 16.0, "{x} → {y}");
                } else {
                    // Tiny positive second moments keep the smallest code, never 0.
                    assert!(*y > 0.0, "{x} → {y}");
                }
            }
            assert_eq!(Packed::bytes_for(1000), 1000 + 16);
        }
    }

    #[test]
    fn zero_blocks_stay_zero() {
        let mut p = Packed::zeros(300, Code::Unsigned);
        p.pack_from(&[0.0; 300]);
        let mut back = Vec::new();
        p.unpack_into(&mut back);
        assert!(back.iter().all(|&x| x == 0.0));
    }
}
