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
