//! AVX-512 kernels of the encoder latent ([`super::vae`]): the first layer's sparse rows
//! with 128 outputs (8 zmm accumulators) per panel, so that each non-zero count is read
//! once per 128 outputs instead of twice (the AVX2 kernel holds 64), with half the
//! instructions per output; and the count pass (`log1p` of the stored counts by table).
//!
//! Compiled with rustc >= 1.89 (`cfg(scannot_avx512)`), used where the CPU has AVX-512
//! F/DQ/VL (`simd::avx512()`); tested against the portable and AVX2 kernels and the plain
//! f64 encoder in `vae.rs`.
#![cfg(all(target_arch = "x86_64", scannot_avx512))]
#![allow(clippy::incompatible_msrv)]

use std::arch::x86_64::*;

/// `y[..16 NV] += sum_k val_k * w[idx_k * stride..][..16 NV]` over the leading non-zeros
/// with `idx_k < limit` (and a row inside `w`); returns how many that is. The `16 NV`
/// outputs stay in registers while the non-zeros stream by.
///
/// # Safety
/// The CPU must have AVX-512 F.
#[target_feature(enable = "avx512f,avx2,fma")]
pub(super) unsafe fn rows<const NV: usize>(
    y: &mut [f32],
    w: &[f32],
    stride: usize,
    idx: &[u32],
    val: &[f32],
    limit: u32,
) -> usize {
    assert!(y.len() >= 16 * NV && stride >= 16 * NV);
    let n_rows = if w.len() >= 16 * NV {
        (w.len() - 16 * NV) / stride + 1
    } else {
        0
    };
    let lim = n_rows.min(limit as usize);
    let (yp, wp) = (y.as_mut_ptr(), w.as_ptr());
    // SAFETY (all pointer accesses): y holds 16 NV values (asserted); for a row g < n_rows,
    // g * stride + 16 NV <= w.len()
    let mut acc = [_mm512_setzero_ps(); NV];
    for (v, a) in acc.iter_mut().enumerate() {
        *a = unsafe { _mm512_loadu_ps(yp.add(16 * v)) };
    }
    let m = idx.len().min(val.len());
    let mut k = 0;
    while k < m {
        let g = idx[k] as usize;
        if g >= lim {
            break;
        }
        let row = unsafe { wp.add(g * stride) };
        let b = _mm512_set1_ps(val[k]);
        for (v, a) in acc.iter_mut().enumerate() {
            *a = _mm512_fmadd_ps(b, unsafe { _mm512_loadu_ps(row.add(16 * v)) }, *a);
        }
        k += 1;
    }
    for (v, a) in acc.iter().enumerate() {
        unsafe { _mm512_storeu_ps(yp.add(16 * v), *a) };
    }
    k
}

/// One column panel of up to 128 outputs (`width` a multiple of 16): [`rows`] with the
/// matching number of registers.
///
/// # Safety
/// The CPU must have AVX-512 F.
#[target_feature(enable = "avx512f,avx2,fma")]
pub(super) unsafe fn panel(
    y: &mut [f32],
    w: &[f32],
    stride: usize,
    width: usize,
    idx: &[u32],
    val: &[f32],
    limit: u32,
) -> usize {
    unsafe {
        match width / 16 {
            8 => rows::<8>(y, w, stride, idx, val, limit),
            7 => rows::<7>(y, w, stride, idx, val, limit),
            6 => rows::<6>(y, w, stride, idx, val, limit),
            5 => rows::<5>(y, w, stride, idx, val, limit),
            4 => rows::<4>(y, w, stride, idx, val, limit),
            3 => rows::<3>(y, w, stride, idx, val, limit),
            2 => rows::<2>(y, w, stride, idx, val, limit),
            _ => rows::<1>(y, w, stride, idx, val, limit),
        }
    }
}

