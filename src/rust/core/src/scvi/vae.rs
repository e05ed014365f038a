//! The scVI encoder in eval mode: the latent mean `qz.loc` (and variance) exactly as
//! scvi-tools' `get_latent_representation()` computes it.
//!
//! Per cell: `log1p(x)` (if `log_variational`) → [continuous covariates if
//! `encode_covariates`] → FCLayers (each layer: Linear on `[h, onehot(batch), onehot(cat_1)...]`
//! (covariates at layer 0 always, at later layers only with `deeply_inject_covariates`),
//! BatchNorm1d with running statistics (eps 1e-3), LayerNorm without affine (eps 1e-5), ReLU;
//! dropout is off in eval) → `mean_encoder` (latent mean) and `exp(var_encoder) + 1e-4`.
//! Categorical covariates with at most one category have no one-hot columns. The default SCVI
//! (`encode_covariates = False`) encoder sees no covariate at all.
//!
//! The products with the weights run in f32 (as torch), the bias, covariate, norm and
//! activation steps in f64. Cells are processed in parallel blocks (rayon; use
//! [`crate::threads::with_threads`]); within a block the first layer is a sparse x dense
//! product that walks only the non-zero counts, gene chunk by gene chunk so that a
//! cache-sized piece of the weights (column panels stored one after the other) serves every
//! cell of the block, with an AVX2 kernel that keeps 64 outputs in registers, or with
//! AVX-512 (rustc >= 1.89, [`super::latent_avx512`]) 128 outputs in one pass over a cell's
//! non-zeros (portable fallback). The count checks and the `log1p` transform are one pass
//! over the block's values.

use super::model_file::{ScviModelFile, Tensor};
use crate::error::{ScError, ScResult};
use crate::matrix::ExprMatrix;
use rayon::prelude::*;

const BN_EPS: f64 = 1e-3;
const LN_EPS: f64 = 1e-5;
const VAR_EPS: f64 = 1e-4;
/// counts below this (whole numbers) take their transform from a table
const LOG_TABLE: usize = 4096;
/// outputs per weight panel of the blocked first layer (the register block of the kernel)
pub(crate) const PANEL: usize = 32;
/// genes per chunk of the blocked first layer: a 64-output panel of 128 weight rows is 32
/// KiB, contiguous (L1 / L2; 128 measured best among 64..1024)
const GENE_CHUNK: usize = 128;

/// Genes per chunk of the first layer with the 128-wide AVX-512 panels (64 KB of weights,
/// L2-resident: measured faster than L1-sized chunks, whose per-cell overhead, the loop
/// exit and the accumulator loads, outweighs the L1 hits).
const WIDE_CHUNK: usize = 128;
/// cells encoded together within a parallel work unit: their non-zeros (~300 KiB at 4,000
/// genes and 30 % density) stay in L2 while the gene chunks pass over them
const SUB_BLOCK: usize = 64;

/// A Linear layer stored transposed (`in x out`, row-major) so that one input feature adds a
/// contiguous row to the output.
#[derive(Debug, Clone)]
struct Linear {
    n_in: usize,
    n_out: usize,
    wt: Vec<f64>,
    b: Vec<f64>,
}

impl Linear {
    fn from_tensors(w: &Tensor, b: &Tensor, name: &str) -> ScResult<Self> {
        let (n_out, n_in) = match w.shape[..] {
            [o, i] => (o, i),
            _ => {
                return Err(ScError::Dims(format!(
                    "{name}.weight has shape {:?}; a Linear weight is 2-D",
                    w.shape
                )))
            }
        };
        if b.shape != [n_out] {
            return Err(ScError::Dims(format!(
                "{name}.bias has shape {:?}, expected [{n_out}]",
                b.shape
            )));
        }
        let wv = w.to_f64().ok_or_else(|| not_float(name))?;
        let mut wt = vec![0.0; n_in * n_out];
        for o in 0..n_out {
            for i in 0..n_in {
                wt[i * n_out + o] = wv[o * n_in + i];
            }
        }
        Ok(Linear {
            n_in,
            n_out,
            wt,
            b: b.to_f64().ok_or_else(|| not_float(name))?,
        })
    }

    #[inline]
    fn row(&self, i: usize) -> &[f64] {
        &self.wt[i * self.n_out..(i + 1) * self.n_out]
    }
}

#[inline(always)]
fn axpy(out: &mut [f64], a: f64, row: &[f64]) {
    for (o, r) in out.iter_mut().zip(row) {
        *o += a * r;
    }
}

/// `sum_i f(x_i)` over 8 interleaved partial sums (vectorises; a single running sum is a
/// chain of dependent adds).
#[inline(always)]
fn sum8(x: &[f64], f: impl Fn(f64) -> f64) -> f64 {
    let mut acc = [0.0f64; 8];
    let mut it = x.chunks_exact(8);
    for c in &mut it {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += f(v);
        }
    }
    let tail: f64 = it.remainder().iter().map(|&v| f(v)).sum();
    acc.iter().sum::<f64>() + tail
}

fn not_float(name: &str) -> ScError {
    ScError::Format(format!("{name} is not a floating-point tensor"))
}

/// BatchNorm1d in eval mode folded into `x * scale + shift`.
#[derive(Debug, Clone)]
struct BatchNorm {
    scale: Vec<f64>,
    shift: Vec<f64>,
}

#[derive(Debug, Clone)]
struct FcLayer {
    linear: Linear,
    batch_norm: Option<BatchNorm>,
    layer_norm: bool,
    /// whether the one-hot covariates are appended to this layer's input
    takes_covariates: bool,
    /// `linear.wt` in f32 for the hot loop (f32 as in torch; sums accumulate in f32), rows
    /// padded with zeros to `stride` (a multiple of 16) outputs
    wt32: Aligned,
    stride: usize,
}

/// The scVI `z_encoder`, ready to run.
#[derive(Debug, Clone)]
pub struct ScviEncoder {
    n_genes: usize,
    log_variational: bool,
    /// continuous covariates appended to the input (encode_covariates only)
    n_cont: usize,
    /// one-hot widths in input order: batch then the extra categorical covariates;
    /// 0 for covariates with at most one category (no columns) or not encoded
    cat_widths: Vec<usize>,
    layers: Vec<FcLayer>,
    /// `log1p(k)` (or `k` without log_variational) for whole counts `k < LOG_TABLE`
    log_table: Vec<f32>,
    mean: Linear,
    /// the gene rows of the first layer's f32 weights cut into column panels
    /// ([`panel_major`]): one gene chunk of a panel is contiguous (layer 0 keeps no
    /// row-major `wt32`)
    first32: Aligned,
    /// the same in 128-wide panels for the AVX-512 kernel (empty without AVX-512)
    first_wide: Aligned,
    /// the mean and var heads side by side in f32 (`n_hidden x head_stride`, columns
    /// `[mean | var | 0...]`) and their biases `[mean | var]`
    head32: Aligned,
    head_stride: usize,
    head_b: Vec<f64>,
}

/// f32 values starting on a 64-byte boundary, so that the 64-byte weight panels of the row
/// kernel never straddle cache lines (malloc's large blocks start 16 bytes into a page).
#[derive(Debug)]
struct Aligned {
    buf: Vec<f32>,
    off: usize,
    len: usize,
}

impl Aligned {
    fn new(v: &[f32]) -> Self {
        let mut buf = vec![0.0f32; v.len() + 16];
        let off = buf.as_ptr().align_offset(64).min(16);
        buf[off..off + v.len()].copy_from_slice(v);
        Aligned {
            buf,
            off,
            len: v.len(),
        }
    }
}

impl std::ops::Deref for Aligned {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.buf[self.off..self.off + self.len]
    }
}

impl Clone for Aligned {
    fn clone(&self) -> Self {
        Aligned::new(self)
    }
}

/// `n` rounded up to a multiple of 16 (two AVX2 vectors of f32).
fn pad16(n: usize) -> usize {
    n.div_ceil(16) * 16
}

/// Row-major `rows x n_out` f64 weights as f32 rows padded with zeros to `stride`.
fn padded32(wt: &[f64], n_out: usize, stride: usize) -> Vec<f32> {
    let rows = wt.len().checked_div(n_out).unwrap_or(0);
    let mut v = vec![0.0f32; rows * stride];
    for (dst, src) in v
        .chunks_exact_mut(stride)
        .zip(wt.chunks_exact(n_out.max(1)))
    {
        for (d, &x) in dst.iter_mut().zip(src) {
            *d = x as f32;
        }
    }
    v
}

/// The instruction sets the latent kernels use, detected once per call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Isa {
    /// portable Rust
    Plain,
    /// AVX2 + FMA intrinsics
    Avx2,
    /// AVX-512 F/DQ/VL (rustc >= 1.89): the first layer with 128 outputs per panel (AVX2
    /// kernels for the small layers)
    #[cfg(all(target_arch = "x86_64", scannot_avx512))]
    Avx512,
}

