//! Where the element-wise work of a step runs. [`cpu`]: fused passes over f32 storage on the CPU
//! (the only backend so far; the optimizer checks at construction that its parameters live there).

pub mod cpu;
