//! AVX-512 version of [`super::loss::cell_loss_grad`] (16 f32 lanes, masked tails, 32
//! registers): the same formulas as the AVX2 path ([`super::loss_avx2`]) with fewer passes
//! over the gene-length buffers:
//! 1. the heads' biases added to the logits, and their maximum;
//! 2. `e = exp(a - max)` (unnormalised softmax) and its sum;
//! 3. the non-zero genes, gathered straight from `e`, theta and `pi` (no gather pass);
//! 4. the x = 0 formula for every gene with the normalisation folded in, summing the
//!    gradient w.r.t. log mu on the way;
//! 5. the non-zero genes' values scattered back (correcting that sum), then the softmax
//!    backward `(q - s sum(q)) * grad_scale`.
//!
//! Compiled only with rustc >= 1.89 (`cfg(scannot_avx512)`, see `build.rs`), used where the
//! CPU has AVX-512 F/DQ/VL; agrees with the portable and AVX2 paths to f32 rounding (tested
//! in `loss.rs`).
#![cfg(all(target_arch = "x86_64", scannot_avx512))]
// the AVX-512 intrinsics are stable since 1.89; this module is only compiled there
#![allow(clippy::incompatible_msrv)]

use super::loss::{CellCounts, Dispersion, LossScratch};
use std::arch::x86_64::*;

const EPS: f32 = 1e-8;

macro_rules! avx512 {
    ($($item:item)*) => {
        $(
            #[target_feature(enable = "avx512f,avx512dq,avx512vl,avx2,fma")]
            #[inline]
            $item
        )*
    };
}

avx512! {
fn splat(x: f32) -> __m512 {
    _mm512_set1_ps(x)
}

/// Lanes `[0, min(16, n - i))` set.
fn tail(i: usize, n: usize) -> __mmask16 {
    let r = n - i;
    if r >= 16 {
        0xffff
    } else {
        (1u16 << r) - 1
    }
}

/// Loads the lanes of `k` at `i` (others from `src`).
fn ld(src: __m512, v: &[f32], i: usize, k: __mmask16) -> __m512 {
    assert!(i + k.count_ones() as usize <= v.len());
    // SAFETY: the mask's lanes (a prefix) lie inside `v`, checked just above; masked-off
    // lanes are not accessed.
    unsafe { _mm512_mask_loadu_ps(src, k, v.as_ptr().add(i)) }
}

fn st(v: &mut [f32], i: usize, k: __mmask16, x: __m512) {
    assert!(i + k.count_ones() as usize <= v.len());
    // SAFETY: as in `ld`.
    unsafe { _mm512_mask_storeu_ps(v.as_mut_ptr().add(i), k, x) }
}

/// `v[idx]` for the lanes of `k` (others from `src`); every index must be `< v.len()`
/// (the caller checks the cell's genes once).
fn gather(src: __m512, v: &[f32], idx: __m512i, k: __mmask16) -> __m512 {
    // SAFETY: the indices of the lanes of `k` are < v.len() (checked by the caller).
    unsafe { _mm512_mask_i32gather_ps::<4>(src, k, idx, v.as_ptr().cast()) }
}

/// `exp(x)`, Cephes' expf (as `fast_exp`), 16 lanes.
fn exp16(x: __m512) -> __m512 {
    let x = _mm512_min_ps(_mm512_max_ps(x, splat(-87.0)), splat(88.0));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(x, splat(std::f32::consts::LOG2_E)),
    );
    let r = _mm512_fnmadd_ps(n, splat(0.693_359_4), x);
    let r = _mm512_fmadd_ps(n, splat(2.121_944_4e-4), r);
    let r2 = _mm512_mul_ps(r, r);
    let mut p = splat(1.987_569_1e-4);
    p = _mm512_fmadd_ps(p, r, splat(1.398_199_9e-3));
    p = _mm512_fmadd_ps(p, r, splat(8.333_452e-3));
    p = _mm512_fmadd_ps(p, r, splat(4.166_579_6e-2));
    p = _mm512_fmadd_ps(p, r, splat(1.666_666_5e-1));
    p = _mm512_fmadd_ps(p, r, splat(0.5));
    p = _mm512_fmadd_ps(p, r2, _mm512_add_ps(r, splat(1.0)));
    // p * 2^n (n integral, in [-126, 127])
    _mm512_scalef_ps(p, n)
}

