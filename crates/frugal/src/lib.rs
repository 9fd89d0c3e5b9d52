//! FRUGAL: full-rank updates with gradient splitting, over candle tensors.
//!
//! The optimizer is a composition: labels ([`labels`]) route each parameter either to the
//! state-full rule on the whole tensor, or to a projection ([`projection`]) that splits its
//! gradient into a low-dimensional part updated by a state-full rule and a residual updated by a
//! state-free rule ([`rules`]). The element-wise work of a step runs as one fused pass per tensor
//! on the CPU, or as candle tensor operations on the parameters' device, a GPU, with the state
//! there too ([`kernels`], [`Engine`]). Presets reproduce AdamW, GaLore, BAdam, signSGD, SGD and FRUGAL ([`config`]),
//! and the relatives Fira and APOLLO / APOLLO-Mini, whose state-free part is the residual or the
//! gradient scaled by the state-full rule's norm ratio ([`rules::scaled`]).
//! The optimizer knows no model: the caller labels the parameters (the `frugal-nn` crate has
//! labels for LLaMA and BERT/RoBERTa names), or 2-D weights are projectable and the rest
//! state-full.
//!
//! ```no_run
//! use candle_nn::{Optimizer, VarMap};
//! use frugal::{Frugal, OptimizerConfig};
//! # fn run(varmap: VarMap, loss: candle_core::Tensor) -> frugal::Result<()> {
//! let mut opt = Frugal::from_varmap(&varmap, OptimizerConfig::preset("frugal")?)?;
//! opt.set_learning_rate(1e-3);
//! opt.backward_step(&loss)?;
//! # Ok(()) }
//! ```

pub mod checkpoint;
pub mod config;
pub mod error;
pub mod fs;
pub mod kernels;
pub mod labels;
pub mod memory;
mod on_device;
pub mod optimizer;
pub mod projection;
pub mod quant;
mod refresh;
pub mod rules;
pub mod sharding;
pub mod update_gap;

pub use config::OptimizerConfig;
pub use error::{Error, Result};
pub use labels::{Label, Param, ParamInfo, ParamShape, Role};
pub use memory::StateBytes;
pub use on_device::Engine;
pub use optimizer::{Frugal, ParamStateView};
pub use sharding::ShardPlan;
