//! How this process was launched: alone, as one of the ranks of an MPI job, or by a launcher
//! that sets torchrun-style variables (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`,
//! `MASTER_PORT`); and joining the ranks with the engine that fits the device.

use crate::{Collectives, Error, Solo};
use candle_core::Device;
use std::sync::Arc;
use std::time::Duration;

/// The ranks a launcher asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Launch {
    /// One process.
    Single,
    /// An MPI launcher started `world_size` ranks (more than one); this one is the
    /// `local_rank`-th on its machine.
    Mpi {
        world_size: usize,
        local_rank: usize,
    },
    /// Torchrun-style variables: this process is rank `rank` of `world_size`, the
    /// `local_rank`-th on its machine; rank 0 listens at `master` (`MASTER_ADDR:MASTER_PORT`,
    /// or the port after it under torchrun, whose agent holds MASTER_PORT; needed by more than
    /// one rank).
    Torchrun {
        rank: usize,
        world_size: usize,
        local_rank: usize,
        master: Option<String>,
    },
}

/// World-size variables of MPI launchers: Open MPI's, then MPICH's (Hydra, PMI).
const MPI_SIZES: [&str; 2] = ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE"];
/// Local-rank variables of MPI launchers, in the same order.
const MPI_LOCAL_RANKS: [&str; 2] = ["OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID"];

fn number(variable: &'static str, value: String) -> Result<usize, Error> {
    value
        .trim()
        .parse()
        .map_err(|_| Error::BadVariable { variable, value })
}

fn count(variable: &'static str, value: String) -> Result<usize, Error> {
    match number(variable, value.clone())? {
        0 => Err(Error::BadVariable { variable, value }),
        n => Ok(n),
    }
}

impl Launch {
    /// The launch that the variables `var` reads describe.
    pub fn detect(var: impl Fn(&str) -> Option<String>) -> Result<Launch, Error> {
        for (variable, local) in MPI_SIZES.into_iter().zip(MPI_LOCAL_RANKS) {
            if let Some(value) = var(variable) {
                let world_size = count(variable, value)?;
                let local_rank = var(local).map(|v| number(local, v)).transpose()?;
                return Ok(match world_size {
                    1 => Launch::Single,
                    world_size => Launch::Mpi {
                        world_size,
                        local_rank: local_rank.unwrap_or(0),
                    },
                });
            }
        }
        let Some(value) = var("WORLD_SIZE") else {
            return Ok(Launch::Single);
        };
        let world_size = count("WORLD_SIZE", value)?;
        let rank = match var("RANK") {
            Some(v) => number("RANK", v)?,
            None if world_size == 1 => 0,
            None => return Err(Error::MissingVariable("RANK", world_size)),
        };
        if rank >= world_size {
            return Err(Error::BadVariable {
                variable: "RANK",
                value: format!("{rank} (WORLD_SIZE is {world_size})"),
            });
        }
        let local_rank = match var("LOCAL_RANK") {
            Some(v) => number("LOCAL_RANK", v)?,
            None => rank,
        };
        let master = match (var("MASTER_ADDR"), var("MASTER_PORT")) {
            (Some(addr), Some(port)) => {
                let mut port = number("MASTER_PORT", port)?;
                // torchrun's agent serves its own store at MASTER_PORT: rank 0 takes the next.
                if var("TORCHELASTIC_USE_AGENT_STORE").is_some_and(|v| v.trim() == "True") {
                    port += 1;
                }
                Some(format!("{}:{port}", addr.trim()))
            }
            _ if world_size == 1 => None,
            (None, _) => return Err(Error::MissingVariable("MASTER_ADDR", world_size)),
            (_, None) => return Err(Error::MissingVariable("MASTER_PORT", world_size)),
        };
        Ok(Launch::Torchrun {
            rank,
            world_size,
            local_rank,
            master,
        })
    }

    /// The launch this process's environment describes.
    pub fn from_environment() -> Result<Launch, Error> {
        Launch::detect(|v| std::env::var(v).ok())
    }

    /// This process's index among the ranks on its machine: the GPU that `--device cuda` means.
    pub fn local_rank(&self) -> usize {
        match self {
            Launch::Single => 0,
            Launch::Mpi { local_rank, .. } | Launch::Torchrun { local_rank, .. } => *local_rank,
        }
    }
}

/// Joins the ranks of `launch` for work on `device`: none when alone; MPI under `mpirun`; NCCL
/// for GPUs (the `nccl` feature), its unique id shared over MPI or, for torchrun-style launches,
/// over TCP at `MASTER_ADDR:MASTER_PORT`. Collectives that wait longer than `timeout` end the
/// process with a message.
pub fn join(
    launch: &Launch,
    device: &Device,
    timeout: Duration,
) -> Result<Arc<dyn Collectives>, Error> {
    match launch {
        Launch::Single => Ok(Arc::new(Solo)),
        Launch::Mpi { .. } => join_mpi(device, timeout),
        Launch::Torchrun {
            rank,
            world_size,
            master,
            ..
        } => join_torchrun(device, *rank, *world_size, master.as_deref(), timeout),
    }
}

