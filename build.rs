//! Link-time settings for libtorch.
//!
//! - rpath to the libtorch the build used (PyPI torch in `.venv`), so the binary runs without
//!   `LD_LIBRARY_PATH`.
//! - `--no-as-needed` so that `libtorch_cuda.so` stays a DT_NEEDED entry even though no Rust
//!   symbol references it: without it a CUDA libtorch silently loses its CUDA backend.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
        let cuda = std::path::Path::new(&lib).join("libtorch_cuda.so");
        if cuda.exists() {
            println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
            println!("cargo:rustc-link-arg=-L{lib}");
            println!("cargo:rustc-link-arg=-ltorch_cuda");
            println!("cargo:rustc-link-arg=-Wl,--as-needed");
        }
    }
}
