//! Where the element-wise work of a step runs. [`cpu`]: fused passes over f32 storage on the CPU.
//! `tensor`: the same updates as candle tensor operations, for parameters on other devices.

pub mod cpu;
pub(crate) mod tensor;