impl Isa {
    fn detect() -> Isa {
        #[cfg(all(target_arch = "x86_64", scannot_avx512))]
        {
            if super::simd::avx512() {
                return Isa::Avx512;
            }
        }
        #[cfg(target_arch = "x86_64")]
        {
            if super::simd::avx2_fma() {
                return Isa::Avx2;
            }
        }
        Isa::Plain
    }

    /// Whether the AVX2 + FMA kernels may run (AVX-512 implies them).
    fn avx2(self) -> bool {
        self != Isa::Plain
    }

    /// Whether the first layer uses the 128-wide AVX-512 panels.
    fn wide(self) -> bool {
        #[cfg(all(target_arch = "x86_64", scannot_avx512))]
        {
            self == Isa::Avx512
        }
        #[cfg(not(all(target_arch = "x86_64", scannot_avx512)))]
        {
            false
        }
    }

    /// The kernels this build can run on this CPU (portable first).
    #[cfg(test)]
    fn available() -> Vec<Isa> {
        let best = Isa::detect();
        let mut v = vec![Isa::Plain];
        if best.avx2() {
            v.push(Isa::Avx2);
        }
        if best.wide() {
            v.push(best);
        }
        v
    }
}

/// Non-zero inputs of a layer: input indices (increasing) and their values; or, for the
/// AVX-512 first layer, both in one `u64` each (`pk`: the index in the low 32 bits, the
/// value's bits in the high 32), one load per non-zero instead of two.
#[derive(Debug, Default, Clone)]
struct Nz {
    idx: Vec<u32>,
    val: Vec<f32>,
    pk: Vec<u64>,
}

/// One non-zero as an `Nz::pk` entry.
#[inline(always)]
fn pack(g: u32, v: f32) -> u64 {
    g as u64 | (v.to_bits() as u64) << 32
}

impl Nz {
    fn clear(&mut self) {
        self.idx.clear();
        self.val.clear();
        self.pk.clear();
    }
    /// Entries so far (one form is used at a time).
    fn len(&self) -> usize {
        self.idx.len().max(self.pk.len())
    }
    /// The packed entries as `idx` / `val` (emptying `pk`).
    fn unpack(&mut self) {
        if self.pk.is_empty() {
            return;
        }
        self.idx.clear();
        self.val.clear();
        self.idx.extend(self.pk.iter().map(|&e| e as u32));
        self.val
            .extend(self.pk.iter().map(|&e| f32::from_bits((e >> 32) as u32)));
        self.pk.clear();
    }
    #[inline]
    fn push(&mut self, g: u32, v: f32) {
        self.idx.push(g);
        self.val.push(v);
    }
}

/// `y[..8 NV] += sum_k val_k * w[idx_k * stride..][..8 NV]` over the leading non-zeros with
/// `idx_k < limit` (and a row inside `w`); returns how many that is. The `8 NV` outputs
/// stay in registers while the non-zeros stream by, so only the weight rows are loaded.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rows_avx2<const NV: usize>(
    y: &mut [f32],
    w: &[f32],
    stride: usize,
    idx: &[u32],
    val: &[f32],
    limit: u32,
) -> usize {
    use std::arch::x86_64::*;
    assert!(y.len() >= 8 * NV && stride >= 8 * NV);
    let n_rows = if w.len() >= 8 * NV {
        (w.len() - 8 * NV) / stride + 1
    } else {
        0
    };
    let lim = n_rows.min(limit as usize);
    let (yp, wp) = (y.as_mut_ptr(), w.as_ptr());
    // SAFETY (all pointer accesses): y holds 8 NV values (asserted); for a row g < n_rows,
    // g * stride + 8 NV <= w.len()
    let mut acc = [_mm256_setzero_ps(); NV];
    for (v, a) in acc.iter_mut().enumerate() {
        *a = unsafe { _mm256_loadu_ps(yp.add(8 * v)) };
    }
    let m = idx.len().min(val.len());
    let mut k = 0;
    while k < m {
        let g = idx[k] as usize;
        if g >= lim {
            break;
        }
        let row = unsafe { wp.add(g * stride) };
        let b = _mm256_set1_ps(val[k]);
        for (v, a) in acc.iter_mut().enumerate() {
            *a = _mm256_fmadd_ps(b, unsafe { _mm256_loadu_ps(row.add(8 * v)) }, *a);
        }
        k += 1;
    }
    for (v, a) in acc.iter().enumerate() {
        unsafe { _mm256_storeu_ps(yp.add(8 * v), *a) };
    }
    k
}

/// Portable form of [`rows_avx2`] for `W` outputs.
#[inline(always)]
fn rows_portable<const W: usize>(
    y: &mut [f32],
    w: &[f32],
    stride: usize,
    idx: &[u32],
    val: &[f32],
    limit: u32,
) -> usize {
    let mut acc: [f32; W] = y[..W].try_into().expect("W outputs");
    let mut k = 0;
    for (&g, &v) in idx.iter().zip(val) {
        let off = g as usize * stride;
        let row = match w.get(off..off + W) {
            Some(r) if g < limit => r,
            _ => break,
        };
        for (a, &r) in acc.iter_mut().zip(row) {
            *a += v * r;
        }
        k += 1;
    }
    y[..W].copy_from_slice(&acc);
    k
}

/// Outputs per column panel of the row kernels: 8 AVX2 registers of accumulators, enough
/// independent FMA chains, and room for the broadcast value.
const KPANEL: usize = 64;

/// One column panel: `y[..width] += sum_k val_k * w[idx_k * stride..][..width]` over the
/// leading non-zeros with `idx_k < limit`; returns how many that is. `w` starts at the
/// panel's first column; `width` is a multiple of 16 up to [`kpanel`]`(isa)`.
#[allow(clippy::too_many_arguments)]
fn panel_acc(
    y: &mut [f32],
    w: &[f32],
    stride: usize,
    width: usize,
    idx: &[u32],
    val: &[f32],
    limit: u32,
    isa: Isa,
) -> usize {
    match isa {
        #[cfg(all(target_arch = "x86_64", scannot_avx512))]
        // SAFETY: Isa::Avx512 only comes from Isa::detect(), which checked AVX-512 F
        Isa::Avx512 if width > 64 => unsafe {
            super::latent_avx512::panel(y, w, stride, width, idx, val, limit)
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: Isa::Avx2 / Avx512 only come from Isa::detect(), which checked AVX2 and FMA
        _ if isa.avx2() => unsafe {
            match width {
                64 => rows_avx2::<8>(y, w, stride, idx, val, limit),
                48 => rows_avx2::<6>(y, w, stride, idx, val, limit),
                32 => rows_avx2::<4>(y, w, stride, idx, val, limit),
                _ => rows_avx2::<2>(y, w, stride, idx, val, limit),
            }
        },
        _ => match width {
            64 => rows_portable::<64>(y, w, stride, idx, val, limit),
            48 => rows_portable::<48>(y, w, stride, idx, val, limit),
            32 => rows_portable::<32>(y, w, stride, idx, val, limit),
            _ => rows_portable::<16>(y, w, stride, idx, val, limit),
        },
    }
}

/// Outputs per column panel for the kernels of `isa`: 128 (8 zmm registers) with AVX-512.
fn kpanel(isa: Isa) -> usize {
    if isa.wide() {
        2 * KPANEL
    } else {
        KPANEL
    }
}

/// The column panels `(first column, width)` of `stride` outputs (a multiple of 16), `kp`
/// wide but the last.
fn panel_widths(stride: usize, kp: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..stride / 16 * 16)
        .step_by(kp)
        .map(move |c0| (c0, (stride / 16 * 16 - c0).min(kp)))
}

/// `y += sum_k val_k * w[idx_k, :]` over the leading non-zeros with `idx_k < limit`
/// (increasing indices); returns how many that is. `w` is row-major with rows of `y.len()`
/// values (a multiple of 16; outputs past the last multiple of 16 are left alone).
fn rows_acc(y: &mut [f32], w: &[f32], idx: &[u32], val: &[f32], limit: u32, isa: Isa) -> usize {
    let stride = y.len();
    let mut m = idx.len().min(val.len());
    for (c0, width) in panel_widths(stride, kpanel(isa)) {
        let wc = &w[c0.min(w.len())..];
        m = panel_acc(
            &mut y[c0..],
            wc,
            stride,
            width,
            &idx[..m],
            &val[..m],
            limit,
            isa,
        );
    }
    m
}

/// Row-major `rows x stride` weights cut into column panels ([`panel_widths`]) `kp` wide,
/// each `rows x width` row-major, one after the other: panel `p` starts at `p * kp * rows`.
fn panel_major(w: &[f32], rows: usize, stride: usize, kp: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(rows * stride);
    for (c0, width) in panel_widths(stride, kp) {
        for r in w.chunks_exact(stride).take(rows) {
            v.extend_from_slice(&r[c0..c0 + width]);
        }
    }
    v
}