/// `ln(x)` for positive normal x, Cephes' logf (as `fast_ln`), 16 lanes.
fn ln16(x: __m512) -> __m512 {
    let bits = _mm512_castps_si512(x);
    let e = _mm512_sub_epi32(_mm512_srli_epi32::<23>(bits), _mm512_set1_epi32(126));
    let m = _mm512_castsi512_ps(_mm512_or_si512(
        _mm512_and_si512(bits, _mm512_set1_epi32(0x007f_ffff)),
        _mm512_set1_epi32(0x3f00_0000),
    ));
    let small = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(m, splat(std::f32::consts::FRAC_1_SQRT_2));
    // e - 1 and m + m where small
    let e = _mm512_mask_sub_epi32(e, small, e, _mm512_set1_epi32(1));
    let ef = _mm512_cvtepi32_ps(e);
    let m = _mm512_sub_ps(_mm512_mask_add_ps(m, small, m, m), splat(1.0));
    let z = _mm512_mul_ps(m, m);
    let mut y = splat(7.037_683_6e-2);
    y = _mm512_fmadd_ps(y, m, splat(-1.151_461e-1));
    y = _mm512_fmadd_ps(y, m, splat(1.167_699_9e-1));
    y = _mm512_fmadd_ps(y, m, splat(-1.242_014_1e-1));
    y = _mm512_fmadd_ps(y, m, splat(1.424_932_3e-1));
    y = _mm512_fmadd_ps(y, m, splat(-1.666_805_8e-1));
    y = _mm512_fmadd_ps(y, m, splat(2.000_071_4e-1));
    y = _mm512_fmadd_ps(y, m, splat(-2.499_999_4e-1));
    y = _mm512_fmadd_ps(y, m, splat(3.333_333e-1));
    y = _mm512_mul_ps(_mm512_mul_ps(y, m), z);
    y = _mm512_fmadd_ps(ef, splat(-2.121_944_4e-4), y);
    y = _mm512_fnmadd_ps(splat(0.5), z, y);
    _mm512_fmadd_ps(ef, splat(0.693_359_4), _mm512_add_ps(y, m))
}

/// `1 / x`: the 14-bit estimate refined by one Newton step.
fn recip16(x: __m512) -> __m512 {
    let r = _mm512_rcp14_ps(x);
    _mm512_mul_ps(r, _mm512_fnmadd_ps(x, r, splat(2.0)))
}

/// `(softplus(x), sigmoid(x))` from one exponential.
fn softplus_sigmoid16(x: __m512) -> (__m512, __m512) {
    let e = exp16(_mm512_sub_ps(splat(0.0), _mm512_abs_ps(x)));
    let one_e = _mm512_add_ps(splat(1.0), e);
    let inv = _mm512_div_ps(splat(1.0), one_e);
    let sp = _mm512_add_ps(_mm512_max_ps(x, splat(0.0)), ln16(one_e));
    let nonneg = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, splat(0.0));
    (sp, _mm512_mask_blend_ps(nonneg, _mm512_mul_ps(e, inv), inv))
}

fn hsum(v: __m512) -> f64 {
    let mut a = [0.0f32; 16];
    // SAFETY: `a` holds 16 floats.
    unsafe { _mm512_storeu_ps(a.as_mut_ptr(), v) };
    a.iter().map(|&x| x as f64).sum()
}
}

/// A sum of 16-lane vectors kept in f32 lanes for 16 additions at a time (256 values), then
/// added into an f64 total.
struct Acc {
    v: __m512,
    n: usize,
    total: f64,
}

impl Acc {
    avx512! {
    fn new() -> Self {
        Acc {
            v: splat(0.0),
            n: 0,
            total: 0.0,
        }
    }

    /// Adds the lanes of `k`.
    fn add(&mut self, x: __m512, k: __mmask16) {
        self.v = _mm512_mask_add_ps(self.v, k, self.v, x);
        self.n += 1;
        if self.n == 16 {
            self.total += hsum(self.v);
            self.v = splat(0.0);
            self.n = 0;
        }
    }

    fn sum(&self) -> f64 {
        self.total + hsum(self.v)
    }
    }
}