/// One gene chunk of the first layer for every cell of a block, when the layer's outputs
/// fit one panel (`width = 16 NV <= 128`, `w` row-major with rows of `width`): cell `k`'s
/// non-zeros (packed: gene in the low 32 bits, value bits in the high 32) from `cursor[k]`
/// up to `ends[k]` with a gene below `limit` are added to
/// `acc[k * width..][..width]`, and `cursor[k]` moves past them.
///
/// # Safety
/// The CPU must have AVX-512 F.
#[target_feature(enable = "avx512f,avx2,fma")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn chunk_cells<const NV: usize>(
    acc: &mut [f32],
    w: &[f32],
    pk: &[u64],
    cursor: &mut [usize],
    ends: &[usize],
    limit: u32,
) {
    let width = 16 * NV;
    let n = cursor.len().min(ends.len());
    assert!(acc.len() >= n * width);
    let m = pk.len();
    // rows below `lim` lie inside `w`
    let lim = (w.len() / width).min(limit as usize);
    let (pp, wp) = (pk.as_ptr(), w.as_ptr());
    for (k, c) in cursor.iter_mut().enumerate().take(n) {
        let end = ends[k].min(m);
        let yp = unsafe { acc.as_mut_ptr().add(k * width) };
        // SAFETY (all pointer accesses): acc holds n * width values (asserted); q < end
        // <= m entries of pk; a row g < lim has g * width + width <= w.len()
        let mut a = [_mm512_setzero_ps(); NV];
        for (v, r) in a.iter_mut().enumerate() {
            *r = unsafe { _mm512_loadu_ps(yp.add(16 * v)) };
        }
        let mut q = *c;
        while q < end {
            // one load for the gene (low half) and the value (high half)
            let e = unsafe { *pp.add(q) };
            let g = e as u32 as usize;
            if g >= lim {
                break;
            }
            let row = unsafe { wp.add(g * width) };
            let b = _mm512_set1_ps(f32::from_bits((e >> 32) as u32));
            for (v, r) in a.iter_mut().enumerate() {
                *r = _mm512_fmadd_ps(b, unsafe { _mm512_loadu_ps(row.add(16 * v)) }, *r);
            }
            q += 1;
        }
        for (v, r) in a.iter().enumerate() {
            unsafe { _mm512_storeu_ps(yp.add(16 * v), *r) };
        }
        *c = q;
    }
}

/// [`chunk_cells`] for `width` (a multiple of 16 up to 128) outputs.
///
/// # Safety
/// The CPU must have AVX-512 F.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn chunk(
    acc: &mut [f32],
    w: &[f32],
    width: usize,
    pk: &[u64],
    cursor: &mut [usize],
    ends: &[usize],
    limit: u32,
) {
    unsafe {
        match width / 16 {
            8 => chunk_cells::<8>(acc, w, pk, cursor, ends, limit),
            7 => chunk_cells::<7>(acc, w, pk, cursor, ends, limit),
            6 => chunk_cells::<6>(acc, w, pk, cursor, ends, limit),
            5 => chunk_cells::<5>(acc, w, pk, cursor, ends, limit),
            4 => chunk_cells::<4>(acc, w, pk, cursor, ends, limit),
            3 => chunk_cells::<3>(acc, w, pk, cursor, ends, limit),
            2 => chunk_cells::<2>(acc, w, pk, cursor, ends, limit),
            _ => chunk_cells::<1>(acc, w, pk, cursor, ends, limit),
        }
    }
}

