//! NCCL ranks (the `nccl` feature): one rank per GPU. Tensors are summed and broadcast by NCCL
//! on the stream candle computes on, so the collectives run in order with the model's kernels;
//! host buffers (losses, settings, optimizer state for checkpoints) pass through the GPU.

use crate::watchdog::Watchdog;
use crate::{Collectives, Error};
use candle_core::backend::BackendDevice;
use candle_core::cuda::cudarc::driver::{CudaSlice, CudaStream, DeviceRepr, ValidAsZeroBits};
use candle_core::cuda::cudarc::nccl::{result::NcclError, Comm, Id, NcclType, ReduceOp};
use candle_core::{CpuStorage, CudaDevice, CudaStorage, CustomOp1, Device, Layout, Shape, Tensor};
use std::ffi::c_char;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// Bytes of an NCCL unique id.
const ID_BYTES: usize = 128;

/// Bytes per message of a gather: bounds the GPU buffers that a rank's share passes through.
const CHUNK: usize = 64 << 20;

/// An NCCL communicator, used by one thread at a time.
struct Communicator(Comm);

// SAFETY: an NCCL communicator may be called from any thread as long as calls do not overlap;
// `NcclRanks` keeps it behind a mutex, so they never do.
unsafe impl Send for Communicator {}

/// The ranks of a job on GPUs, joined by NCCL. Dropping it ends the communicator.
pub struct NcclRanks {
    comm: Mutex<Communicator>,
    stream: Arc<CudaStream>,
    device: CudaDevice,
    rank: usize,
    size: usize,
    watchdog: Watchdog,
    /// The MPI job that shared the unique id, kept to end all its ranks on a failure.
    #[cfg(feature = "mpi")]
    mpi: Option<crate::MpiRanks>,
}

/// A CUDA or NCCL error as text (their types only implement `Debug`).
fn text(e: impl std::fmt::Debug) -> String {
    format!("{e:?}")
}

fn nccl(what: &str, e: NcclError) -> Error {
    Error::Nccl(format!("{what}: {e:?}"))
}

/// A fresh unique id, as bytes to send to the other ranks.
fn unique_id() -> Result<Vec<u8>, Error> {
    let id = Id::new().map_err(|e| nccl("creating the unique id", e))?;
    Ok(id.internal().iter().map(|&c| c as u8).collect())
}

fn id_from(bytes: &[u8]) -> Result<Id, Error> {
    if bytes.len() != ID_BYTES {
        return Err(Error::Nccl(format!(
            "rank 0 sent a unique id of {} bytes instead of {ID_BYTES}: are all ranks the same frugal?",
            bytes.len()
        )));
    }
    let mut id = [0 as c_char; ID_BYTES];
    id.iter_mut()
        .zip(bytes)
        .for_each(|(d, &b)| *d = b as c_char);
    Ok(Id::uninit(id))
}

impl NcclRanks {
    fn new(
        device: &Device,
        rank: usize,
        size: usize,
        id: &[u8],
        timeout: Duration,
    ) -> Result<NcclRanks, Error> {
        let id = id_from(id)?;
        let device = device
            .as_cuda_device()
            .map_err(|e| Error::Nccl(format!("NCCL ranks need a CUDA device: {e}")))?
            .clone();
        let stream = device.cuda_stream();
        let watchdog = Watchdog::start(rank, timeout);
        let comm = {
            let _waiting = watchdog.waiting("NCCL start-up");
            Comm::from_rank(Arc::clone(&stream), rank, size, id)
        }
        .map_err(|e| nccl(&format!("rank {rank} of {size} could not join"), e))?;
        Ok(NcclRanks {
            comm: Mutex::new(Communicator(comm)),
            stream,
            device,
            rank,
            size,
            watchdog,
            #[cfg(feature = "mpi")]
            mpi: None,
        })
    }