/// Transformed non-zeros of one CSC column appended to `out`, 8 values at a time: whole
/// counts in `1..LOG_TABLE` at increasing, in-range rows take the table; any other group of
/// 8 goes through `scalar` (row, value, previous row), which sets the flags and returns the
/// transformed value of a non-zero. `prev`: the row before the column (-1).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn csc_col_avx2(
    rows: &[i32],
    xs: &[f64],
    table: &[f32],
    n_genes: u32,
    out: &mut Nz,
    mut prev: i32,
    scalar: &mut impl FnMut(i32, f64, &mut i32) -> Option<f32>,
) {
    use std::arch::x86_64::*;
    assert!(table.len() >= LOG_TABLE);
    let n = rows.len().min(xs.len());
    out.idx.reserve(n);
    out.val.reserve(n);
    let mut len = out.idx.len();
    assert!(out.val.len() == len);
    let (ip, vp) = (out.idx.as_mut_ptr(), out.val.as_mut_ptr());
    let zero = _mm256_setzero_si256();
    let top = _mm256_set1_epi32(LOG_TABLE as i32);
    let ngv = _mm256_set1_epi32(n_genes.min(i32::MAX as u32) as i32);
    let minus1 = _mm256_set1_epi32(-1);
    let rot = _mm256_setr_epi32(7, 0, 1, 2, 3, 4, 5, 6);
    let mut k = 0;
    // SAFETY (all pointer accesses): k + 8 <= n values in both input slices; the writes go
    // to reserved capacity (n entries past the length at entry, at most one per input);
    // the gather reads table[1..LOG_TABLE) only (the lanes are checked first)
    while k + 8 <= n {
        let x0 = unsafe { _mm256_loadu_pd(xs.as_ptr().add(k)) };
        let x1 = unsafe { _mm256_loadu_pd(xs.as_ptr().add(k + 4)) };
        let (k0, k1) = (_mm256_cvttpd_epi32(x0), _mm256_cvttpd_epi32(x1));
        let whole = _mm256_movemask_pd(_mm256_cmp_pd::<_CMP_EQ_OQ>(_mm256_cvtepi32_pd(k0), x0))
            | (_mm256_movemask_pd(_mm256_cmp_pd::<_CMP_EQ_OQ>(_mm256_cvtepi32_pd(k1), x1)) << 4);
        let kv = _mm256_set_m128i(k1, k0);
        let gv = unsafe { _mm256_loadu_si256(rows.as_ptr().add(k) as *const __m256i) };
        let before = _mm256_blend_epi32::<1>(
            _mm256_permutevar8x32_epi32(gv, rot),
            _mm256_set1_epi32(prev),
        );
        let ok = _mm256_and_si256(
            _mm256_and_si256(_mm256_cmpgt_epi32(kv, zero), _mm256_cmpgt_epi32(top, kv)),
            _mm256_and_si256(
                _mm256_and_si256(_mm256_cmpgt_epi32(gv, minus1), _mm256_cmpgt_epi32(ngv, gv)),
                _mm256_cmpgt_epi32(gv, before),
            ),
        );
        if whole & _mm256_movemask_ps(_mm256_castsi256_ps(ok)) == 0xff {
            let t = unsafe { _mm256_i32gather_ps::<4>(table.as_ptr(), kv) };
            unsafe {
                _mm256_storeu_si256(ip.add(len) as *mut __m256i, gv);
                _mm256_storeu_ps(vp.add(len), t);
            }
            len += 8;
            prev = rows[k + 7];
        } else {
            for q in k..k + 8 {
                if let Some(t) = scalar(rows[q], xs[q], &mut prev) {
                    unsafe {
                        *ip.add(len) = rows[q] as u32;
                        *vp.add(len) = t;
                    }
                    len += 1;
                }
            }
        }
        k += 8;
    }
    for q in k..n {
        if let Some(t) = scalar(rows[q], xs[q], &mut prev) {
            unsafe {
                *ip.add(len) = rows[q] as u32;
                *vp.add(len) = t;
            }
            len += 1;
        }
    }
    // SAFETY: entries up to `len` were written above, within the reserved capacity
    unsafe {
        out.idx.set_len(len);
        out.val.set_len(len);
    }
}

/// The first `n_genes` rows of a transposed weight (`rows x n_out`, row-major) cut into
/// panels of [`PANEL`] columns, `[panel][gene][k]`; empty if `n_out` is not a multiple of
/// [`PANEL`].
pub(crate) fn panels(wt: &[f32], n_genes: usize, n_out: usize) -> Vec<f32> {
    if n_out == 0 || n_out % PANEL != 0 {
        return Vec::new();
    }
    let mut v = Vec::with_capacity(n_genes * n_out);
    for p0 in (0..n_out).step_by(PANEL) {
        for g in 0..n_genes {
            v.extend_from_slice(&wt[g * n_out + p0..g * n_out + p0 + PANEL]);
        }
    }
    v
}

/// A pointer into the output that the blocks of [`ScviEncoder::latent_isa`] share; each
/// writes only its own cells.
#[derive(Clone, Copy)]
struct Out(*mut f64);

// SAFETY: the blocks write disjoint entries (see the use)
unsafe impl Send for Out {}
// SAFETY: as above
unsafe impl Sync for Out {}

impl Out {
    fn get(self) -> *mut f64 {
        self.0
    }
}

thread_local! {
    /// The scratch of each thread that runs latent blocks, kept between calls.
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
}

/// Per-thread scratch of [`ScviEncoder::encode_block`].
#[derive(Default)]
struct Scratch {
    /// the block's latent, per cell: mean then var
    out: Vec<f64>,
    /// the block's transformed non-zero counts, cell after cell
    nz: Nz,
    /// cell `k`'s non-zeros are `nz[starts[k]..starts[k + 1]]`
    starts: Vec<usize>,
    /// per cell, its first non-zero not yet in the first layer
    cursor: Vec<usize>,
    /// per cell, how many non-zeros the current gene chunk has
    taken: Vec<usize>,
    /// the gene part of the first layer, `n x stride`
    acc: Vec<f32>,
    y: Vec<f64>,
    y2: Vec<f64>,
    hnz: Nz,
    a1: Vec<f32>,
}

/// What [`ScviEncoder::cells_tail`] needs of a block besides the scratch.
struct Tail<'t, 'c> {
    first: usize,
    n: usize,
    cov: &'t Covariates<'c>,
    codes: &'t [Option<&'c [u32]>],
    isa: Isa,
}

/// What the pass over a block's counts found.
#[derive(Debug, Clone, Copy, Default)]
struct BlockFlags {
    /// a value that is not finite and non-negative, or a row index outside the genes
    invalid: bool,
    /// a value that is not a whole number
    non_integer: bool,
}

/// The non-zeros of a hidden layer's output (after ReLU) as f32.
#[inline(always)]
fn hidden_nonzeros(x: &[f64], nz: &mut Nz) {
    // without a branch per value: about half the values are zero, in no predictable order
    nz.idx.resize(x.len(), 0);
    nz.val.resize(x.len(), 0.0);
    let mut n = 0;
    let (idx, val) = (&mut nz.idx[..], &mut nz.val[..]);
    for (i, &v) in x.iter().enumerate() {
        // n <= i < x.len() = idx.len() = val.len()
        idx[n] = i as u32;
        val[n] = v as f32;
        n += (v != 0.0) as usize;
    }
    nz.idx.truncate(n);
    nz.val.truncate(n);
}

