//! OpenBLAS's `cblas_sgemm`, loaded at run time (no build-time dependency: a binary runs with
//! or without it), single-threaded, each product split across the rayon pool's workers.

use candle_core::cpu_backend::F32MatMul;
use rayon::prelude::*;
use std::ffi::{c_char, c_int, CStr};
use std::sync::OnceLock;

type Sgemm = unsafe extern "C" fn(
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    f32,
    *const f32,
    c_int,
    *const f32,
    c_int,
    f32,
    *mut f32,
    c_int,
);

const ROW_MAJOR: c_int = 101;
const NO_TRANS: c_int = 111;
const TRANS: c_int = 112;

/// Library names tried in turn when `$FRUGAL_OPENBLAS` is not set.
const NAMES: &[&str] = &["libopenblas.so.0", "libopenblas.so"];

/// The variable that names the kernels a dynamic-architecture OpenBLAS uses.
const CORETYPE: &str = "OPENBLAS_CORETYPE";

/// The OpenBLAS kernels for this CPU's vector instructions: SkylakeX with AVX-512, Haswell
/// with AVX2 and FMA. They are chosen before OpenBLAS loads (unless `OPENBLAS_CORETYPE` is
/// set) because an OpenBLAS older than the CPU may not recognise it: Debian's 0.3.21 takes a
/// Sapphire Rapids Xeon for a Prescott (SSE3 kernels), and trains 4.6× slower.
fn kernels_for_this_cpu() -> Option<&'static str> {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("avx512dq") {
            return Some("SkylakeX");
        }
        if has!("avx2") && has!("fma") {
            return Some("Haswell");
        }
    }
    None
}

/// A loaded OpenBLAS.
pub(super) struct OpenBlas {
    sgemm: Sgemm,
    /// "OpenBLAS 0.3.21, Zen kernels".
    pub(super) description: String,
    _library: libloading::Library,
}

/// OpenBLAS, loaded and checked on first use.
pub(super) fn load() -> Result<&'static OpenBlas, String> {
    static LOADED: OnceLock<Result<OpenBlas, String>> = OnceLock::new();
    LOADED.get_or_init(open).as_ref().map_err(Clone::clone)
}

fn open() -> Result<OpenBlas, String> {
    if std::env::var_os(CORETYPE).is_none() {
        if let Some(kernels) = kernels_for_this_cpu() {
            // Read by OpenBLAS's initialiser as the library loads.
            std::env::set_var(CORETYPE, kernels);
        }
    }
    let names: Vec<String> = match std::env::var("FRUGAL_OPENBLAS") {
        Ok(path) => vec![path],
        Err(_) => NAMES.iter().map(|n| n.to_string()).collect(),
    };
    let mut errors = Vec::new();
    for name in &names {
        // SAFETY: loading runs OpenBLAS's initialisers, which only set up its own state.
        match unsafe { libloading::Library::new(name) } {
            Ok(library) => return bind(library, name),
            Err(e) => errors.push(e.to_string()),
        }
    }
    Err(format!("cannot load OpenBLAS: {}", errors.join("; ")))
}

/// Binds the functions of `library` (found as `name`), makes it single-threaded and checks one
/// product against the exact result.
fn bind(library: libloading::Library, name: &str) -> Result<OpenBlas, String> {
    let missing = |e: libloading::Error| format!("{name} is not a usable OpenBLAS: {e}");
    // SAFETY: the signatures are those of OpenBLAS's C interface (32-bit integers, as in the
    // `libopenblas.so.0` of distributions); the check below catches a library built otherwise.
    let blas = unsafe {
        let sgemm = *library.get::<Sgemm>(b"cblas_sgemm\0").map_err(missing)?;
        let set_threads = *library
            .get::<unsafe extern "C" fn(c_int)>(b"openblas_set_num_threads\0")
            .map_err(missing)?;
        let config = *library
            .get::<unsafe extern "C" fn() -> *const c_char>(b"openblas_get_config\0")
            .map_err(missing)?;
        let core = *library
            .get::<unsafe extern "C" fn() -> *const c_char>(b"openblas_get_corename\0")
            .map_err(missing)?;
        // The rayon pool supplies the parallelism; OpenBLAS's own threads would compete for
        // the same cores.
        set_threads(1);
        let text = |s: *const c_char| CStr::from_ptr(s).to_string_lossy().into_owned();
        let version = text(config())
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ");
        OpenBlas {
            sgemm,
            description: format!("{version}, {} kernels", text(core())),
            _library: library,
        }
    };
    // (2 × 3) · (3 × 2), with A transposed in storage: [[1,2,3],[4,5,6]] · [[1,0],[0,1],[1,1]].
    let a = [1.0f32, 4.0, 2.0, 5.0, 3.0, 6.0];
    let b = [1.0f32, 0.0, 0.0, 1.0, 1.0, 1.0];
    let mut c = [f32::NAN; 4];
    // SAFETY: the operands hold 6, 6 and 4 elements, as their shapes and leading dimensions need.
    unsafe {
        (blas.sgemm)(
            ROW_MAJOR,
            TRANS,
            NO_TRANS,
            2,
            2,
            3,
            1.0,
            a.as_ptr(),
            2,
            b.as_ptr(),
            2,
            0.0,
            c.as_mut_ptr(),
            2,
        )
    };
    if c != [4.0, 5.0, 10.0, 11.0] {
        return Err(format!(
            "{name} computed a wrong product ({c:?} instead of [4, 5, 10, 11]): it may use \
             64-bit integers"
        ));
    }
    Ok(blas)
}