/// Transformed non-zeros of one CSC column appended to `out` as packed entries (gene in the
/// low 32 bits, value bits in the high 32; capacity reserved by the caller, `len` entries
/// written so far; returns the new length), 16 values
/// at a time: whole counts in `1..64` at increasing, in-range rows take the table by two
/// register permutes, other whole counts below `table.len()` a gather; any other group of
/// 16 goes through `scalar` (row, value, previous row), which sets the flags and returns the
/// transformed value of a non-zero. `prev`: the row before the column (-1). Gives exactly
/// the non-zeros and values of the scalar pass.
///
/// # Safety
/// The CPU must have AVX-512 F/DQ/VL; `out` must have room for `len + rows.len()` entries.
#[target_feature(enable = "avx512f,avx512dq,avx512vl,avx2,fma")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn csc_col(
    rows: &[i32],
    xs: &[f64],
    table: &[f32],
    n_genes: u32,
    out: *mut u64,
    mut len: usize,
    mut prev: i32,
    scalar: &mut impl FnMut(i32, f64, &mut i32) -> Option<f32>,
) -> usize {
    assert!(table.len() >= 64);
    let n = rows.len().min(xs.len());
    let tl = table.len().min(i32::MAX as usize) as i32;
    // SAFETY: table holds at least 64 values (asserted)
    let (t0, t1, t2, t3) = unsafe {
        let tp = table.as_ptr();
        (
            _mm512_loadu_ps(tp),
            _mm512_loadu_ps(tp.add(16)),
            _mm512_loadu_ps(tp.add(32)),
            _mm512_loadu_ps(tp.add(48)),
        )
    };
    let one = _mm512_set1_epi32(1);
    let ngv = _mm512_set1_epi32(n_genes.min(i32::MAX as u32) as i32);
    let top = _mm512_set1_epi32(tl - 1);
    let small = _mm512_set1_epi32(64);
    let bit5 = _mm512_set1_epi32(32);
    // lanes 0..7 / 8..15 of the rows interleaved with those of the values
    let lo_half = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    let hi_half = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    let mut k = 0;
    // SAFETY (all pointer accesses): k + 16 <= n values in both input slices; the writes go
    // to the room the caller reserved (one entry per input at most); the gather reads
    // table[1..table.len()) only (the lanes are checked first)
    while k + 16 <= n {
        let x0 = unsafe { _mm512_loadu_pd(xs.as_ptr().add(k)) };
        let x1 = unsafe { _mm512_loadu_pd(xs.as_ptr().add(k + 8)) };
        let (k0, k1) = (_mm512_cvttpd_epi32(x0), _mm512_cvttpd_epi32(x1));
        let whole = (_mm512_cmp_pd_mask::<_CMP_EQ_OQ>(_mm512_cvtepi32_pd(k0), x0) as u16)
            | ((_mm512_cmp_pd_mask::<_CMP_EQ_OQ>(_mm512_cvtepi32_pd(k1), x1) as u16) << 8);
        let kv = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(k0), k1);
        let gv = unsafe { _mm512_loadu_si512(rows.as_ptr().add(k) as *const __m512i) };
        // the row before each lane: prev, then rows k..k+15
        let before = _mm512_alignr_epi32::<15>(gv, _mm512_set1_epi32(prev));
        let km1 = _mm512_sub_epi32(kv, one);
        // whole counts 1..table.len(), rows in 0..n_genes (unsigned: no negative), increasing
        let ok = whole
            & _mm512_cmplt_epu32_mask(km1, top)
            & _mm512_cmplt_epu32_mask(gv, ngv)
            & _mm512_cmpgt_epi32_mask(gv, before);
        if ok == 0xffff {
            let t = if _mm512_cmplt_epu32_mask(kv, small) == 0xffff {
                // counts 1..64: entries 0..31 and 32..63 by two permutes, picked by bit 5
                let lo = _mm512_permutex2var_ps(t0, kv, t1);
                let hi = _mm512_permutex2var_ps(t2, kv, t3);
                _mm512_mask_blend_ps(_mm512_test_epi32_mask(kv, bit5), lo, hi)
            } else {
                unsafe { _mm512_i32gather_ps::<4>(kv, table.as_ptr()) }
            };
            let tv = _mm512_castps_si512(t);
            unsafe {
                _mm512_storeu_si512(
                    out.add(len) as *mut __m512i,
                    _mm512_permutex2var_epi32(gv, lo_half, tv),
                );
                _mm512_storeu_si512(
                    out.add(len + 8) as *mut __m512i,
                    _mm512_permutex2var_epi32(gv, hi_half, tv),
                );
            }
            len += 16;
            prev = rows[k + 15];
        } else {
            for q in k..k + 16 {
                if let Some(t) = scalar(rows[q], xs[q], &mut prev) {
                    unsafe { *out.add(len) = rows[q] as u32 as u64 | (t.to_bits() as u64) << 32 };
                    len += 1;
                }
            }
        }
        k += 16;
    }
    for q in k..n {
        if let Some(t) = scalar(rows[q], xs[q], &mut prev) {
            unsafe { *out.add(len) = rows[q] as u32 as u64 | (t.to_bits() as u64) << 32 };
            len += 1;
        }
    }
    len
}
