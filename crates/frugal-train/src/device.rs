//! The device a command runs on, as `--device` names it: `cpu`, `cuda` or `cuda:N`.

use anyhow::{anyhow, bail, Result};
use candle_core::{Device, DeviceLocation};

/// The device named by `spec`: `cpu`, `cuda` (the GPU of this process's `local_rank`: GPU 0
/// for a single process, one GPU per rank under a launcher) or `cuda:N`. A GPU asked of a
/// build without the `cuda` feature, or one the machine does not have, is an error that says
/// what to do.
pub fn select(spec: &str, local_rank: usize) -> Result<Device> {
    let spec = spec.trim().to_ascii_lowercase();
    let ordinal = match spec.as_str() {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => local_rank,
        other => match other.strip_prefix("cuda:") {
            Some(n) => n.parse::<usize>().map_err(|_| {
                anyhow!("--device {spec}: `{n}` is not a GPU number; use cuda:0, cuda:1, ...")
            })?,
            None => bail!("unknown device `{spec}`: use cpu, cuda or cuda:N"),
        },
    };
    if !cfg!(feature = "cuda") {
        bail!(
            "--device {spec}: this frugal was built without CUDA; build the CUDA binary with scripts/build-cuda.sh (cargo feature `cuda`) and run target/cuda/release/frugal"
        );
    }
    Device::new_cuda(ordinal).map_err(|e| {
        // The driver's error, without the backtrace candle may attach.
        let e = e.to_string();
        let cause = e.lines().next().unwrap_or_default();
        anyhow!(
            "--device {spec}: cannot use CUDA device {ordinal} ({cause}); check that the NVIDIA driver works (`nvidia-smi` lists the GPUs) and that {ordinal} is below their number"
        )
    })
}

/// A device's name as `--device` spells it.
pub fn name(device: &Device) -> String {
    match device.location() {
        DeviceLocation::Cpu => "cpu".into(),
        DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// True if `e` is a device running out of memory (CUDA's allocation failure).
pub fn out_of_memory(e: &anyhow::Error) -> bool {
    let text = format!("{e:#}");
    text.contains("OUT_OF_MEMORY") || text.contains("out of memory")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_are_named_and_checked() {
        assert!(select(" CPU ", 1).unwrap().is_cpu());
        assert_eq!(name(&Device::Cpu), "cpu");
        let err = select("tpu", 0).unwrap_err().to_string();
        assert!(err.contains("cpu, cuda or cuda:N"), "{err}");
        let err = select("cuda:x", 0).unwrap_err().to_string();
        assert!(err.contains("not a GPU number"), "{err}");
        if !cfg!(feature = "cuda") {
            let err = select("cuda:1", 0).unwrap_err().to_string();
            assert!(err.contains("scripts/build-cuda.sh"), "{err}");
        }
        let oom = anyhow!("DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")");
        assert!(out_of_memory(&oom.context("step 3")));
        assert!(!out_of_memory(&anyhow!("bad data")));
    }
}
