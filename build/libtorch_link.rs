// Shared by the build scripts of every package whose binaries or tests link libtorch
// (through `tch`). Included with `include!` so each package's build.rs stays one line.
//
// 1. Embeds an rpath to libtorch's lib directory, so built binaries start without the
//    user exporting LD_LIBRARY_PATH.
// 2. On CUDA builds of libtorch, links libtorch_cuda with `--no-as-needed`: otherwise the
//    linker drops it (no symbol is referenced directly) and `tch::Cuda::is_available()`
//    is false on GPU nodes (tch-rs issues 907, 980). The CUDA wheel still starts on
//    machines without a GPU or driver; CUDA then simply reports no devices.
//
// `link_libtorch_for(&["tests", "benches"])` applies the link arguments to those targets
// only (the coordinator: its tests run workers in process, its `dmqsm` binary must not
// load libtorch); `link_libtorch()` applies them to every target.
#[allow(dead_code)]
fn link_libtorch() {
    link_libtorch_for(&[""]);
}

fn link_libtorch_for(targets: &[&str]) {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    let Ok(libtorch) = std::env::var("LIBTORCH") else {
        println!("cargo:warning=LIBTORCH is not set; run scripts/setup.sh");
        return;
    };
    let root = std::path::PathBuf::from(&libtorch);
    let root = root.canonicalize().unwrap_or(root);
    let lib = root.join("lib");
    let cuda = lib.join("libtorch_cuda.so").exists();
    if cuda {
        println!("cargo:rustc-link-search=native={}", lib.display());
    }
    for target in targets {
        let key = if target.is_empty() {
            "rustc-link-arg".to_string()
        } else {
            format!("rustc-link-arg-{target}")
        };
        println!("cargo:{key}=-Wl,-rpath,{}", lib.display());
        if cuda {
            println!("cargo:{key}=-Wl,--no-as-needed");
            println!("cargo:{key}=-ltorch_cuda");
            println!("cargo:{key}=-Wl,--as-needed");
        }
    }
}