    /// The ranks of an MPI job, on `device`: rank 0's unique id reaches the others by MPI.
    #[cfg(feature = "mpi")]
    pub fn over_mpi(
        mpi: crate::MpiRanks,
        device: &Device,
        timeout: Duration,
    ) -> Result<NcclRanks, Error> {
        let mine = match mpi.rank() {
            0 => unique_id().unwrap_or_else(|e| {
                // The other ranks wait in the broadcast: end them all.
                eprintln!("error: rank 0: {e}");
                mpi.abort(1)
            }),
            _ => Vec::new(),
        };
        let id = mpi.broadcast_bytes(mine, 0);
        let mut ranks = NcclRanks::new(device, mpi.rank(), mpi.world_size(), &id, timeout)?;
        ranks.mpi = Some(mpi);
        Ok(ranks)
    }

    /// Rank `rank` of `size` launched with torchrun-style variables, on `device`: rank 0's
    /// unique id reaches the others over TCP at `master` (needed when `size` > 1).
    pub fn over_tcp(
        device: &Device,
        rank: usize,
        size: usize,
        master: Option<&str>,
        timeout: Duration,
    ) -> Result<NcclRanks, Error> {
        let mine = if rank == 0 { unique_id()? } else { Vec::new() };
        let id = match master {
            Some(master) if size > 1 => {
                crate::rendezvous::share(master, rank, size, &mine, timeout)?
            }
            _ if size > 1 => return Err(Error::MissingVariable("MASTER_ADDR", size)),
            _ => mine,
        };
        NcclRanks::new(device, rank, size, &id, timeout)
    }

    fn comm(&self) -> MutexGuard<'_, Communicator> {
        self.comm.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Ends the job after a failed collective: the other ranks cannot go on without this one.
    fn fail(&self, what: &str, e: String) -> ! {
        eprintln!(
            "error: rank {} of {}: NCCL {what} failed: {e}",
            self.rank, self.size
        );
        self.abort(1)
    }

    /// Waits, under the watchdog, until the collectives queued on the stream have finished.
    fn wait(&self, what: &'static str) {
        let _waiting = self.watchdog.waiting(what);
        if let Err(e) = self.stream.synchronize() {
            self.fail(what, text(e))
        }
    }

    /// `host` taken through the GPU: copied there (when given: only a broadcast's root has
    /// values to send), `op` applied into a buffer of `out_len` elements (more than none), and
    /// that buffer copied back once the stream has finished.
    fn staged<T: DeviceRepr + ValidAsZeroBits + NcclType>(
        &self,
        what: &'static str,
        host: Option<&[T]>,
        out_len: usize,
        op: impl FnOnce(&Comm, Option<&CudaSlice<T>>, &mut CudaSlice<T>) -> Result<(), NcclError>,
    ) -> Vec<T> {
        let run = || -> Result<Vec<T>, String> {
            let src = host
                .map(|h| self.stream.clone_htod(h))
                .transpose()
                .map_err(text)?;
            let mut dst = self.stream.alloc_zeros::<T>(out_len).map_err(text)?;
            op(&self.comm().0, src.as_ref(), &mut dst).map_err(text)?;
            self.wait(what);
            self.stream.clone_dtoh(&dst).map_err(text)
        };
        run().unwrap_or_else(|e| self.fail(what, e))
    }

    /// `buf` summed over the ranks, through the GPU.
    fn sum<T: DeviceRepr + ValidAsZeroBits + NcclType + Copy>(&self, buf: &mut [T]) {
        if buf.is_empty() {
            return;
        }
        let out = self.staged("all-reduce", Some(buf), buf.len(), |comm, src, dst| {
            comm.all_reduce(src.expect("given"), dst, &ReduceOp::Sum)
                .map(drop)
        });
        buf.copy_from_slice(&out);
    }

    /// `buf` summed over the ranks into rank `root`'s, through the GPU.
    fn reduce(&self, buf: &mut [f32], root: usize) {
        if buf.is_empty() {
            return;
        }
        let out = self.staged("reduce", Some(buf), buf.len(), |comm, src, dst| {
            let src = src.expect("given");
            comm.reduce(src, Some(dst), &ReduceOp::Sum, root as i32)
                .map(drop)
        });
        if self.rank == root {
            buf.copy_from_slice(&out);
        }
    }

