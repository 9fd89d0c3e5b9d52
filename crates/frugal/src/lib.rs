//! FRUGAL: full-rank updates with gradient splitting, over candle tensors.
//!
//! The optimizer is a composition: a parameter classifier ([`params`]) routes each tensor either
//! to the state-full rule on the whole tensor, or to a projection ([`projection`]) that splits its
//! gradient into a low-dimensional part updated by a state-full rule and a residual updated by a
//! state-free rule ([`rules`]). The element-wise work of a step runs as one fused pass per tensor
//! ([`kernels`]). Presets reproduce AdamW, GaLore, BAdam, signSGD, SGD and FRUGAL ([`config`]).
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
pub mod kernels;
pub mod memory;
pub mod optimizer;
pub mod params;
pub mod projection;
pub mod rules;

pub use config::OptimizerConfig;
pub use error::{Error, Result};
pub use memory::StateBytes;
pub use optimizer::{Frugal, ParamStateView};
pub use params::{ParamClass, ParamInfo};
