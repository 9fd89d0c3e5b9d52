//! The threads a training process works on: one rayon pool shared by candle's matrix products
//! (in the library `--matmul` chooses), the fused operations and the optimizer, and a short spin
//! for candle's element-wise workers.

/// Spins of candle's element-wise workers before they sleep, unless
/// `CANDLE_BARRIER_POOL_SPIN_LIMIT` is set: with candle's 25 000, a worker that has finished
/// keeps its core busy while the next matrix product (on the rayon pool) needs that core.
const ELEMENTWISE_SPINS: &str = "2000";

/// Sets candle's element-wise spin limit (see `ELEMENTWISE_SPINS`) unless the environment
/// sets one. Call it at start-up, before other threads exist and before any tensor operation.
pub fn limit_elementwise_spinning() {
    const VAR: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";
    if std::env::var_os(VAR).is_none() {
        std::env::set_var(VAR, ELEMENTWISE_SPINS);
    }
}

/// The CPU's share of a process: its worker threads and the library of its f32 matrix products.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct CpuSettings {
    /// Worker threads [default: the physical cores, shared by the processes of a job on this
    /// machine].
    #[cfg_attr(feature = "cli", arg(long))]
    pub threads: Option<usize>,
    /// Library of the CPU's f32 matrix products: auto (OpenBLAS where it is installed, found as
    /// $FRUGAL_OPENBLAS or libopenblas.so.0, else gemm), gemm or openblas.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = frugal_nn::matmul::MatmulLibrary::Auto))]
    pub matmul: frugal_nn::matmul::MatmulLibrary,
}

/// Runs `work` on a pool of `cpu.threads` worker threads, which candle, faer and the optimizer then
/// share; by default, candle's count of physical cores (or `RAYON_NUM_THREADS`) divided among
/// `ranks_here`, the processes of the job on this machine. The calling thread waits, so every
/// parallel operation starts from a worker that takes part in it, instead of handing its work
/// to the pool and sleeping until it is done. The f32 matrix products on the CPU run in
/// `cpu.matmul` (see [`frugal_nn::matmul`]).
pub fn in_pool<R: Send>(
    cpu: CpuSettings,
    ranks_here: usize,
    work: impl FnOnce() -> anyhow::Result<R> + Send,
) -> anyhow::Result<R> {
    frugal_nn::matmul::use_library(cpu.matmul)?;
    let cores = candle_core::utils::get_num_threads();
    let threads = cpu.threads.unwrap_or((cores / ranks_here.max(1)).max(1));
    if threads == 0 {
        anyhow::bail!("--threads must be at least 1");
    }
    // candle sizes its matrix products and its own element-wise pool by this variable.
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start {threads} worker threads: {e}"))?;
    pool.install(work)
}
