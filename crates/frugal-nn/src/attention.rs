//! How the models compute attention on the CPU.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// How a model computes attention on the CPU (elsewhere both run the same tensor operations,
/// those of [`Attention::Whole`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Attention {
    /// One operation over blocks of query rows, which keeps no t × t tensor of f32 for the
    /// backward pass ([`crate::ops::causal_attention`], [`crate::ops::padded_attention`]).
    #[default]
    Fused,
    /// The whole scores, the softmax and the product with the values as three operations,
    /// which keep the scores and the probabilities ([`crate::ops::whole_causal_attention`],
    /// [`crate::ops::whole_padded_attention`]).
    Whole,
}

impl FromStr for Attention {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "fused" => Ok(Self::Fused),
            "whole" => Ok(Self::Whole),
            _ => Err(format!("unknown attention `{s}`: use fused or whole")),
        }
    }
}

impl fmt::Display for Attention {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Fused => "fused",
            Self::Whole => "whole",
        })
    }
}
