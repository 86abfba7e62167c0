//! Compiles the sockmap path's BPF program (bpf/sockmap.c) with clang into OUT_DIR, where
//! src/sockmap.rs embeds it. Without clang the crate still builds: the embedded program is empty
//! and the proxy reports the sockmap path unavailable at run time (and runs splice).

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let src = "bpf/sockmap.c";
    println!("cargo:rerun-if-changed={src}");
    println!("cargo:rerun-if-env-changed=CLANG");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let obj = out.join("sockmap.bpf.o");
    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".into());
    let built = Command::new(&clang)
        .args(["-O2", "-g", "-target", "bpf", "-c", src, "-o"])
        .arg(&obj)
        .status();
    match built {
        Ok(s) if s.success() => {}
        Ok(s) => {
            println!("cargo:warning={clang} failed ({s}) on {src}; the proxy's sockmap path is unavailable");
            std::fs::write(&obj, b"").expect("write the empty BPF object");
        }
        Err(e) => {
            println!("cargo:warning=cannot run {clang} ({e}): the proxy's sockmap path is unavailable; scripts/setup installs clang");
            std::fs::write(&obj, b"").expect("write the empty BPF object");
        }
    }
}
