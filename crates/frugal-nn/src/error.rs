//! Typed errors of the models and operations.

use thiserror::Error;

/// Everything that can go wrong building, loading, saving or running a model.
#[derive(Debug, Error)]
pub enum Error {
    /// A model configuration is invalid or cannot be read.
    #[error("{0}")]
    Config(String),

    /// Weights do not fit the configuration.
    #[error("{0}")]
    Weights(String),

    /// A file could not be read or written.
    #[error("{path}: {reason}")]
    File { path: String, reason: String },

    /// An input does not fit the model (sequence too long, wrong shape).
    #[error("{0}")]
    Input(String),

    /// The loss of a batch is NaN or infinite; no gradient was computed from it.
    #[error("the loss became {loss}; no gradient was computed from it")]
    NonFiniteLoss { loss: f32 },

    /// A native library could not be loaded or fails its check.
    #[error("{0}")]
    Library(String),

    /// An error from candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn file(path: &std::path::Path, reason: impl ToString) -> Self {
        Error::File {
            path: path.display().to_string(),
            reason: reason.to_string(),
        }
    }
}
