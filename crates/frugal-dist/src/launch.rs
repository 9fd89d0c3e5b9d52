//! How this process was launched: alone, or as one of the ranks of an MPI job.

use crate::{Collectives, Error, Solo};
use std::sync::Arc;
use std::time::Duration;

/// The ranks a launcher asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Launch {
    /// One process.
    Single,
    /// An MPI launcher started `world_size` ranks (more than one).
    Mpi { world_size: usize },
}

/// World-size variables of MPI launchers: Open MPI's, then MPICH's (Hydra, PMI).
const MPI_SIZES: [&str; 2] = ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE"];

fn count(variable: &'static str, value: String) -> Result<usize, Error> {
    match value.trim().parse() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(Error::BadVariable { variable, value }),
    }
}

impl Launch {
    /// The launch that the variables `var` reads describe.
    pub fn detect(var: impl Fn(&str) -> Option<String>) -> Result<Launch, Error> {
        for variable in MPI_SIZES {
            if let Some(value) = var(variable) {
                return Ok(match count(variable, value)? {
                    1 => Launch::Single,
                    world_size => Launch::Mpi { world_size },
                });
            }
        }
        match var("WORLD_SIZE") {
            Some(value) => match count("WORLD_SIZE", value)? {
                1 => Ok(Launch::Single),
                world_size => Err(Error::NoEngine { world_size }),
            },
            None => Ok(Launch::Single),
        }
    }
}

/// The collectives of this process as its launcher started it: [`Solo`] when alone, MPI ranks
/// under `mpirun` (collectives that wait longer than `timeout` end the process with a message).
pub fn from_environment(timeout: Duration) -> Result<Arc<dyn Collectives>, Error> {
    match Launch::detect(|v| std::env::var(v).ok())? {
        Launch::Single => Ok(Arc::new(Solo)),
        Launch::Mpi { .. } => join_mpi(timeout),
    }
}

#[cfg(feature = "mpi")]
fn join_mpi(timeout: Duration) -> Result<Arc<dyn Collectives>, Error> {
    Ok(Arc::new(crate::MpiRanks::init(timeout)?))
}

#[cfg(not(feature = "mpi"))]
fn join_mpi(_timeout: Duration) -> Result<Arc<dyn Collectives>, Error> {
    let variable = MPI_SIZES
        .into_iter()
        .find(|v| std::env::var_os(v).is_some())
        .unwrap_or(MPI_SIZES[0]);
    Err(Error::NoMpi { variable })
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

    #[test]
    fn launchers_are_told_apart_by_their_variables() {
        assert_eq!(detect(&[]).unwrap(), Launch::Single);
        assert_eq!(
            detect(&[("OMPI_COMM_WORLD_SIZE", "2")]).unwrap(),
            Launch::Mpi { world_size: 2 }
        );
        assert_eq!(
            detect(&[("PMI_SIZE", "4")]).unwrap(),
            Launch::Mpi { world_size: 4 }
        );
        assert_eq!(
            detect(&[("OMPI_COMM_WORLD_SIZE", "1")]).unwrap(),
            Launch::Single
        );
        assert_eq!(detect(&[("WORLD_SIZE", "1")]).unwrap(), Launch::Single);
        let e = detect(&[("WORLD_SIZE", "2")]).unwrap_err().to_string();
        assert!(e.contains("mpirun -np 2"), "{e}");
        let e = detect(&[("PMI_SIZE", "two")]).unwrap_err().to_string();
        assert!(e.contains("PMI_SIZE=two"), "{e}");
    }
}
