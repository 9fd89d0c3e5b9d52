//! The optimizer on a CUDA GPU against the fused CPU engine. Built with `--features cuda` and
//! run on a GPU machine (`scripts/gpu-check.sh` carries and runs this test binary); without a
//! GPU it says so and checks nothing.
#![cfg(feature = "cuda")]

mod common;

use candle_core::Device;
use common::{engine_config, engine_specs, max_diff, run_on};
use frugal::Engine;

#[test]
fn every_preset_and_projection_steps_on_the_gpu_as_on_the_cpu() {
    let gpu = match Device::new_cuda(0) {
        Ok(gpu) => gpu,
        Err(e) => {
            eprintln!("no CUDA device ({e}): nothing checked");
            return;
        }
    };
    for spec in engine_specs() {
        let c = engine_config(&spec);
        let (cpu_opt, cpu) = run_on(&c, 8, &Device::Cpu, Engine::Fused);
        let (gpu_opt, on_gpu) = run_on(&c, 8, &gpu, Engine::Tensors);
        let d = max_diff(&cpu, &on_gpu);
        println!("{spec}: largest difference {d:.2e}");
        assert!(d < 1e-5, "{spec}: parameters differ by {d}");
        assert_eq!(cpu_opt.state_bytes(), gpu_opt.state_bytes(), "{spec}");
        // The GPU's state saves and resumes on the CPU.
        let path =
            std::env::temp_dir().join(format!("frugal-cuda-{}.safetensors", std::process::id()));
        gpu_opt.save_state(&path).unwrap();
        let (mut back, _) = run_on(&c, 0, &Device::Cpu, Engine::Fused);
        back.load_state(&path).unwrap();
        assert_eq!(back.steps_done(), 8);
        assert_eq!(back.state_bytes(), cpu_opt.state_bytes(), "{spec}");
        std::fs::remove_file(&path).unwrap();
    }
}
