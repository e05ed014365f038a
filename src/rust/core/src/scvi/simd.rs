//! Run-time CPU feature checks for the f32 kernels of the scVI code (AVX2 + FMA paths with
//! portable fallbacks).

/// Whether the CPU has AVX2 and FMA (the detection macro caches its answer).
#[cfg(target_arch = "x86_64")]
#[inline]
pub fn avx2_fma() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

#[cfg(not(target_arch = "x86_64"))]
#[inline]
pub fn avx2_fma() -> bool {
    false
}

/// Whether the CPU has the AVX-512 subsets the f32 kernels use (F, DQ, VL; implies AVX2 and
/// FMA). Only compiled with rustc >= 1.89 (where the AVX-512 intrinsics are stable; see
/// `build.rs`).
#[cfg(all(target_arch = "x86_64", scannot_avx512))]
#[inline]
pub fn avx512() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512dq")
        && std::arch::is_x86_feature_detected!("avx512vl")
        && avx2_fma()
}