/// `y += sum_k v_k * w[g_k, :]` over the non-zeros `(g_k, v_k)`, `w` row-major with rows of
/// `y.len()`. Register-blocked: 32 outputs at a time stay in registers while the non-zeros
/// stream by, so only the weight rows are loaded.
#[inline(always)]
fn sparse_rows_body<const FUSED: bool>(y: &mut [f32], w: &[f32], nz: &[(u32, f32)]) {
    const C: usize = 32;
    let n = y.len();
    let mut c0 = 0;
    while c0 + C <= n {
        // two independent accumulator sets (even / odd non-zeros) keep twice as many FMA
        // chains in flight as one would
        let mut acc = [0.0f32; C];
        let mut acc2 = [0.0f32; C];
        let mut pairs = nz.chunks_exact(2);
        for pr in &mut pairs {
            let (g, v) = pr[0];
            let (g2, v2) = pr[1];
            let off = g as usize * n + c0;
            let off2 = g2 as usize * n + c0;
            let row: &[f32; C] = w[off..off + C].try_into().expect("row chunk");
            let row2: &[f32; C] = w[off2..off2 + C].try_into().expect("row chunk");
            for k in 0..C {
                if FUSED {
                    acc[k] = v.mul_add(row[k], acc[k]);
                    acc2[k] = v2.mul_add(row2[k], acc2[k]);
                } else {
                    acc[k] += v * row[k];
                    acc2[k] += v2 * row2[k];
                }
            }
        }
        for &(g, v) in pairs.remainder() {
            let off = g as usize * n + c0;
            let row: &[f32; C] = w[off..off + C].try_into().expect("row chunk");
            for k in 0..C {
                acc[k] = if FUSED {
                    v.mul_add(row[k], acc[k])
                } else {
                    acc[k] + v * row[k]
                };
            }
        }
        for ((o, a), a2) in y[c0..c0 + C].iter_mut().zip(acc).zip(acc2) {
            *o += a + a2;
        }
        c0 += C;
    }
    if c0 < n {
        for &(g, v) in nz {
            let off = g as usize * n;
            for (o, r) in y[c0..].iter_mut().zip(&w[off + c0..off + n]) {
                *o += v * r;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn sparse_rows_avx2(y: &mut [f32], w: &[f32], nz: &[(u32, f32)]) {
    sparse_rows_body::<true>(y, w, nz)
}

pub(crate) fn sparse_rows(y: &mut [f32], w: &[f32], nz: &[(u32, f32)]) {
    #[cfg(target_arch = "x86_64")]
    {
        if super::simd::avx2_fma() {
            // SAFETY: the CPU has AVX2 and FMA (checked just above)
            return unsafe { sparse_rows_avx2(y, w, nz) };
        }
    }
    sparse_rows_body::<false>(y, w, nz)
}

/// Covariates of the cells, in the model's codes.
#[derive(Debug, Clone, Default)]
pub struct Covariates<'a> {
    /// Batch code (index into the model's batch categories) per cell.
    pub batch: Option<&'a [u32]>,
    /// One code vector per extra categorical covariate, in the model's order.
    pub categorical: Vec<&'a [u32]>,
    /// One value vector per extra continuous covariate, in the model's order.
    pub continuous: Vec<&'a [f64]>,
}

/// Latent mean and variance, cells x latent, column-major (R's layout).
#[derive(Debug, Clone, PartialEq)]
pub struct LatentOutput {
    pub n_cells: usize,
    pub n_latent: usize,
    pub mean: Vec<f64>,
    pub var: Vec<f64>,
}

impl ScviEncoder {
    /// Build the encoder of a saved SCVI model; refuses variants it cannot reproduce exactly.
    pub fn from_model(m: &ScviModelFile) -> ScResult<Self> {
        let p = &m.init;
        if let Some(name) = &m.model_name {
            if name != "SCVI" && name != "SCANVI" {
                return Err(ScError::Input(format!(
                    "the model is a {name}; only SCVI (and SCANVI) encoders are supported"
                )));
            }
        }
        if p.latent_distribution != "normal" {
            return Err(ScError::Input(format!(
                "the model uses latent_distribution = '{}'; only 'normal' is supported (the \
                 'ln' latent is a Monte Carlo estimate scvi-tools itself does not reproduce)",
                p.latent_distribution
            )));
        }
        if p.batch_representation != "one-hot" {
            return Err(ScError::Input(format!(
                "the model uses batch_representation = '{}'; only 'one-hot' is supported",
                p.batch_representation
            )));
        }
        let bn = matches!(p.use_batch_norm.as_str(), "both" | "encoder");
        let ln = matches!(p.use_layer_norm.as_str(), "both" | "encoder");
        let n_genes = m.var_names.len();
        let (n_cont, cat_widths) = if p.encode_covariates {
            let mut w = vec![m.n_batch];
            w.extend(m.extra_categorical.iter().map(|(_, c)| c.len()));
            (
                m.extra_continuous.len(),
                w.into_iter().map(|n| if n > 1 { n } else { 0 }).collect(),
            )
        } else {
            (0, Vec::new())
        };
        let n_cov: usize = cat_widths.iter().sum();

        let get = |k: &str| -> ScResult<&Tensor> {
            m.tensor(k).ok_or_else(|| {
                ScError::Format(format!(
                    "the state dict has no '{k}'; the model is not a scvi-tools VAE this reader \
                     knows"
                ))
            })
        };
        let mut layers = Vec::new();
        for i in 0.. {
            let base = format!("z_encoder.encoder.fc_layers.Layer {i}");
            if m.tensor(&format!("{base}.0.weight")).is_none() {
                break;
            }
            let linear = Linear::from_tensors(
                get(&format!("{base}.0.weight"))?,
                get(&format!("{base}.0.bias"))?,
                &format!("{base}.0"),
            )?;
            let takes_covariates = i == 0 || p.deeply_inject_covariates;
            let n_prev = if i == 0 {
                n_genes + n_cont
            } else {
                layers.last().map_or(0, |l: &FcLayer| l.linear.n_out)
            };
            let expect = n_prev + if takes_covariates { n_cov } else { 0 };
            if linear.n_in != expect {
                return Err(ScError::Dims(format!(
                    "{base}.0.weight takes {} inputs but the model description implies {expect} \
                     ({n_prev} features + {} covariate columns); the attr_dict and the weights \
                     disagree",
                    linear.n_in,
                    if takes_covariates { n_cov } else { 0 }
                )));
            }
            let batch_norm = if bn {
                let f = |s: &str| -> ScResult<Vec<f64>> {
                    let k = format!("{base}.1.{s}");
                    let t = get(&k)?;
                    if t.shape != [linear.n_out] {
                        return Err(ScError::Dims(format!(
                            "{k} has shape {:?}, expected [{}]",
                            t.shape, linear.n_out
                        )));
                    }
                    t.to_f64().ok_or_else(|| not_float(&k))
                };
                let (w, b, rm, rv) = (
                    f("weight")?,
                    f("bias")?,
                    f("running_mean")?,
                    f("running_var")?,
                );
                let scale: Vec<f64> = w
                    .iter()
                    .zip(&rv)
                    .map(|(w, v)| w / (v + BN_EPS).sqrt())
                    .collect();
                let shift = b
                    .iter()
                    .zip(&rm)
                    .zip(&scale)
                    .map(|((b, m), s)| b - m * s)
                    .collect();
                Some(BatchNorm { scale, shift })
            } else {
                None
            };
            let stride = pad16(linear.n_out);
            let wt32 = Aligned::new(&padded32(&linear.wt, linear.n_out, stride));
            layers.push(FcLayer {
                linear,
                batch_norm,
                layer_norm: ln,
                takes_covariates,
                wt32,
                stride,
            });
        }
        if layers.is_empty() || layers.len() != p.n_layers {
            return Err(ScError::Format(format!(
                "the state dict has {} encoder layers but init_params_ says n_layers = {}",
                layers.len(),
                p.n_layers
            )));
        }
        let h = layers.last().map_or(0, |l| l.linear.n_out);
        let mean = Linear::from_tensors(
            get("z_encoder.mean_encoder.weight")?,
            get("z_encoder.mean_encoder.bias")?,
            "z_encoder.mean_encoder",
        )?;
        let var = Linear::from_tensors(
            get("z_encoder.var_encoder.weight")?,
            get("z_encoder.var_encoder.bias")?,
            "z_encoder.var_encoder",
        )?;
        if mean.n_in != h || var.n_in != h || var.n_out != mean.n_out {
            return Err(ScError::Dims(format!(
                "the latent layers take {} / {} inputs but the last hidden layer has {h}",
                mean.n_in, var.n_in
            )));
        }
        let log_table = (0..LOG_TABLE)
            .map(|k| {
                let k = k as f64;
                (if p.log_variational { k.ln_1p() } else { k }) as f32
            })
            .collect();
        Ok(ScviEncoder::assemble(
            n_genes,
            p.log_variational,
            n_cont,
            cat_widths,
            layers,
            log_table,
            mean,
            var,
        ))
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        n_genes: usize,
        log_variational: bool,
        n_cont: usize,
        cat_widths: Vec<usize>,
        layers: Vec<FcLayer>,
        log_table: Vec<f32>,
        mean: Linear,
        var: Linear,
    ) -> Self {
        let (nl, h) = (mean.n_out, mean.n_in);
        let head_stride = pad16(2 * nl);
        let mut head32 = vec![0.0f32; h * head_stride];
        for (i, row) in head32.chunks_exact_mut(head_stride).enumerate() {
            for l in 0..nl {
                row[l] = mean.wt[i * nl + l] as f32;
                row[nl + l] = var.wt[i * nl + l] as f32;
            }
        }
        let head_b = mean.b.iter().chain(&var.b).copied().collect();
        let mut layers = layers;
        let (first32, first_wide) = match layers.first_mut() {
            Some(l0) => {
                let p = panel_major(&l0.wt32, n_genes, l0.stride, KPANEL);
                let wide = Isa::detect().wide();
                let pw = if wide {
                    panel_major(&l0.wt32, n_genes, l0.stride, 2 * KPANEL)
                } else {
                    Vec::new()
                };
                l0.wt32 = Aligned::new(&[]);
                (Aligned::new(&p), Aligned::new(&pw))
            }
            None => (Aligned::new(&[]), Aligned::new(&[])),
        };
        ScviEncoder {
            n_genes,
            log_variational,
            n_cont,
            cat_widths,
            layers,
            log_table,
            mean,
            first32,
            first_wide,
            head32: Aligned::new(&head32),
            head_stride,
            head_b,
        }
    }

    pub fn n_genes(&self) -> usize {
        self.n_genes
    }

    pub fn n_latent(&self) -> usize {
        self.mean.n_out
    }

    /// True when the latent depends on the batch (and other covariates).
    pub fn uses_covariates(&self) -> bool {
        self.n_cont > 0 || self.cat_widths.iter().any(|&w| w > 0)
    }

    /// Latent mean and variance of each cell. `counts` are raw counts, genes (rows, in the
    /// model's gene order) x cells.
    pub fn latent(&self, counts: &ExprMatrix, cov: &Covariates) -> ScResult<LatentOutput> {
        self.latent_blocked(counts, cov, 64)
    }

    /// [`Self::latent`] with `block` cells per parallel work unit (scvi-tools' `batch_size`;
    /// the result does not depend on it).
    pub fn latent_blocked(
        &self,
        counts: &ExprMatrix,
        cov: &Covariates,
        block: usize,
    ) -> ScResult<LatentOutput> {
        self.latent_counts(counts, cov, block).map(|(o, _)| o)
    }

    /// [`Self::latent_blocked`], also saying whether some count is not a whole number
    /// (normalised data rather than raw counts: the caller may warn). The checks ride on the
    /// pass that transforms the counts.
    pub fn latent_counts(
        &self,
        counts: &ExprMatrix,
        cov: &Covariates,
        block: usize,
    ) -> ScResult<(LatentOutput, bool)> {
        self.latent_isa(counts, cov, block, Isa::detect())
    }

    /// The latent computed with each kernel set this CPU has (portable first).
    #[cfg(test)]
    pub(super) fn latent_every_kernel(
        &self,
        counts: &ExprMatrix,
        cov: &Covariates,
    ) -> Vec<LatentOutput> {
        Isa::available()
            .into_iter()
            .map(|i| self.latent_isa(counts, cov, 7, i).unwrap().0)
            .collect()
    }

    /// [`Self::latent_counts`] with the given kernels (tests run every one the CPU has).
    fn latent_isa(
        &self,
        counts: &ExprMatrix,
        cov: &Covariates,
        block: usize,
        isa: Isa,
    ) -> ScResult<(LatentOutput, bool)> {
        let block = block.max(1);
        let n_cells = counts.ncol();
        if counts.nrow() != self.n_genes {
            return Err(ScError::Dims(format!(
                "the counts have {} genes but the model has {}; align the genes to the model \
                 first (same genes, same order)",
                counts.nrow(),
                self.n_genes
            )));
        }
        let codes = self.covariate_codes(n_cells, cov)?;
        let nl = self.n_latent();
        // per cell: latent mean then var
        let per = (2 * nl).max(1);
        let mut mean = vec![0.0; n_cells * nl];
        let mut var = vec![0.0; n_cells * nl];
        let (mp, vp) = (Out(mean.as_mut_ptr()), Out(var.as_mut_ptr()));
        let flags: Vec<BlockFlags> = (0..n_cells.div_ceil(block))
            .into_par_iter()
            .map(|blk| {
                // the scratch stays with the thread between calls (no page faults)
                SCRATCH.with_borrow_mut(|s| {
                    let mut f = BlockFlags::default();
                    let end = ((blk + 1) * block).min(n_cells);
                    // sub-blocks small enough that their non-zeros stay in L2
                    for first in (blk * block..end).step_by(SUB_BLOCK) {
                        let n = (end - first).min(SUB_BLOCK);
                        let mut o = std::mem::take(&mut s.out);
                        o.clear();
                        o.resize(n * per, 0.0);
                        let g = self.encode_block(counts, first, n, cov, &codes, isa, s, &mut o);
                        f.invalid |= g.invalid;
                        f.non_integer |= g.non_integer;
                        for (k, c) in o.chunks_exact(per).enumerate().take(n) {
                            for l in 0..nl {
                                let at = l * n_cells + first + k;
                                // SAFETY: at < nl * n_cells, the length of mean and var,
                                // which outlive the loop; each block writes only its own
                                // cells `first..first + n`, so no two threads write one
                                // entry and nothing reads them before the loop ends
                                unsafe {
                                    *mp.get().add(at) = c[l];
                                    *vp.get().add(at) = c[nl + l];
                                }
                            }
                        }
                        s.out = o;
                    }
                    f
                })
            })
            .collect();
        if flags.iter().any(|f| f.invalid) {
            return Err(self.invalid_counts(counts));
        }
        let non_integer = flags.iter().any(|f| f.non_integer);
        Ok((
            LatentOutput {
                n_cells,
                n_latent: nl,
                mean,
                var,
            },
            non_integer,
        ))
    }

    /// The code vectors the encoder needs (batch, then the extra categorical covariates),
    /// checked against the model and the number of cells.
    fn covariate_codes<'c>(
        &self,
        n_cells: usize,
        cov: &Covariates<'c>,
    ) -> ScResult<Vec<Option<&'c [u32]>>> {
        // covariates: only those the encoder uses are required
        let mut codes: Vec<Option<&'c [u32]>> = Vec::new();
        if !self.cat_widths.is_empty() {
            codes.push(cov.batch);
            for k in 0..self.cat_widths.len() - 1 {
                codes.push(cov.categorical.get(k).copied());
            }
        }
        for (k, (&w, c)) in self.cat_widths.iter().zip(&codes).enumerate() {
            if w == 0 {
                continue;
            }
            let what = if k == 0 {
                "batch".to_string()
            } else {
                format!("categorical covariate {k}")
            };
            let c = c.ok_or_else(|| {
                ScError::Input(format!(
                    "the model encodes covariates (encode_covariates = True): give the {what} \
                     of every cell"
                ))
            })?;
            if c.len() != n_cells {
                return Err(ScError::Dims(format!(
                    "{} {what} codes for {n_cells} cells",
                    c.len()
                )));
            }
            if let Some(bad) = c.iter().find(|&&x| x as usize >= w) {
                return Err(ScError::Input(format!(
                    "{what} code {bad} is outside the model's {w} categories; map new levels \
                     by query training (scArches) first"
                )));
            }
        }
        if cov.continuous.len() < self.n_cont {
            return Err(ScError::Input(format!(
                "the model encodes {} continuous covariate(s); {} given",
                self.n_cont,
                cov.continuous.len()
            )));
        }
        for c in &cov.continuous[..self.n_cont] {
            if c.len() != n_cells {
                return Err(ScError::Dims(format!(
                    "{} continuous covariate values for {n_cells} cells",
                    c.len()
                )));
            }
        }

        Ok(codes)
    }

    /// The error for counts the encoder refuses: the first invalid value (column-major) or
    /// a row index outside the genes.
    fn invalid_counts(&self, counts: &ExprMatrix) -> ScError {
        let invalid = |v: &&f64| !v.is_finite() || **v < 0.0;
        let bad = match counts {
            ExprMatrix::Csc(m) => {
                if m.i().iter().any(|&g| g < 0 || g as usize >= self.n_genes) {
                    return ScError::Dims(format!(
                        "sparse matrix row indices must lie in 0..{}; rebuild the matrix with \
                         Matrix::sparseMatrix()",
                        self.n_genes
                    ));
                }
                m.x().iter().find(invalid).copied()
            }
            ExprMatrix::Dense(m) => {
                (0..m.ncol()).find_map(|j| m.col(j).iter().find(invalid).copied())
            }
        };
        ScError::Value(format!(
            "counts must be finite and non-negative, found {}; scVI takes raw counts",
            bad.unwrap_or(f64::NAN)
        ))
    }

    /// `log1p(v)` (or `v` without log_variational) of one stored count; flags values that
    /// are not finite and non-negative (`bad`) or not whole (`frac`).
    #[inline(always)]
    fn transform(&self, v: f64, frac: &mut bool, bad: &mut bool) -> f32 {
        if (0.0..LOG_TABLE as f64).contains(&v) {
            let k = v as i32;
            if k as f64 == v {
                // k < LOG_TABLE, a power of two: the mask only spares the bounds check
                return self.log_table[k as usize & (LOG_TABLE - 1)];
            }
            *frac = true;
        } else if !(v >= 0.0 && v.is_finite()) {
            *bad = true;
            return 0.0;
        } else if v.fract() != 0.0 {
            *frac = true;
        }
        (if self.log_variational { v.ln_1p() } else { v }) as f32
    }

    /// The transformed non-zero counts `(gene, log1p(x))` of cells `first..first + n`,
    /// cell after cell with genes increasing, into `nz` (cell `k` at
    /// `starts[k]..starts[k + 1]`), checking the values and row indices on the way.
    fn block_nonzeros(
        &self,
        counts: &ExprMatrix,
        first: usize,
        n: usize,
        isa: Isa,
        nz: &mut Nz,
        starts: &mut Vec<usize>,
    ) -> BlockFlags {
        nz.clear();
        starts.clear();
        starts.push(0);
        let (mut frac, mut bad) = (false, false);
        let ng = self.n_genes as u32;
        for j in first..first + n {
            let a = nz.len();
            match counts {
                ExprMatrix::Csc(m) => {
                    let (rows, xs) = m.col(j);
                    let mut sorted = true;
                    let mut scalar = |g: i32, v: f64, prev: &mut i32| {
                        bad |= g as u32 >= ng;
                        sorted &= g > *prev;
                        *prev = g;
                        (v != 0.0).then(|| self.transform(v, &mut frac, &mut bad))
                    };
                    match isa {
                        #[cfg(all(target_arch = "x86_64", scannot_avx512))]
                        Isa::Avx512 => {
                            let n = rows.len().min(xs.len());
                            nz.pk.reserve(n);
                            let len = nz.pk.len();
                            // SAFETY: Isa::Avx512 only comes from Isa::detect(), which
                            // checked AVX-512 F/DQ/VL; room for n more entries was reserved,
                            // and the kernel wrote every entry below the length it returns
                            unsafe {
                                let end = super::latent_avx512::csc_col(
                                    rows,
                                    xs,
                                    &self.log_table,
                                    ng,
                                    nz.pk.as_mut_ptr(),
                                    len,
                                    -1,
                                    &mut scalar,
                                );
                                nz.pk.set_len(end);
                            }
                        }
                        #[cfg(target_arch = "x86_64")]
                        _ if isa.avx2() => {
                            // SAFETY: Isa::Avx2 / Avx512 only come from Isa::detect(), which
                            // checked AVX2 and FMA
                            unsafe {
                                csc_col_avx2(rows, xs, &self.log_table, ng, nz, -1, &mut scalar)
                            };
                        }
                        _ => {
                            let mut prev = -1;
                            for (&g, &v) in rows.iter().zip(xs) {
                                if let Some(t) = scalar(g, v, &mut prev) {
                                    nz.push(g as u32, t);
                                }
                            }
                        }
                    }
                    if !sorted && isa.wide() {
                        nz.pk[a..].sort_unstable_by_key(|&e| e as u32);
                    } else if !sorted {
                        let mut cell: Vec<(u32, f32)> = nz.idx[a..]
                            .iter()
                            .copied()
                            .zip(nz.val[a..].iter().copied())
                            .collect();
                        cell.sort_unstable_by_key(|e| e.0);
                        for (k, (g, v)) in cell.into_iter().enumerate() {
                            nz.idx[a + k] = g;
                            nz.val[a + k] = v;
                        }
                    }
                }
                ExprMatrix::Dense(m) => {
                    for (g, &v) in m.col(j).iter().enumerate() {
                        if v != 0.0 {
                            let t = self.transform(v, &mut frac, &mut bad);
                            if isa.wide() {
                                nz.pk.push(pack(g as u32, t));
                            } else {
                                nz.push(g as u32, t);
                            }
                        }
                    }
                }
            }
            starts.push(nz.len());
        }
        BlockFlags {
            invalid: bad,
            non_integer: frac,
        }
    }

    /// Latent mean and var of cells `first..first + n` into `out` (per cell: mean then var).
    #[allow(clippy::too_many_arguments)]
    fn encode_block(
        &self,
        counts: &ExprMatrix,
        first: usize,
        n: usize,
        cov: &Covariates,
        codes: &[Option<&[u32]>],
        isa: Isa,
        s: &mut Scratch,
        out: &mut [f64],
    ) -> BlockFlags {
        let flags = self.block_nonzeros(counts, first, n, isa, &mut s.nz, &mut s.starts);
        if flags.invalid {
            return flags;
        }
        let Scratch {
            nz,
            starts,
            cursor,
            taken,
            acc,
            y,
            y2,
            hnz,
            a1,
            ..
        } = s;
        // the gene part of the first layer, gene chunk by gene chunk over the block: each
        // cell's non-zeros of the chunk run from its cursor up to the first gene past it
        let l0 = &self.layers[0];
        let s0 = l0.stride;
        acc.clear();
        acc.resize(n * s0, 0.0);
        cursor.clear();
        cursor.extend_from_slice(&starts[..n]);
        taken.resize(n, 0);
        let ng = self.n_genes;
        let (kp, chunk, wfirst) = if isa.wide() {
            (2 * KPANEL, WIDE_CHUNK, &self.first_wide)
        } else {
            (KPANEL, GENE_CHUNK, &self.first32)
        };
        #[cfg(all(target_arch = "x86_64", scannot_avx512))]
        let one_panel = isa.wide() && s0 <= kp;
        #[cfg(not(all(target_arch = "x86_64", scannot_avx512)))]
        let one_panel = false;
        if !one_panel {
            // the panel loop below takes idx / val
            nz.unpack();
        }
        for g0 in (0..ng).step_by(chunk) {
            let g1 = (g0 + chunk).min(ng) as u32;
            if one_panel {
                // SAFETY: Isa::Avx512 (wide) only comes from Isa::detect(), which checked
                // AVX-512 F
                #[cfg(all(target_arch = "x86_64", scannot_avx512))]
                unsafe {
                    super::latent_avx512::chunk(acc, wfirst, s0, &nz.pk, cursor, &starts[1..], g1)
                };
                continue;
            }
            for (pi, (c0, width)) in panel_widths(s0, kp).enumerate() {
                // panel p of the weights: rows of `width` at p * kp * n_genes = c0 * ng
                let wp = &wfirst[(c0 * ng).min(wfirst.len())..];
                for (k, ((&a, &end), t)) in cursor
                    .iter()
                    .zip(&starts[1..])
                    .zip(taken.iter_mut())
                    .enumerate()
                {
                    // the first panel finds where the cell's chunk ends, the others reuse it
                    let e = if pi == 0 { end } else { a + *t };
                    let y = &mut acc[k * s0 + c0..];
                    let got = panel_acc(y, wp, width, width, &nz.idx[a..e], &nz.val[a..e], g1, isa);
                    if pi == 0 {
                        *t = got;
                    }
                }
            }
            for (c, &t) in cursor.iter_mut().zip(taken.iter()) {
                *c += t;
            }
        }
        let t = Tail {
            first,
            n,
            cov,
            codes,
            isa,
        };
        match isa {
            #[cfg(all(target_arch = "x86_64", scannot_avx512))]
            // SAFETY: Isa::Avx512 only comes from Isa::detect(), which checked AVX-512 F
            Isa::Avx512 => unsafe { self.cells_tail_avx512(&t, acc, y, y2, hnz, a1, out) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: Isa::Avx2 only comes from Isa::detect(), which checked AVX2 and FMA
            _ if isa.avx2() => unsafe { self.cells_tail_avx2(&t, acc, y, y2, hnz, a1, out) },
            _ => self.cells_tail(&t, acc, y, y2, hnz, a1, out),
        }
        flags
    }

    /// [`Self::cells_tail`] compiled for AVX2 (the f64 steps vectorised 4 wide).
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn cells_tail_avx2(
        &self,
        t: &Tail,
        acc: &[f32],
        y: &mut Vec<f64>,
        y2: &mut Vec<f64>,
        hnz: &mut Nz,
        a1: &mut Vec<f32>,
        out: &mut [f64],
    ) {
        self.cells_tail(t, acc, y, y2, hnz, a1, out)
    }

    /// [`Self::cells_tail`] compiled for AVX-512.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F.
    #[cfg(all(target_arch = "x86_64", scannot_avx512))]
    #[target_feature(enable = "avx512f,avx2,fma")]
    #[allow(clippy::too_many_arguments, clippy::incompatible_msrv)]
    unsafe fn cells_tail_avx512(
        &self,
        t: &Tail,
        acc: &[f32],
        y: &mut Vec<f64>,
        y2: &mut Vec<f64>,
        hnz: &mut Nz,
        a1: &mut Vec<f32>,
        out: &mut [f64],
    ) {
        self.cells_tail(t, acc, y, y2, hnz, a1, out)
    }

    /// Per cell of a block, after the gene part of the first layer (`acc`, `n x stride`):
    /// the rest of the first layer, the hidden layers and the mean / var heads, into `out`
    /// (per cell: mean then var). The same f64 and f32 operations in every build (no
    /// contraction into FMAs): only the vector width differs.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn cells_tail(
        &self,
        t: &Tail,
        acc: &[f32],
        y: &mut Vec<f64>,
        y2: &mut Vec<f64>,
        hnz: &mut Nz,
        a1: &mut Vec<f32>,
        out: &mut [f64],
    ) {
        let Tail {
            first,
            n,
            cov,
            codes,
            isa,
        } = *t;
        let l0 = &self.layers[0];
        let s0 = l0.stride;
        let max_h = self
            .layers
            .iter()
            .map(|l| l.linear.n_out)
            .max()
            .unwrap_or(0);
        y.resize(max_h, 0.0);
        y2.resize(max_h, 0.0);
        let nl = self.n_latent();
        for (k, o) in out.chunks_exact_mut(2 * nl).enumerate().take(n) {
            let j = first + k;
            let lin = &l0.linear;
            let h = &mut y[..lin.n_out];
            for ((o, &b), &a) in h.iter_mut().zip(&lin.b).zip(&acc[k * s0..]) {
                *o = b + a as f64;
            }
            for (c, vals) in cov.continuous[..self.n_cont].iter().enumerate() {
                axpy(h, vals[j], lin.row(self.n_genes + c));
            }
            self.finish_layer(l0, self.n_genes + self.n_cont, j, codes, h);
            for li in 1..self.layers.len() {
                let (prev, layer) = (&self.layers[li - 1], &self.layers[li]);
                let x = &y[..prev.linear.n_out];
                // the previous layer's output after ReLU: about half zeros
                hidden_nonzeros(x, hnz);
                a1.clear();
                a1.resize(layer.stride, 0.0);
                rows_acc(a1, &layer.wt32, &hnz.idx, &hnz.val, u32::MAX, isa);
                let h = &mut y2[..layer.linear.n_out];
                for ((o, &b), &a) in h.iter_mut().zip(&layer.linear.b).zip(a1.iter()) {
                    *o = b + a as f64;
                }
                self.finish_layer(layer, x.len(), j, codes, h);
                std::mem::swap(y, y2);
            }
            hidden_nonzeros(&y[..self.mean.n_in], hnz);
            a1.clear();
            a1.resize(self.head_stride, 0.0);
            rows_acc(a1, &self.head32, &hnz.idx, &hnz.val, u32::MAX, isa);
            for ((o, &b), &a) in o.iter_mut().zip(&self.head_b).zip(a1.iter()) {
                *o = b + a as f64;
            }
            for v in o[nl..].iter_mut() {
                *v = v.exp() + VAR_EPS;
            }
        }
    }

    /// The rest of a layer on its linear output `y` (features part done): the one-hot
    /// covariate columns, batch norm, layer norm and ReLU.
    #[inline(always)]
    fn finish_layer(
        &self,
        layer: &FcLayer,
        n_feat: usize,
        j: usize,
        codes: &[Option<&[u32]>],
        y: &mut [f64],
    ) {
        let lin = &layer.linear;
        if layer.takes_covariates {
            let mut off = n_feat;
            for (&w, c) in self.cat_widths.iter().zip(codes) {
                if w == 0 {
                    continue;
                }
                if let Some(c) = c {
                    axpy(y, 1.0, lin.row(off + c[j] as usize));
                }
                off += w;
            }
        }
        if let Some(bn) = &layer.batch_norm {
            for ((v, s), t) in y.iter_mut().zip(&bn.scale).zip(&bn.shift) {
                *v = *v * s + t;
            }
        }
        if layer.layer_norm {
            let n = y.len() as f64;
            let mu = sum8(y, |v| v) / n;
            let var = sum8(y, |v| (v - mu) * (v - mu)) / n;
            let inv = 1.0 / (var + LN_EPS).sqrt();
            for v in y.iter_mut() {
                *v = (*v - mu) * inv;
            }
        }
        for v in y.iter_mut() {
            *v = v.max(0.0);
        }
    }
}

#[cfg(test)]
mod kernel_tests {
    use super::*;
    use crate::matrix::{CscOwned, CscView, DenseView};

    /// The kernels this CPU can run.
    fn isas() -> Vec<Isa> {
        Isa::available()
    }

    fn weights(n_in: usize, n_out: usize, seed: usize) -> Linear {
        let wt = (0..n_in * n_out)
            .map(|k| (((k + seed) * 7919 % 2003) as f64 - 1001.0) / 3001.0)
            .collect();
        let b = (0..n_out)
            .map(|k| ((k + seed) % 7) as f64 / 10.0 - 0.3)
            .collect();
        Linear { n_in, n_out, wt, b }
    }

    fn layer(linear: Linear, batch_norm: bool, takes_covariates: bool) -> FcLayer {
        let n = linear.n_out;
        let stride = pad16(n);
        FcLayer {
            wt32: Aligned::new(&padded32(&linear.wt, n, stride)),
            stride,
            batch_norm: batch_norm.then(|| BatchNorm {
                scale: (0..n).map(|k| 0.5 + (k % 5) as f64 / 10.0).collect(),
                shift: (0..n).map(|k| (k % 3) as f64 / 10.0 - 0.1).collect(),
            }),
            layer_norm: true,
            takes_covariates,
            linear,
        }
    }

    /// Two layers (`h1`, `h2` wide), batch norm on the first, layer norm on both, one
    /// continuous covariate and a two-level batch injected into both layers, 3 latent.
    fn toy_encoder(n_genes: usize, h1: usize, h2: usize) -> ScviEncoder {
        let (n_cont, n_cov) = (1, 2);
        let l0 = layer(weights(n_genes + n_cont + n_cov, h1, 1), true, true);
        let l1 = layer(weights(h1 + n_cov, h2, 2), false, true);
        ScviEncoder::assemble(
            n_genes,
            true,
            n_cont,
            vec![n_cov],
            vec![l0, l1],
            (0..LOG_TABLE).map(|k| (k as f64).ln_1p() as f32).collect(),
            weights(h2, 3, 3),
            weights(h2, 3, 4),
        )
    }

    /// The encoder written plainly in f64, one cell at a time (reference).
    fn reference(enc: &ScviEncoder, x: &[f64], batch: u32, cont: f64) -> (Vec<f64>, Vec<f64>) {
        let mut h: Vec<f64> = x.iter().map(|v| v.ln_1p()).collect();
        h.push(cont);
        for l in &enc.layers {
            // the covariates go into every layer (deeply injected)
            let mut inp = h.clone();
            inp.extend([(batch == 0) as u8 as f64, (batch == 1) as u8 as f64]);
            assert_eq!(inp.len(), l.linear.n_in);
            let mut y = l.linear.b.clone();
            for (i, &v) in inp.iter().enumerate() {
                for (o, w) in y.iter_mut().zip(l.linear.row(i)) {
                    *o += v * w;
                }
            }
            if let Some(bn) = &l.batch_norm {
                for ((v, s), t) in y.iter_mut().zip(&bn.scale).zip(&bn.shift) {
                    *v = *v * s + t;
                }
            }
            let n = y.len() as f64;
            let mu = y.iter().sum::<f64>() / n;
            let var = y.iter().map(|v| (v - mu).powi(2)).sum::<f64>() / n;
            h = y
                .iter()
                .map(|v| ((v - mu) / (var + LN_EPS).sqrt()).max(0.0))
                .collect();
        }
        let head = |lin: &Linear| -> Vec<f64> {
            let mut y = lin.b.clone();
            for (i, &v) in h.iter().enumerate() {
                for (o, w) in y.iter_mut().zip(lin.row(i)) {
                    *o += v * w;
                }
            }
            y
        };
        let mean = head(&enc.mean);
        let nl = mean.len();
        let mut var_lin = enc.mean.clone();
        for i in 0..h.len() {
            for l in 0..nl {
                var_lin.wt[i * nl + l] = enc.head32[i * enc.head_stride + nl + l] as f64;
            }
        }
        var_lin.b = enc.head_b[nl..].to_vec();
        let var = head(&var_lin).iter().map(|v| v.exp() + VAR_EPS).collect();
        (mean, var)
    }

    /// Counts with zeros, whole counts in and beyond the log table, and (optionally) a few
    /// non-integer values.
    fn toy_counts(n_genes: usize, n_cells: usize, fractions: bool) -> Vec<f64> {
        let mut dense = vec![0.0f64; n_genes * n_cells];
        for (k, v) in dense.iter_mut().enumerate() {
            let r = (k * 2654435761usize) % 1000;
            if r < 300 {
                *v = (r % 13) as f64 + 1.0;
                if fractions && r % 97 == 0 {
                    *v += 0.5;
                }
            }
        }
        dense[5] = 5000.0; // beyond the table
        dense[n_genes + 3] = 4095.0; // the table's last entry
        dense
    }

    /// Every kernel set, sparse and dense input, any block size: the latent equals the
    /// plain f64 encoder (to f32 rounding), for hidden widths that are and are not
    /// multiples of 16 and of 128, with genes spanning several chunks.
    #[test]
    fn blocked_latent_equals_plain_encoder() {
        let (n_genes, n_cells) = (2 * GENE_CHUNK + 77, 37);
        let dense = toy_counts(n_genes, n_cells, true);
        let csc = CscOwned::from_dense(n_genes, n_cells, &dense);
        let batch: Vec<u32> = (0..n_cells as u32).map(|j| j % 2).collect();
        let cont: Vec<f64> = (0..n_cells).map(|j| j as f64 / 10.0 - 1.0).collect();
        let cov = Covariates {
            batch: Some(&batch),
            categorical: vec![],
            continuous: vec![&cont],
        };
        for (h1, h2) in [(128usize, 128usize), (16, 16), (40, 24), (256, 144)] {
            let enc = toy_encoder(n_genes, h1, h2);
            let want: Vec<(Vec<f64>, Vec<f64>)> = (0..n_cells)
                .map(|j| {
                    reference(
                        &enc,
                        &dense[j * n_genes..(j + 1) * n_genes],
                        batch[j],
                        cont[j],
                    )
                })
                .collect();
            for isa in isas() {
                for block in [1usize, 5, 64] {
                    for x in [
                        ExprMatrix::Csc(csc.view()),
                        ExprMatrix::Dense(DenseView::new(n_genes, n_cells, &dense).unwrap()),
                    ] {
                        let (got, frac) = enc.latent_isa(&x, &cov, block, isa).unwrap();
                        assert!(frac, "non-integer counts are flagged");
                        for (j, (m, v)) in want.iter().enumerate() {
                            for l in 0..3 {
                                let (a, b) = (got.mean[l * n_cells + j], m[l]);
                                assert!(
                                    (a - b).abs() < 1e-4,
                                    "{isa:?} {h1}x{h2} block {block} cell {j}: mean {a} vs {b}"
                                );
                                let (a, b) = (got.var[l * n_cells + j], v[l]);
                                assert!(((a - b) / b).abs() < 1e-4, "var {a} vs {b}");
                            }
                        }
                    }
                }
            }
        }
    }

    /// The SIMD count pass gives the scalar pass's non-zeros and flags: explicit zeros,
    /// non-integer and large counts, unsorted row indices, invalid values and rows.
    #[test]
    fn count_pass_is_the_same_for_every_kernel() {
        let n_genes = 40;
        let enc = toy_encoder(n_genes, 16, 16);
        let p = [0, 12, 12, 31, 40, 45];
        let mut i: Vec<i32> = (0..12).map(|k| 3 * k).collect(); // one whole group of 8
        i.extend((0..19).map(|k| 2 * k)); // 19: two groups + tail
        i.extend([30, 1, 2, 3, 4, 5, 6, 7, 8]); // unsorted
        i.extend([1, 2, 3, 4, 5]);
        let mut x: Vec<f64> = (0..45).map(|k| (k % 9) as f64 + 1.0).collect();
        x[13] = 0.0; // explicit zero
        x[14] = 2.5; // not whole
        x[15] = 1e6; // beyond the table
        let run = |x: &[f64], i: &[i32], isa: Isa| {
            let m = CscView::new(n_genes, 5, &p, i, x).unwrap();
            let (mut nz, mut starts) = (Nz::default(), Vec::new());
            let f = enc.block_nonzeros(&ExprMatrix::Csc(m), 0, 5, isa, &mut nz, &mut starts);
            nz.unpack();
            (nz.idx, nz.val, starts, f.invalid, f.non_integer)
        };
        let want = run(&x, &i, Isa::Plain);
        assert!(!want.3 && want.4);
        assert_eq!(want.0.len(), 44);
        assert!(want.0[30..39].windows(2).all(|w| w[0] < w[1]), "sorted");
        for isa in isas() {
            assert_eq!(run(&x, &i, isa), want, "{isa:?}");
            let mut bad = x.clone();
            bad[3] = -1.0;
            assert!(run(&bad, &i, isa).3);
            bad[3] = f64::NAN;
            assert!(run(&bad, &i, isa).3);
            bad[3] = f64::INFINITY;
            assert!(run(&bad, &i, isa).3);
            let mut bad_i = i.clone();
            bad_i[2] = n_genes as i32;
            assert!(run(&x, &bad_i, isa).3);
            bad_i[2] = -1;
            assert!(run(&x, &bad_i, isa).3);
            let whole: Vec<f64> = x.iter().map(|v| v.floor()).collect();
            assert!(!run(&whole, &i, isa).4);
        }
        // the error names the first bad value, or the bad row
        let mut bad = x.clone();
        bad[20] = -2.0;
        bad[30] = f64::NAN;
        let batch = [0u32; 5];
        let cov = Covariates {
            batch: Some(&batch),
            categorical: vec![],
            continuous: vec![&[0.0; 5]],
        };
        let m = CscView::new(n_genes, 5, &p, &i, &bad).unwrap();
        let e = enc.latent_counts(&ExprMatrix::Csc(m), &cov, 2).unwrap_err();
        assert!(e.to_string().contains("-2"), "{e}");
        let mut bad_i = i.clone();
        bad_i[40] = 99;
        let m = CscView::new(n_genes, 5, &p, &bad_i, &x).unwrap();
        let e = enc.latent_counts(&ExprMatrix::Csc(m), &cov, 2).unwrap_err();
        assert!(e.to_string().contains("row indices"), "{e}");
    }

    /// Whole counts across the table (1..64 by the AVX-512 permutes, larger ones by gather,
    /// 4095 = the last entry, beyond the table by the scalar path) in full SIMD groups: every
    /// kernel gives the scalar pass's values, equal to `ln_1p` in f32.
    #[test]
    fn count_pass_table_lookups_for_every_kernel() {
        let n_genes = 400;
        let enc = toy_encoder(n_genes, 16, 16);
        // column 0: counts 1..=64 then 1..=64 reversed (groups all below 64, groups with 64);
        // column 1: 65..=400 (gather); column 2: 4095 and 4096 among small counts
        let mut cols: Vec<Vec<f64>> = vec![
            (1..=64).chain((1..=64).rev()).map(f64::from).collect(),
            (65..=400).map(f64::from).collect(),
            (0..48).map(|k| f64::from(k % 7 + 1)).collect(),
        ];
        cols[2][20] = 4095.0;
        cols[2][40] = 4096.0;
        let mut p = vec![0i32];
        let (mut i, mut x) = (Vec::new(), Vec::new());
        for c in &cols {
            // rows spread over the genes, increasing
            i.extend((0..c.len()).map(|g| (g * n_genes / c.len()) as i32));
            x.extend_from_slice(c);
            p.push(x.len() as i32);
        }
        for c in p.windows(2) {
            assert!(i[c[0] as usize..c[1] as usize]
                .windows(2)
                .all(|w| w[0] < w[1]));
        }
        let run = |isa: Isa| {
            let m = CscView::new(n_genes, cols.len(), &p, &i, &x).unwrap();
            let (mut nz, mut starts) = (Nz::default(), Vec::new());
            let f = enc.block_nonzeros(
                &ExprMatrix::Csc(m),
                0,
                cols.len(),
                isa,
                &mut nz,
                &mut starts,
            );
            nz.unpack();
            (nz.idx, nz.val, starts, f.invalid, f.non_integer)
        };
        let want = run(Isa::Plain);
        assert_eq!(want.0.len(), x.len());
        assert!(!want.3 && !want.4);
        for (v, &c) in want.1.iter().zip(&x) {
            assert_eq!(*v, c.ln_1p() as f32, "count {c}");
        }
        for isa in isas() {
            assert_eq!(run(isa), want, "{isa:?}");
        }
    }

    /// The row kernels against a plain f64 sum, for widths with each panel remainder and
    /// more than one 64-wide panel; they stop at the first index at or past `limit` or
    /// past the end of the weights and say how many non-zeros they took.
    #[test]
    fn row_kernels_equal_a_plain_sum() {
        let n_rows = 57;
        for stride in [16usize, 32, 48, 64, 80, 128, 144, 272] {
            let w: Vec<f32> = (0..n_rows * stride)
                .map(|k| ((k * 7919 % 1000) as f32 - 500.0) / 997.0)
                .collect();
            let mut idx: Vec<u32> = (0..n_rows as u32).filter(|g| g % 3 != 1).collect();
            let mut val: Vec<f32> = idx.iter().map(|&g| (g as f32 + 1.0).ln()).collect();
            let want = |limit: u32| {
                let mut y = vec![0.5f64; stride];
                for (&g, &v) in idx.iter().zip(&val).take_while(|e| *e.0 < limit) {
                    for (o, &r) in y.iter_mut().zip(&w[g as usize * stride..]) {
                        *o += v as f64 * r as f64;
                    }
                }
                y
            };
            let (all, head) = (want(u32::MAX), want(30));
            let n_head = idx.iter().filter(|&&g| g < 30).count();
            idx.push(n_rows as u32 + 3);
            val.push(1.0);
            for isa in isas() {
                for (limit, want, n_want) in [(u32::MAX, &all, idx.len() - 1), (30, &head, n_head)]
                {
                    let mut y = vec![0.5f32; stride];
                    let n = rows_acc(&mut y, &w, &idx, &val, limit, isa);
                    assert_eq!(n, n_want, "{isa:?} {stride} {limit}");
                    for (a, b) in y.iter().zip(want) {
                        assert!((*a as f64 - b).abs() < 1e-4, "{isa:?} {stride}: {a} vs {b}");
                    }
                }
            }
        }
    }

    /// The 32-wide kernel train.rs shares, SIMD and plain, against a plain f64 sum.
    #[test]
    fn sparse_rows_equals_a_plain_sum() {
        let n_genes = 57;
        for n in [1usize, 31, 32, 45, 128, 130] {
            let w: Vec<f32> = (0..n_genes * n)
                .map(|k| ((k * 7919 % 1000) as f32 - 500.0) / 997.0)
                .collect();
            let nz: Vec<(u32, f32)> = (0..n_genes as u32)
                .filter(|g| g % 3 != 1)
                .map(|g| (g, (g as f32 + 1.0).ln()))
                .collect();
            let mut want = vec![0.5f64; n];
            for &(g, v) in &nz {
                for (o, &r) in want
                    .iter_mut()
                    .zip(&w[g as usize * n..(g as usize + 1) * n])
                {
                    *o += v as f64 * r as f64;
                }
            }
            for fast in [true, false] {
                let mut y = vec![0.5f32; n];
                if fast {
                    sparse_rows(&mut y, &w, &nz);
                } else {
                    sparse_rows_body::<false>(&mut y, &w, &nz);
                }
                for (a, b) in y.iter().zip(&want) {
                    assert!(
                        (*a as f64 - b).abs() < 1e-4,
                        "n={n} fast={fast}: {a} vs {b}"
                    );
                }
            }
        }
        assert!(panels(&[0.0; 40], 1, 40).is_empty());
    }
}