    /// Every rank's `mine` (of one length on all), in rank order, through the GPU.
    fn gather<T: DeviceRepr + ValidAsZeroBits + NcclType>(&self, mine: &[T]) -> Vec<T> {
        self.staged(
            "all-gather",
            Some(mine),
            mine.len() * self.size,
            |comm, src, dst| comm.all_gather(src.expect("given"), dst).map(drop),
        )
    }

    /// Sends `bytes` to rank `peer`, through the GPU.
    fn send_to(&self, bytes: &[u8], peer: usize) {
        let run = || -> Result<(), String> {
            let src = self.stream.clone_htod(bytes).map_err(text)?;
            self.comm().0.send(&src, peer as i32).map_err(text)?;
            self.wait("gather");
            Ok(())
        };
        run().unwrap_or_else(|e| self.fail("send", e))
    }

    /// `len` bytes (more than none) from rank `peer`, through the GPU.
    fn receive_from(&self, len: usize, peer: usize) -> Vec<u8> {
        self.staged("gather", None, len, |comm, _, dst| {
            comm.recv(dst, peer as i32).map(drop)
        })
    }

    /// Rank `root`'s `values` on every rank (`len` of them, known to all, more than none).
    fn broadcast<T: DeviceRepr + ValidAsZeroBits + NcclType>(
        &self,
        values: &[T],
        len: usize,
        root: usize,
    ) -> Vec<T> {
        let mine = (self.rank == root).then_some(values);
        self.staged("broadcast", mine, len, |comm, src, dst| {
            comm.broadcast(src, dst, root as i32).map(drop)
        })
    }
}

/// A tensor collective as a candle operation on CUDA storage: its output is a new buffer.
enum TensorOp<'a> {
    Sum(&'a NcclRanks),
    /// Summed into the root's output (the others' output is not read).
    Reduce(&'a NcclRanks, usize),
    Broadcast(&'a NcclRanks, usize),
}

impl CustomOp1 for TensorOp<'_> {
    fn name(&self) -> &'static str {
        match self {
            TensorOp::Sum(_) => "nccl-all-reduce",
            TensorOp::Reduce(..) => "nccl-reduce",
            TensorOp::Broadcast(..) => "nccl-broadcast",
        }
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!(
            "{}: NCCL works on GPU tensors; this one is on the CPU",
            self.name()
        )
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let values = || match l.contiguous_offsets() {
            Some((start, end)) => Ok(s.as_cuda_slice::<f32>()?.slice(start..end)),
            None => candle_core::bail!("{}: the tensor is not contiguous", self.name()),
        };
        let (TensorOp::Sum(ranks) | TensorOp::Reduce(ranks, _) | TensorOp::Broadcast(ranks, _)) =
            self;
        let mut dst = ranks
            .stream
            .alloc_zeros::<f32>(l.shape().elem_count())
            .map_err(|e| candle_core::Error::Msg(format!("{}: {}", self.name(), text(e))))?;
        let comm = ranks.comm();
        match self {
            TensorOp::Sum(_) => comm.0.all_reduce(&values()?, &mut dst, &ReduceOp::Sum),
            TensorOp::Reduce(_, root) => {
                comm.0
                    .reduce(&values()?, Some(&mut dst), &ReduceOp::Sum, *root as i32)
            }
            TensorOp::Broadcast(_, root) => {
                // Only the root's values are read: the others' tensor gives the shape.
                let src = (ranks.rank == *root).then(values).transpose()?;
                comm.0.broadcast(src.as_ref(), &mut dst, *root as i32)
            }
        }
        .map_err(|e| candle_core::Error::Msg(format!("{}: {}", self.name(), text(e))))?;
        Ok((
            CudaStorage::wrap_cuda_slice(dst, ranks.device.clone()),
            l.shape().clone(),
        ))
    }
}

impl NcclRanks {
    /// True if `t` is on this rank's GPU; other tensors go through the host.
    fn on_gpu(&self, t: &Tensor) -> bool {
        matches!(t.device(), Device::Cuda(d) if d.same_device(&self.device))
    }
}

/// `t` as a contiguous f32 tensor, the layout NCCL reads.
fn contiguous_f32(t: &Tensor) -> candle_core::Result<Tensor> {
    t.to_dtype(candle_core::DType::F32)?.contiguous()
}

