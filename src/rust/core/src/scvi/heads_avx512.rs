//! The decoder heads' forward GEMM, `logits (rows x width) = h (rows x k) W^T`, with the frozen
//! head weights packed once ([`pack`]): blocks of 32 outputs, `[block][k][32]`. A general GEMM
//! (faer) packs `W` on every call, i.e. once per minibatch and thread, which cost about as
//! much as a sixth of the head GEMM time on 2 threads; this kernel reads the packed blocks
//! directly. Each 32-output block (16 KB at k = 128) is used for all rows while it sits in the
//! L1 cache; 8 rows x 32 outputs accumulate in 16 registers.
//!
//! Compiled with rustc >= 1.89 (`cfg(scannot_avx512)`), used where the CPU has AVX-512 F;
//! tested against a plain product in `train_tests.rs`.
#![cfg(all(target_arch = "x86_64", scannot_avx512))]
#![allow(clippy::incompatible_msrv)]

use std::arch::x86_64::*;

/// Outputs per block (two 16-lane registers).
const NB: usize = 32;
/// Rows per register tile.
const MR: usize = 8;

/// Packs `w` (`width x k`, row-major: torch's Linear layout) as `[block][k][32]`, the last
/// block padded with zeros.
pub(crate) fn pack(w: &[f32], width: usize, k: usize) -> Vec<f32> {
    let nblk = width.div_ceil(NB);
    let mut p = vec![0.0f32; nblk * k * NB];
    for (o, row) in w.chunks_exact(k).take(width).enumerate() {
        let (b, lane) = (o / NB, o % NB);
        for (kk, &v) in row.iter().enumerate() {
            p[(b * k + kk) * NB + lane] = v;
        }
    }
    p
}

/// `out (rows x width) = h (rows x k) W^T` with `wp = pack(W, width, k)`.
///
/// # Safety
/// The CPU must have AVX-512 F.
#[target_feature(enable = "avx512f,avx2,fma")]
pub(crate) unsafe fn forward(
    h: &[f32],
    rows: usize,
    k: usize,
    wp: &[f32],
    width: usize,
    out: &mut [f32],
) {
    let nblk = width.div_ceil(NB);
    assert!(h.len() >= rows * k && out.len() >= rows * width && wp.len() >= nblk * k * NB);
    for b in 0..nblk {
        let g0 = b * NB;
        let lanes = (width - g0).min(NB);
        // store masks of the two registers (a partial last block)
        let m0: __mmask16 = if lanes >= 16 {
            0xffff
        } else {
            (1u16 << lanes) - 1
        };
        let m1: __mmask16 = if lanes >= 32 {
            0xffff
        } else if lanes > 16 {
            (1u16 << (lanes - 16)) - 1
        } else {
            0
        };
        let wb = wp.as_ptr().add(b * k * NB);
        let mut r0 = 0;
        while r0 < rows {
            let mr = (rows - r0).min(MR);
            let hp = h.as_ptr().add(r0 * k);
            let op = out.as_mut_ptr().add(r0 * width + g0);
            match mr {
                8 => tile::<8>(hp, k, wb, op, width, m0, m1),
                7 => tile::<7>(hp, k, wb, op, width, m0, m1),
                6 => tile::<6>(hp, k, wb, op, width, m0, m1),
                5 => tile::<5>(hp, k, wb, op, width, m0, m1),
                4 => tile::<4>(hp, k, wb, op, width, m0, m1),
                3 => tile::<3>(hp, k, wb, op, width, m0, m1),
                2 => tile::<2>(hp, k, wb, op, width, m0, m1),
                _ => tile::<1>(hp, k, wb, op, width, m0, m1),
            }
            r0 += mr;
        }
    }
}

/// `R` rows x 32 outputs: `out[r][0..32] = sum_kk h[r][kk] wb[kk][0..32]` (masked stores).
#[target_feature(enable = "avx512f,avx2,fma")]
#[inline]
unsafe fn tile<const R: usize>(
    h: *const f32,
    k: usize,
    wb: *const f32,
    out: *mut f32,
    width: usize,
    m0: __mmask16,
    m1: __mmask16,
) {
    let mut a0 = [_mm512_setzero_ps(); R];
    let mut a1 = [_mm512_setzero_ps(); R];
    for kk in 0..k {
        let w0 = _mm512_loadu_ps(wb.add(kk * NB));
        let w1 = _mm512_loadu_ps(wb.add(kk * NB + 16));
        for r in 0..R {
            let x = _mm512_set1_ps(*h.add(r * k + kk));
            a0[r] = _mm512_fmadd_ps(x, w0, a0[r]);
            a1[r] = _mm512_fmadd_ps(x, w1, a1[r]);
        }
    }
    for r in 0..R {
        _mm512_mask_storeu_ps(out.add(r * width), m0, a0[r]);
        if m1 != 0 {
            _mm512_mask_storeu_ps(out.add(r * width + 16), m1, a1[r]);
        }
    }
}