/// See [`super::loss::cell_loss_grad`].
#[target_feature(enable = "avx512f,avx512dq,avx512vl,avx2,fma")]
pub(crate) fn cell_loss_grad_avx512(
    a: &mut [f32],
    pi: Option<&mut [f32]>,
    scratch: &mut LossScratch,
    cell: &CellCounts,
    disp: &Dispersion,
    grad_scale: f32,
) -> f64 {
    let g_n = a.len();
    let lib = cell.library;
    let theta = &disp.theta[..g_n];
    let lth = &disp.log_theta[..g_n];
    let bs = (!disp.bias_scale.is_empty()).then(|| &disp.bias_scale[..g_n]);
    let bp = (!disp.bias_pi.is_empty()).then(|| &disp.bias_pi[..g_n]);
    let mut pi = pi;
    if let Some(p) = pi.as_deref() {
        assert_eq!(p.len(), g_n);
    }
    let k_nz = cell.genes.len();
    assert_eq!(cell.x.len(), k_nz);
    // the gathers below rely on this
    assert!(cell.genes.iter().fold(0u32, |m, &g| m.max(g)) < g_n as u32 || k_nz == 0);
    scratch.fit(g_n);
    let LossScratch { s, l: _, nz } = scratch;
    let (zero, one) = (splat(0.0), splat(1.0));

    // 1. biases and the maximum
    let mut mx = splat(f32::NEG_INFINITY);
    let mut i = 0;
    while i < g_n {
        let k = tail(i, g_n);
        let mut v = ld(splat(f32::NEG_INFINITY), a, i, k);
        if let Some(b) = bs {
            v = _mm512_add_ps(v, ld(zero, b, i, k));
            st(a, i, k, v);
        }
        mx = _mm512_max_ps(mx, v);
        if let (Some(p), Some(b)) = (pi.as_deref_mut(), bp) {
            let v = _mm512_add_ps(ld(zero, p, i, k), ld(zero, b, i, k));
            st(p, i, k, v);
        }
        i += 16;
    }
    let m = _mm512_reduce_max_ps(mx);

    // 2. unnormalised softmax and its sum
    let vm = splat(m);
    let mut acc = Acc::new();
    let mut i = 0;
    while i < g_n {
        let k = tail(i, g_n);
        let e = exp16(_mm512_sub_ps(ld(zero, a, i, k), vm));
        st(s, i, k, e);
        acc.add(e, k);
        i += 16;
    }
    let inv_sum = (1.0 / acc.sum()) as f32;
    // mu = library * s = (library / sum) * e
    let lib_inv = lib * inv_sum;
    let (vlib, veps, vgs) = (splat(lib_inv), splat(EPS), splat(grad_scale));

    // 3. the non-zero genes: (l1 - l0), q = d/d log mu, and (ZINB) d/dpi
    for v in nz.iter_mut().take(2) {
        v.clear();
        v.resize(k_nz, 0.0);
    }
    let [n_q, n_p, ..] = nz;
    let mut nacc = Acc::new();
    let mut qnew = Acc::new();
    let mut i = 0;
    while i < k_nz {
        let k = tail(i, k_nz);
        // SAFETY: the lanes of `k` lie inside `cell.genes` (a prefix of the 16 from i).
        let idx = unsafe { _mm512_maskz_loadu_epi32(k, cell.genes.as_ptr().add(i).cast()) };
        let mu = _mm512_mul_ps(vlib, gather(zero, s, idx, k));
        let th = gather(one, theta, idx, k);
        let x = ld(zero, cell.x, i, k);
        let tm = _mm512_add_ps(_mm512_add_ps(th, mu), veps);
        let lt = ln16(tm);
        let mue = _mm512_add_ps(mu, veps);
        // (th / tm - x / (mu + eps) + x / tm) mu
        let q = _mm512_mul_ps(
            _mm512_sub_ps(
                _mm512_div_ps(_mm512_add_ps(th, x), tm),
                _mm512_div_ps(x, mue),
            ),
            mu,
        );
        st(n_q, i, k, q);
        qnew.add(q, k);
        match pi.as_deref() {
            Some(p) => {
                let lt_ = gather(zero, lth, idx, k);
                let pv = gather(zero, p, idx, k);
                let w = _mm512_sub_ps(_mm512_mul_ps(th, _mm512_sub_ps(lt_, lt)), pv);
                let (sp_w, _) = softplus_sigmoid16(w);
                // l1 - l0 = -p + th t + x (ln(mu + eps) - lt) - softplus(w)
                let d = _mm512_fmadd_ps(x, _mm512_sub_ps(ln16(mue), lt), _mm512_sub_ps(w, sp_w));
                nacc.add(d, k);
                let (_, sig_p) = softplus_sigmoid16(pv);
                st(n_p, i, k, _mm512_mul_ps(sig_p, vgs));
            }
            None => {
                nacc.add(_mm512_mul_ps(x, _mm512_sub_ps(ln16(mue), lt)), k);
            }
        }
        i += 16;
    }
    let mut ll = nacc.sum();

    // 4. the x = 0 formula for every gene; q summed on the way
    let mut lacc = Acc::new();
    let mut qacc = Acc::new();
    let mut i = 0;
    match pi.as_deref_mut() {
        Some(pi) => {
            while i < g_n {
                let k = tail(i, g_n);
                let th = ld(one, theta, i, k);
                let lt_ = ld(zero, lth, i, k);
                let p = ld(zero, pi, i, k);
                let mu = _mm512_mul_ps(vlib, ld(zero, s, i, k));
                let tm = _mm512_add_ps(_mm512_add_ps(th, mu), veps);
                let w = _mm512_fmsub_ps(th, _mm512_sub_ps(lt_, ln16(tm)), p);
                // softplus(w) - softplus(-pi) = max(w, 0) - max(-pi, 0) + ln((1 + e_w) / (1 + e_p))
                // with e_w = exp(-|w|), e_p = exp(-|pi|); the sigmoids from the same terms
                let ew = exp16(_mm512_sub_ps(zero, _mm512_abs_ps(w)));
                let ep = exp16(_mm512_sub_ps(zero, _mm512_abs_ps(p)));
                let one_ew = _mm512_add_ps(one, ew);
                let one_ep = _mm512_add_ps(one, ep);
                let inv_w = recip16(one_ew);
                let inv_p = recip16(one_ep);
                let d = _mm512_sub_ps(
                    _mm512_max_ps(w, zero),
                    _mm512_max_ps(_mm512_sub_ps(zero, p), zero),
                );
                lacc.add(_mm512_add_ps(d, ln16(_mm512_mul_ps(one_ew, inv_p))), k);
                let sig_w = _mm512_mask_blend_ps(
                    _mm512_cmp_ps_mask::<_CMP_GE_OQ>(w, zero),
                    _mm512_mul_ps(ew, inv_w),
                    inv_w,
                );
                // sigmoid(-pi): 1/(1+e_p) where pi <= 0, else e_p/(1+e_p)
                let sig_np = _mm512_mask_blend_ps(
                    _mm512_cmp_ps_mask::<_CMP_LE_OQ>(p, zero),
                    _mm512_mul_ps(ep, inv_p),
                    inv_p,
                );
                let q = _mm512_mul_ps(_mm512_mul_ps(_mm512_mul_ps(sig_w, th), recip16(tm)), mu);
                qacc.add(q, k);
                st(a, i, k, q);
                st(pi, i, k, _mm512_mul_ps(_mm512_sub_ps(sig_w, sig_np), vgs));
                i += 16;
            }
        }
        None => {
            while i < g_n {
                let k = tail(i, g_n);
                let th = ld(one, theta, i, k);
                let lt_ = ld(zero, lth, i, k);
                let mu = _mm512_mul_ps(vlib, ld(zero, s, i, k));
                let tm = _mm512_add_ps(_mm512_add_ps(th, mu), veps);
                lacc.add(_mm512_mul_ps(th, _mm512_sub_ps(lt_, ln16(tm))), k);
                let q = _mm512_div_ps(_mm512_mul_ps(th, mu), tm);
                qacc.add(q, k);
                st(a, i, k, q);
                i += 16;
            }
        }
    }
    ll += lacc.sum();

    // 5. scatter the non-zero genes' values (swapping them into the sum of q), then
    // a = (q - s sum(q)) * grad_scale
    // (four partial sums: no single chain of dependent additions)
    let mut q_old = [0.0f64; 4];
    for (gs, qs) in cell.genes.chunks(4).zip(n_q.chunks(4)) {
        for ((acc, &g), &q) in q_old.iter_mut().zip(gs).zip(qs) {
            let g = g as usize;
            *acc += a[g] as f64;
            a[g] = q;
        }
    }
    if let Some(pi) = pi {
        for (&g, &p) in cell.genes.iter().zip(n_p.iter()) {
            pi[g as usize] = p;
        }
    }
    let q_sum = qacc.sum() - q_old.iter().sum::<f64>() + qnew.sum();
    // s = e / sum(e)
    let vq = splat(q_sum as f32 * inv_sum);
    let mut i = 0;
    while i < g_n {
        let k = tail(i, g_n);
        let v = _mm512_mul_ps(
            _mm512_fnmadd_ps(ld(zero, s, i, k), vq, ld(zero, a, i, k)),
            vgs,
        );
        st(a, i, k, v);
        i += 16;
    }
    -(ll + cell.lgc)
}