impl Collectives for NcclRanks {
    fn engine(&self) -> &'static str {
        "NCCL"
    }

    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.size
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) {
        self.sum(buf)
    }

    fn all_reduce_sum_f64(&self, buf: &mut [f64]) {
        self.sum(buf)
    }

    fn reduce_sum(&self, buf: &mut [f32], root: usize) {
        self.reduce(buf, root)
    }

    fn all_gather_bytes(&self, mine: &[u8]) -> Vec<Vec<u8>> {
        let lens = self.gather(&[mine.len() as u64]);
        let block = lens.iter().copied().max().unwrap_or(0) as usize;
        if block == 0 {
            return vec![Vec::new(); self.size];
        }
        let mut padded = mine.to_vec();
        padded.resize(block, 0);
        let all = self.gather(&padded);
        all.chunks(block)
            .zip(&lens)
            .map(|(part, &n)| part[..n as usize].to_vec())
            .collect()
    }

    fn broadcast_f32(&self, buf: &mut [f32], root: usize) {
        if buf.is_empty() {
            return;
        }
        let out = self.broadcast(buf, buf.len(), root);
        buf.copy_from_slice(&out);
    }

    fn broadcast_bytes(&self, bytes: Vec<u8>, root: usize) -> Vec<u8> {
        let len = self.broadcast(&[bytes.len() as u64], 1, root)[0] as usize;
        if len == 0 {
            return Vec::new();
        }
        self.broadcast(&bytes, len, root)
    }

    fn gather_bytes(&self, mine: Vec<u8>, root: usize) -> Vec<Vec<u8>> {
        // Point to point, in chunks: only the root holds the whole, one chunk at a time on its GPU.
        let lens = self.gather(&[mine.len() as u64]);
        if self.rank != root {
            for chunk in mine.chunks(CHUNK) {
                self.send_to(chunk, root);
            }
            return Vec::new();
        }
        let mut mine = Some(mine);
        (0..self.size)
            .map(|r| {
                if r == root {
                    return mine.take().unwrap_or_default();
                }
                let len = lens[r] as usize;
                let mut bytes = Vec::with_capacity(len);
                while bytes.len() < len {
                    bytes.extend(self.receive_from((len - bytes.len()).min(CHUNK), r));
                }
                bytes
            })
            .collect()
    }

    fn barrier(&self) {
        self.sum(&mut [0f32]);
    }

    fn abort(&self, code: i32) -> ! {
        #[cfg(feature = "mpi")]
        if let Some(mpi) = &self.mpi {
            mpi.abort(code)
        }
        // SAFETY: `_exit` ends the process at once, without running teardown that could wait
        // on the communicator; the other ranks' watchdogs end them in turn, and nothing is
        // half-written because writes are atomic renames.
        unsafe { libc::_exit(code) }
    }

    fn all_reduce_sum_tensor(&self, t: &Tensor) -> candle_core::Result<Tensor> {
        if !self.on_gpu(t) {
            return crate::sum_through_host(self, t);
        }
        let sum = contiguous_f32(t)?.apply_op1_no_bwd(&TensorOp::Sum(self))?;
        self.wait("all-reduce");
        Ok(sum)
    }

    fn reduce_sum_tensor(&self, t: &Tensor, root: usize) -> candle_core::Result<Tensor> {
        if !self.on_gpu(t) {
            return crate::reduce_through_host(self, t, root);
        }
        let sum = contiguous_f32(t)?.apply_op1_no_bwd(&TensorOp::Reduce(self, root))?;
        self.wait("reduce");
        Ok(if self.rank == root { sum } else { t.clone() })
    }

    fn broadcast_tensor(&self, t: &Tensor, root: usize) -> candle_core::Result<Tensor> {
        if !self.on_gpu(t) {
            return crate::broadcast_through_host(self, t, root);
        }
        let t = match self.rank == root {
            true => contiguous_f32(t)?,
            false => t.clone(),
        };
        let out = t.apply_op1_no_bwd(&TensorOp::Broadcast(self, root))?;
        self.wait("broadcast");
        Ok(out)
    }
}
