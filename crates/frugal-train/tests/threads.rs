//! The worker pool of a training process (its own test binary: the pool sets an environment
//! variable, which no other test may read at the same time).

use frugal_train::threads::{in_pool, CpuSettings};

/// `threads` worker threads, the default library.
fn threads(threads: usize) -> CpuSettings {
    CpuSettings {
        threads: Some(threads),
        ..Default::default()
    }
}

#[test]
fn work_runs_on_a_pool_of_the_given_size_and_zero_threads_is_refused() {
    let (size, on_worker) = in_pool(threads(3), 1, || {
        Ok((
            rayon::current_num_threads(),
            rayon::current_thread_index().is_some(),
        ))
    })
    .unwrap();
    assert_eq!((size, on_worker), (3, true));
    let err = in_pool(threads(0), 1, || Ok(())).unwrap_err();
    assert!(err.to_string().contains("at least 1"), "{err}");
}