/// An operand as OpenBLAS takes it: transposed or not, and its leading dimension.
#[derive(Clone, Copy)]
struct Operand {
    trans: c_int,
    ld: usize,
}

/// How OpenBLAS reads a `rows` × `cols` matrix whose elements lie `rs` apart along a column
/// and `cs` apart along a row; None for layouts it cannot read (neither stride 1, or
/// overlapping rows as in broadcasts).
fn operand(rows: usize, cols: usize, rs: usize, cs: usize) -> Option<Operand> {
    let plain = (cs == 1 || cols == 1).then_some(Operand {
        trans: NO_TRANS,
        ld: if rows == 1 { cols.max(1) } else { rs },
    });
    let transposed = (rs == 1 || rows == 1).then_some(Operand {
        trans: TRANS,
        ld: if cols == 1 { rows.max(1) } else { cs },
    });
    plain
        .filter(|o| o.ld >= cols.max(1))
        .or(transposed.filter(|o| o.ld >= rows.max(1)))
}

/// True when the last element of the last of `batch` (`rows` × `cols`, strides `rs`, `cs`)
/// matrices `skip` apart lies inside a slice of `len` elements.
fn within(
    len: usize,
    batch: usize,
    skip: usize,
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
) -> bool {
    (batch - 1) * skip + (rows - 1) * rs + (cols - 1) * cs < len
}

/// Products smaller than this many multiply-adds run on one worker.
const SPLIT_FROM: usize = 1 << 18;
/// Parts of a split product are whole multiples of this many rows (or columns).
const PART_ALIGN: usize = 16;

/// A part of a product: its batch step, and its rows `from..to` of the output (its columns
/// where the product is split by columns).
struct Part {
    step: usize,
    from: usize,
    to: usize,
}

