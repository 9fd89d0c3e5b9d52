//! Which library runs the f32 matrix products on the CPU: the `gemm` crate candle uses by
//! default, or OpenBLAS, loaded at run time where it is installed, whose kernels
//! are faster on AVX2 machines. Both compute the same products; the order of their
//! floating-point sums differs, so the losses of a run depend on the library (the run's log
//! names it).

mod openblas;

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};

/// The library for f32 matrix products on the CPU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MatmulLibrary {
    /// OpenBLAS where it can be loaded, else `gemm`.
    #[default]
    Auto,
    /// The `gemm` crate (candle's own).
    Gemm,
    /// OpenBLAS; an error where it cannot be loaded.
    Openblas,
}

impl FromStr for MatmulLibrary {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "gemm" => Ok(Self::Gemm),
            "openblas" => Ok(Self::Openblas),
            _ => Err(format!(
                "unknown matrix-product library `{s}`: use auto, gemm or openblas"
            )),
        }
    }
}

impl fmt::Display for MatmulLibrary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Gemm => "gemm",
            Self::Openblas => "openblas",
        })
    }
}

static USING_OPENBLAS: AtomicBool = AtomicBool::new(false);

/// Routes every later f32 matrix product on the CPU to `library`. OpenBLAS is looked up as
/// `$FRUGAL_OPENBLAS` when set, else as `libopenblas.so.0` / `libopenblas.so` on the library
/// path; [`MatmulLibrary::Openblas`] fails, naming the fix, where it cannot be loaded.
pub fn use_library(library: MatmulLibrary) -> crate::Result<()> {
    let openblas = match library {
        MatmulLibrary::Gemm => false,
        MatmulLibrary::Auto => openblas::load().is_ok(),
        MatmulLibrary::Openblas => {
            openblas::load().map_err(|e| {
                crate::Error::Library(format!(
                    "{e}. Install OpenBLAS (Debian/Ubuntu: apt-get install libopenblas0-pthread), \
                     set FRUGAL_OPENBLAS to its library file, or use --matmul gemm"
                ))
            })?;
            true
        }
    };
    candle_core::cpu_backend::set_f32_matmul(openblas.then_some(openblas::product as _));
    USING_OPENBLAS.store(openblas, Ordering::Relaxed);
    Ok(())
}

/// The library the f32 matrix products on the CPU now run in, for logs: e.g.
/// "OpenBLAS 0.3.21, Zen kernels", or "gemm, AVX2/FMA kernels".
pub fn library() -> String {
    match USING_OPENBLAS.load(Ordering::Relaxed).then(openblas::load) {
        Some(Ok(blas)) => blas.description.clone(),
        _ => format!("gemm, {} kernels", gemm_isa()),
    }
}

/// The instruction set of gemm's kernels on this machine: AVX-512 where the CPU has it, else
/// AVX2 with FMA.
fn gemm_isa() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            "AVX-512"
        } else if std::arch::is_x86_feature_detected!("fma") {
            "AVX2/FMA"
        } else {
            "scalar"
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    "native"
}
