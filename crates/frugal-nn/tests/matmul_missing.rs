//! A missing OpenBLAS: `openblas` fails naming the fix, `auto` falls back to gemm.

use frugal_nn::matmul::{library, use_library, MatmulLibrary};

#[test]
fn a_missing_openblas_is_an_error_that_names_the_fix_and_auto_falls_back() {
    // The only test of this binary: the variable is read once, on first use.
    std::env::set_var("FRUGAL_OPENBLAS", "/nonexistent/libopenblas.so.0");
    let err = use_library(MatmulLibrary::Openblas)
        .unwrap_err()
        .to_string();
    for needle in [
        "/nonexistent/libopenblas.so.0",
        "apt-get install",
        "--matmul gemm",
    ] {
        assert!(err.contains(needle), "{needle:?} not in: {err}");
    }
    use_library(MatmulLibrary::Auto).unwrap();
    assert!(library().starts_with("gemm"), "{}", library());
    assert_eq!("openblas".parse(), Ok(MatmulLibrary::Openblas));
    let unknown = "mkl".parse::<MatmulLibrary>().unwrap_err();
    assert!(unknown.contains("auto, gemm or openblas"), "{unknown}");
}