/// Computes `p` with OpenBLAS, split into parts across the pool's workers; false where the
/// layout or a size is beyond it.
pub(super) fn product(p: &mut F32MatMul<'_>) -> bool {
    let Ok(blas) = load() else { return false };
    if p.batch == 0 || p.m == 0 || p.n == 0 {
        return true;
    }
    let (Some(a), Some(b)) = (
        operand(p.m, p.k, p.lhs_rs, p.lhs_cs),
        operand(p.k, p.n, p.rhs_rs, p.rhs_cs),
    ) else {
        return false;
    };
    let limit = c_int::MAX as usize;
    if [p.m, p.n, p.k, a.ld, b.ld].iter().any(|&v| v > limit)
        || !within(
            p.lhs.len(),
            p.batch,
            p.lhs_skip,
            p.m,
            p.k,
            p.lhs_rs,
            p.lhs_cs,
        )
        || !within(
            p.rhs.len(),
            p.batch,
            p.rhs_skip,
            p.k,
            p.n,
            p.rhs_rs,
            p.rhs_cs,
        )
        || p.dst.len() < p.batch * p.m * p.n
    {
        return false;
    }
    // Split the longer side of each step's output among the workers the batch leaves idle.
    let workers = rayon::current_num_threads();
    let by_columns = p.n > p.m;
    let side = if by_columns { p.n } else { p.m };
    let per_step = if p.m * p.n * p.k < SPLIT_FROM {
        1
    } else {
        workers
            .div_ceil(p.batch)
            .min(side.div_ceil(PART_ALIGN))
            .max(1)
    };
    let chunk = side.div_ceil(per_step).next_multiple_of(PART_ALIGN);
    let parts: Vec<Part> = (0..p.batch)
        .flat_map(|step| {
            (0..side).step_by(chunk).map(move |from| Part {
                step,
                from,
                to: (from + chunk).min(side),
            })
        })
        .collect();
    let (lhs, rhs) = (p.lhs.as_ptr() as usize, p.rhs.as_ptr() as usize);
    let dst = p.dst.as_mut_ptr() as usize;
    let (m, n, k) = (p.m, p.n, p.k);
    let (lhs_skip, rhs_skip, lhs_rs, rhs_cs) = (p.lhs_skip, p.rhs_skip, p.lhs_rs, p.rhs_cs);
    let run = |part: &Part| {
        let (rows, cols, lhs_at, rhs_at, dst_at) = if by_columns {
            let cols = part.to - part.from;
            (m, cols, 0, part.from * rhs_cs, part.from)
        } else {
            let rows = part.to - part.from;
            (rows, n, part.from * lhs_rs, 0, part.from * n)
        };
        let lhs = lhs as *const f32;
        let rhs = rhs as *const f32;
        let dst = dst as *mut f32;
        // SAFETY: every element of each step's operands and output lies inside its slice
        // (`within`), the parts cover disjoint blocks of the output, and the sizes fit in c_int.
        unsafe {
            (blas.sgemm)(
                ROW_MAJOR,
                a.trans,
                b.trans,
                rows as c_int,
                cols as c_int,
                k as c_int,
                1.0,
                lhs.add(part.step * lhs_skip + lhs_at),
                a.ld as c_int,
                rhs.add(part.step * rhs_skip + rhs_at),
                b.ld as c_int,
                // dst is uninitialised: each part's block is zeroed by the worker that fills it.
                0.0,
                dst.add(part.step * m * n + dst_at),
                n as c_int,
            )
        }
    };
    if parts.len() == 1 {
        run(&parts[0]);
    } else {
        parts.par_iter().for_each(run);
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operands_are_read_plain_or_transposed_and_broadcasts_are_declined() {
        let plain = operand(4, 3, 3, 1).unwrap();
        assert_eq!((plain.trans, plain.ld), (NO_TRANS, 3));
        let padded = operand(4, 3, 8, 1).unwrap();
        assert_eq!((padded.trans, padded.ld), (NO_TRANS, 8));
        let transposed = operand(4, 3, 1, 4).unwrap();
        assert_eq!((transposed.trans, transposed.ld), (TRANS, 4));
        // A single column: any row stride reads as a plain matrix.
        assert_eq!(operand(5, 1, 7, 99).unwrap().ld, 7);
        // Rows broadcast (stride 0) and fully strided layouts have no BLAS form.
        assert!(operand(4, 3, 0, 1).is_none());
        assert!(operand(4, 3, 6, 2).is_none());
    }

    #[test]
    fn the_kernels_use_the_cpus_vector_instructions() {
        let Ok(blas) = load() else {
            eprintln!("OpenBLAS is not installed, nothing to check");
            return;
        };
        let chosen = std::env::var(CORETYPE).ok();
        eprintln!("{} ({CORETYPE}={chosen:?})", blas.description);
        // Kernels of CPUs before AVX2, which an OpenBLAS that does not know the CPU falls
        // back to.
        let old = [
            "Prescott",
            "Core2",
            "Penryn",
            "Dunnington",
            "Nehalem",
            "Sandybridge",
            "Atom",
        ];
        if kernels_for_this_cpu().is_some() {
            assert!(
                !old.iter().any(|k| blas.description.contains(k)),
                "{} on a CPU with AVX2",
                blas.description
            );
        }
    }

    #[test]
    fn every_output_element_is_written_whatever_it_held() {
        if let Err(e) = load() {
            eprintln!("OpenBLAS is not installed, nothing to check: {e}");
            return;
        }
        // Split by rows, split by columns, one worker, and batched: the output starts as NaN.
        for (batch, m, n, k) in [
            (1, 300, 70, 40),
            (1, 70, 300, 40),
            (1, 5, 7, 3),
            (6, 9, 8, 5),
        ] {
            let lhs: Vec<f32> = (0..batch * m * k).map(|i| (i % 7) as f32 - 3.0).collect();
            let rhs: Vec<f32> = (0..batch * k * n).map(|i| (i % 5) as f32 - 2.0).collect();
            let mut dst = vec![std::mem::MaybeUninit::new(f32::NAN); batch * m * n];
            let mut p = F32MatMul {
                batch,
                m,
                n,
                k,
                lhs: &lhs,
                lhs_skip: m * k,
                lhs_rs: k,
                lhs_cs: 1,
                rhs: &rhs,
                rhs_skip: k * n,
                rhs_rs: n,
                rhs_cs: 1,
                dst: &mut dst,
            };
            assert!(product(&mut p));
            for s in 0..batch {
                for i in 0..m {
                    for j in 0..n {
                        let want: f32 = (0..k)
                            .map(|l| lhs[s * m * k + i * k + l] * rhs[s * k * n + l * n + j])
                            .sum();
                        // SAFETY: the product has written every element.
                        let got = unsafe { dst[s * m * n + i * n + j].assume_init() };
                        assert_eq!(got, want, "{batch}×{m}×{n}×{k} at [{s}, {i}, {j}]");
                    }
                }
            }
        }
    }

    #[test]
    fn operands_must_end_inside_their_slices() {
        // Two 4 × 3 matrices 12 apart: the last element is 12 + 3·3 + 2 = 23.
        assert!(within(24, 2, 12, 4, 3, 3, 1));
        assert!(!within(23, 2, 12, 4, 3, 3, 1));
        // Transposed storage: the last element is 3·1 + 2·4 = 11.
        assert!(within(12, 1, 0, 4, 3, 1, 4));
        assert!(!within(11, 1, 0, 4, 3, 1, 4));
    }
}
