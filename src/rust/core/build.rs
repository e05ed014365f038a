//! Emits `cfg(scannot_avx512)` when the compiler has the AVX-512 intrinsics of
//! `std::arch::x86_64` as stable (rustc >= 1.89), so that the AVX-512 kernels are compiled
//! there and the crate still builds with older compilers (AVX2 and portable paths only).
use std::process::Command;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(scannot_avx512)");
    println!("cargo:rerun-if-env-changed=RUSTC");
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let minor = Command::new(rustc)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|v| {
            // "rustc 1.95.0 (...)"
            let ver = v.split_whitespace().nth(1)?.to_string();
            let mut it = ver.split('.');
            let major: u32 = it.next()?.parse().ok()?;
            let minor: u32 = it.next()?.parse().ok()?;
            Some((major, minor))
        });
    if let Some((major, minor)) = minor {
        if major > 1 || minor >= 89 {
            println!("cargo:rustc-cfg=scannot_avx512");
        }
    }
}
