//! The LLaMA model: configurations and the differentiable decoder.

pub mod config;
pub mod llama;
pub mod ops;

pub use config::LlamaConfig;
pub use llama::Llama;