#[cfg(feature = "mpi")]
fn join_mpi(device: &Device, timeout: Duration) -> Result<Arc<dyn Collectives>, Error> {
    let mpi = crate::MpiRanks::init(timeout)?;
    #[cfg(feature = "nccl")]
    if device.is_cuda() {
        return Ok(Arc::new(crate::NcclRanks::over_mpi(mpi, device, timeout)?));
    }
    let _ = device;
    Ok(Arc::new(mpi))
}

#[cfg(not(feature = "mpi"))]
fn join_mpi(_device: &Device, _timeout: Duration) -> Result<Arc<dyn Collectives>, Error> {
    let variable = MPI_SIZES
        .into_iter()
        .find(|v| std::env::var_os(v).is_some())
        .unwrap_or(MPI_SIZES[0]);
    Err(Error::NoMpi { variable })
}

fn join_torchrun(
    device: &Device,
    rank: usize,
    world_size: usize,
    master: Option<&str>,
    timeout: Duration,
) -> Result<Arc<dyn Collectives>, Error> {
    #[cfg(feature = "nccl")]
    if device.is_cuda() {
        return Ok(Arc::new(crate::NcclRanks::over_tcp(
            device, rank, world_size, master, timeout,
        )?));
    }
    let _ = (rank, master, timeout);
    match world_size {
        1 => Ok(Arc::new(Solo)),
        world_size => Err(Error::NoEngine {
            world_size,
            gpu: device.is_cuda(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn detect(vars: &[(&str, &str)]) -> Result<Launch, Error> {
        Launch::detect(|name| {
            vars.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.to_string())
        })
    }

    fn torchrun(rank: usize, world_size: usize, local_rank: usize, master: &str) -> Launch {
        Launch::Torchrun {
            rank,
            world_size,
            local_rank,
            master: Some(master.into()),
        }
    }

    #[test]
    fn launchers_are_told_apart_by_their_variables() {
        assert_eq!(detect(&[]).unwrap(), Launch::Single);
        assert_eq!(
            detect(&[
                ("OMPI_COMM_WORLD_SIZE", "2"),
                ("OMPI_COMM_WORLD_LOCAL_RANK", "1")
            ])
            .unwrap(),
            Launch::Mpi {
                world_size: 2,
                local_rank: 1
            }
        );
        assert_eq!(
            detect(&[("PMI_SIZE", "4"), ("MPI_LOCALRANKID", "3")]).unwrap(),
            Launch::Mpi {
                world_size: 4,
                local_rank: 3
            }
        );
        assert_eq!(
            detect(&[("OMPI_COMM_WORLD_SIZE", "1")]).unwrap(),
            Launch::Single
        );
        let e = detect(&[("PMI_SIZE", "two")]).unwrap_err().to_string();
        assert!(e.contains("PMI_SIZE=two"), "{e}");
    }

    #[test]
    fn torchrun_variables_name_the_rank_and_rank_zeros_address() {
        let full = [
            ("RANK", "3"),
            ("WORLD_SIZE", "4"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "29500"),
        ];
        let launch = detect(&full).unwrap();
        assert_eq!(launch, torchrun(3, 4, 1, "node0:29500"));
        assert_eq!(launch.local_rank(), 1);
        // Under torchrun, whose agent serves its store at MASTER_PORT, rank 0 takes the next port.
        let agent = [("TORCHELASTIC_USE_AGENT_STORE", "True")];
        assert_eq!(
            detect(&[&full[..], &agent].concat()).unwrap(),
            torchrun(3, 4, 1, "node0:29501")
        );
        // Without LOCAL_RANK, one machine is assumed.
        assert_eq!(
            detect(
                &full[..2]
                    .iter()
                    .chain(&full[3..])
                    .copied()
                    .collect::<Vec<_>>()
            )
            .unwrap(),
            torchrun(3, 4, 3, "node0:29500")
        );
        // One rank needs neither RANK nor an address.
        assert_eq!(
            detect(&[("WORLD_SIZE", "1")]).unwrap(),
            Launch::Torchrun {
                rank: 0,
                world_size: 1,
                local_rank: 0,
                master: None
            }
        );
        let e = detect(&[("WORLD_SIZE", "2"), ("RANK", "1"), ("MASTER_PORT", "1")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("MASTER_ADDR"), "{e}");
        let e = detect(&[("WORLD_SIZE", "2")]).unwrap_err().to_string();
        assert!(e.contains("RANK"), "{e}");
        let e = detect(&[("WORLD_SIZE", "2"), ("RANK", "2")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("WORLD_SIZE is 2"), "{e}");
        let e = detect(&[("WORLD_SIZE", "0")]).unwrap_err().to_string();
        assert!(e.contains("WORLD_SIZE=0"), "{e}");
    }

    #[test]
    fn ranks_without_an_engine_are_an_error_with_the_fix() {
        let cpu = Device::Cpu;
        let t = Duration::from_secs(1);
        let one = detect(&[("WORLD_SIZE", "1")]).unwrap();
        assert_eq!(join(&one, &cpu, t).unwrap().world_size(), 1);
        let two = torchrun(0, 2, 0, "127.0.0.1:1");
        let e = join(&two, &cpu, t).err().unwrap().to_string();
        assert!(e.contains("mpirun -np 2"), "{e}");
    }
}
