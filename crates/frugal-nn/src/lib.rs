//! Differentiable operations and models over candle tensors, and the parameter labels the FRUGAL
//! optimizer routes by.
//!
//! - [`ops`]: fused CPU operations with their own backward passes (attention, cross-entropy,
//!   causal softmax, RMSNorm, LayerNorm, softmax over unpadded keys), and their twins from
//!   candle operations for other devices and dtypes ([`ops::generic`]).
//! - [`Attention`]: how the models compute attention on the CPU (fused, or whole).
//! - [`chunked_loss`]: cross-entropy of a linear head in chunks of tokens (and vocabulary),
//!   without the whole logits.
//! - [`llama`]: the LLaMA decoder (Hugging Face names and layout) and its configurations.
//! - [`encoder`]: BERT and RoBERTa encoders loaded from Hugging Face folders, and a sequence
//!   classifier on top.
//! - [`step_memory`]: the planned memory of a training step (activations, gradients, working
//!   set) in each memory mode, for both models.
//! - [`dropout`]: dropout masks from a seeded stream.
//! - [`hf`]: reading Hugging Face model folders (config, single or sharded safetensors).
//! - [`labels`]: labels for LLaMA and BERT/RoBERTa parameter names.
//! - [`init`]: the seeded initialisation stream.
//!
//! ```no_run
//! use candle_core::{DType, Device};
//! use frugal::{Frugal, OptimizerConfig};
//! use frugal_nn::llama::{Llama, LlamaConfig};
//! # fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let config = LlamaConfig::builtin("tiny").expect("built-in");
//! let model = Llama::init(&config, 0, &Device::Cpu, DType::F32)?;
//! let opt = Frugal::from_params(model.params(), OptimizerConfig::preset("frugal")?)?;
//! # Ok(()) }
//! ```

mod attention;
pub mod chunked_loss;
pub mod dropout;
pub mod encoder;
pub mod error;
pub mod hf;
pub mod init;
pub mod labels;
mod layered;
pub mod llama;
pub mod lora;
pub mod matmul;
pub mod ops;
pub mod step_memory;

pub use attention::Attention;
pub use error::{Error, Result};
pub use step_memory::{Kernels, StepMemory, StepMode};
