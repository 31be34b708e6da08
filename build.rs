//! tch-sys links libtorch but gives the final binaries no rpath; add one so `cairn`, the
//! tests and the examples run without LD_LIBRARY_PATH (see LIBTORCH notes in the README).
//!
//! `cairn` itself is linked as a position-dependent executable, as Go links its
//! binaries by default: as a PIE, the loader applies ~120,000 relocations to ~2.3 MB of
//! tables at every start, 1.4 ms of each command's ~2.7 ms floor (measured with
//! `perf stat cairn --version`; a no-op rerun is ~10 ms in all). Libraries, heap and
//! stack are still placed at random; only the executable's own image is not.
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    }
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        println!("cargo:rustc-link-arg-bin=cairn=-no-pie");
    }
}
