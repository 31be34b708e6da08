//! tch-sys links libtorch but gives the final binaries no rpath; add one so `cairn`, the
//! tests and the examples run without LD_LIBRARY_PATH (see LIBTORCH notes in the README).
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    }
}
