//! Typed errors of the optimizer library.

use thiserror::Error;

/// Everything that can go wrong when building, stepping, saving or loading an optimizer.
#[derive(Debug, Error)]
pub enum Error {
    /// A configuration value is out of range or inconsistent.
    #[error("invalid optimizer setting `{field}`: {reason}")]
    InvalidSetting { field: String, reason: String },

    /// A name (preset, projection, rule, order, …) is not one of the known ones.
    #[error("unknown {kind} `{name}`; expected one of: {expected}")]
    UnknownName {
        kind: &'static str,
        name: String,
        expected: String,
    },

    /// A parameter-name pattern is not a valid regular expression.
    #[error("invalid {which} pattern `{pattern}`: {reason}")]
    BadPattern {
        which: &'static str,
        pattern: String,
        reason: String,
    },

    /// A parameter-name pattern selects no parameter of the model.
    #[error("the {which} pattern `{pattern}` matches no parameter; parameter names look like `{example}`")]
    PatternMatchesNothing {
        which: &'static str,
        pattern: String,
        example: String,
    },

    /// A parameter's shape differs from the one in the saved state.
    #[error("parameter `{name}` has shape {found:?} but the saved state has {expected:?}; the state belongs to a different model configuration")]
    ShapeChanged {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    /// A gradient holds NaN or infinity; no parameter was updated in this step.
    #[error("non-finite gradient (NaN or Inf) in parameter `{name}`; no parameter was updated (lower the learning rate or enable clipping)")]
    NonFiniteGradient { name: String },

    /// The parameter or gradient is not stored in a form the optimizer handles.
    #[error("parameter `{name}`: {reason}")]
    UnsupportedTensor { name: String, reason: String },

    /// A saved optimizer state does not fit the model or the configuration.
    #[error("optimizer state does not match the model: {0}")]
    StateMismatch(String),

    /// A saved optimizer state could not be read or written.
    #[error("optimizer state file `{path}`: {reason}")]
    StateFile { path: String, reason: String },

    /// The SVD used to choose a subspace failed.
    #[error("SVD of the gradient of `{name}` did not converge")]
    SvdFailed { name: String },

    /// A step taken in parts (`begin_step`, `step_part`, `finish_step`) was misused.
    #[error("step taken in parts: {0}")]
    StepInParts(String),

    /// An error from candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn setting(field: &str, reason: impl Into<String>) -> Self {
        Error::InvalidSetting {
            field: field.to_string(),
            reason: reason.into(),
        }
    }
}
