//! AVX2 + FMA version of [`super::loss::cell_loss_grad`]: the same passes (softmax, the x = 0
//! formula for every gene, the non-zero genes gathered and corrected) on 8 f32 lanes, with
//! vector versions of the Cephes `expf` / `logf` polynomials that [`super::loss::fast_exp`] /
//! [`super::loss::fast_ln`] use. Results agree with the portable path to f32 rounding (FMA
//! contracts a few products; tested in `loss.rs`).
#![cfg(target_arch = "x86_64")]

use super::loss::{CellCounts, Dispersion, LossScratch};
use std::arch::x86_64::*;

const EPS: f32 = 1e-8;

#[target_feature(enable = "avx2,fma")]
#[inline]
fn splat(x: f32) -> __m256 {
    _mm256_set1_ps(x)
}

/// `exp(x)`, Cephes' expf (as `fast_exp`), 8 lanes.
#[target_feature(enable = "avx2,fma")]
#[inline]
fn exp8(x: __m256) -> __m256 {
    let x = _mm256_min_ps(_mm256_max_ps(x, splat(-87.0)), splat(88.0));
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        x,
        splat(std::f32::consts::LOG2_E),
    ));
    let r = _mm256_fnmadd_ps(n, splat(0.693_359_4), x);
    let r = _mm256_fmadd_ps(n, splat(2.121_944_4e-4), r);
    let r2 = _mm256_mul_ps(r, r);
    let mut p = splat(1.987_569_1e-4);
    p = _mm256_fmadd_ps(p, r, splat(1.398_199_9e-3));
    p = _mm256_fmadd_ps(p, r, splat(8.333_452e-3));
    p = _mm256_fmadd_ps(p, r, splat(4.166_579_6e-2));
    p = _mm256_fmadd_ps(p, r, splat(1.666_666_5e-1));
    p = _mm256_fmadd_ps(p, r, splat(0.5));
    p = _mm256_fmadd_ps(p, r2, _mm256_add_ps(r, splat(1.0)));
    let e = _mm256_slli_epi32::<23>(_mm256_add_epi32(
        _mm256_cvtps_epi32(n),
        _mm256_set1_epi32(127),
    ));
    _mm256_mul_ps(p, _mm256_castsi256_ps(e))
}

/// `ln(x)` for positive normal x, Cephes' logf (as `fast_ln`), 8 lanes.
#[target_feature(enable = "avx2,fma")]
#[inline]
fn ln8(x: __m256) -> __m256 {
    let bits = _mm256_castps_si256(x);
    let e = _mm256_sub_epi32(_mm256_srli_epi32::<23>(bits), _mm256_set1_epi32(126));
    let m = _mm256_castsi256_ps(_mm256_or_si256(
        _mm256_and_si256(bits, _mm256_set1_epi32(0x007f_ffff)),
        _mm256_set1_epi32(0x3f00_0000),
    ));
    let small = _mm256_cmp_ps::<_CMP_LT_OQ>(m, splat(std::f32::consts::FRAC_1_SQRT_2));
    // e - 1 where small (the mask is all ones = -1)
    let e = _mm256_add_epi32(e, _mm256_castps_si256(small));
    let ef = _mm256_cvtepi32_ps(e);
    // m + m - 1 where small, else m - 1
    let m = _mm256_sub_ps(_mm256_add_ps(m, _mm256_and_ps(small, m)), splat(1.0));
    let z = _mm256_mul_ps(m, m);
    let mut y = splat(7.037_683_6e-2);
    y = _mm256_fmadd_ps(y, m, splat(-1.151_461e-1));
    y = _mm256_fmadd_ps(y, m, splat(1.167_699_9e-1));
    y = _mm256_fmadd_ps(y, m, splat(-1.242_014_1e-1));
    y = _mm256_fmadd_ps(y, m, splat(1.424_932_3e-1));
    y = _mm256_fmadd_ps(y, m, splat(-1.666_805_8e-1));
    y = _mm256_fmadd_ps(y, m, splat(2.000_071_4e-1));
    y = _mm256_fmadd_ps(y, m, splat(-2.499_999_4e-1));
    y = _mm256_fmadd_ps(y, m, splat(3.333_333e-1));
    y = _mm256_mul_ps(_mm256_mul_ps(y, m), z);
    y = _mm256_fmadd_ps(ef, splat(-2.121_944_4e-4), y);
    y = _mm256_fnmadd_ps(splat(0.5), z, y);
    _mm256_fmadd_ps(ef, splat(0.693_359_4), _mm256_add_ps(y, m))
}

/// `1 / x` by the hardware estimate refined by one Newton step (~1 ulp; far cheaper than a
/// division).
#[target_feature(enable = "avx2,fma")]
#[inline]
fn recip8(x: __m256) -> __m256 {
    let r = _mm256_rcp_ps(x);
    _mm256_mul_ps(r, _mm256_fnmadd_ps(x, r, splat(2.0)))
}

/// `(softplus(x), sigmoid(x))` from one exponential.
#[target_feature(enable = "avx2,fma")]
#[inline]
fn softplus_sigmoid8(x: __m256) -> (__m256, __m256) {
    let abs = _mm256_andnot_ps(splat(-0.0), x);
    let e = exp8(_mm256_sub_ps(splat(0.0), abs));
    let one_e = _mm256_add_ps(splat(1.0), e);
    let inv = _mm256_div_ps(splat(1.0), one_e);
    let sp = _mm256_add_ps(_mm256_max_ps(x, splat(0.0)), ln8(one_e));
    let nonneg = _mm256_cmp_ps::<_CMP_GE_OQ>(x, splat(0.0));
    let sig = _mm256_blendv_ps(_mm256_mul_ps(e, inv), inv, nonneg);
    (sp, sig)
}

#[target_feature(enable = "avx2,fma")]
#[inline]
fn hsum(v: __m256) -> f64 {
    let mut a = [0.0f32; 8];
    // SAFETY: `a` holds 8 floats.
    unsafe { _mm256_storeu_ps(a.as_mut_ptr(), v) };
    a.iter().map(|&x| x as f64).sum()
}

/// A sum of 8-lane vectors kept in f32 lanes for 32 additions at a time (256 values), then
/// added into an f64 total.
struct Acc {
    v: __m256,
    n: usize,
    total: f64,
}

impl Acc {
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn new() -> Self {
        Acc {
            v: splat(0.0),
            n: 0,
            total: 0.0,
        }
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn add(&mut self, x: __m256) {
        self.v = _mm256_add_ps(self.v, x);
        self.n += 1;
        if self.n == 32 {
            self.total += hsum(self.v);
            self.v = splat(0.0);
            self.n = 0;
        }
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn sum(&self) -> f64 {
        self.total + hsum(self.v)
    }
}

/// Loads 8 lanes at `i` (`i + 8 <= v.len()`).
#[target_feature(enable = "avx2,fma")]
#[inline]
fn ld(v: &[f32], i: usize) -> __m256 {
    assert!(i + 8 <= v.len());
    // SAFETY: bounds checked just above.
    unsafe { _mm256_loadu_ps(v.as_ptr().add(i)) }
}

#[target_feature(enable = "avx2,fma")]
#[inline]
fn st(v: &mut [f32], i: usize, x: __m256) {
    assert!(i + 8 <= v.len());
    // SAFETY: bounds checked just above.
    unsafe { _mm256_storeu_ps(v.as_mut_ptr().add(i), x) }
}

/// Applies `f` to lanes `[i, i + 8)` of the given columns; the last partial block is copied
/// into padded stack buffers (padding `pad` per column) and back.
#[target_feature(enable = "avx2,fma")]
#[inline]
fn blocks<const N: usize>(
    cols: &mut [&mut [f32]; N],
    pad: [f32; N],
    mut f: impl FnMut(&mut [__m256; N]),
) {
    let n = cols[0].len();
    let full = n / 8 * 8;
    let mut i = 0;
    while i < full {
        let mut v = [splat(0.0); N];
        for k in 0..N {
            v[k] = ld(cols[k], i);
        }
        f(&mut v);
        for k in 0..N {
            st(cols[k], i, v[k]);
        }
        i += 8;
    }
    if full < n {
        let r = n - full;
        let mut buf = [[0.0f32; 8]; N];
        let mut v = [splat(0.0); N];
        for k in 0..N {
            buf[k] = [pad[k]; 8];
            buf[k][..r].copy_from_slice(&cols[k][full..]);
            v[k] = ld(&buf[k], 0);
        }
        f(&mut v);
        for k in 0..N {
            st(&mut buf[k], 0, v[k]);
            cols[k][full..].copy_from_slice(&buf[k][..r]);
        }
    }
}

/// See [`super::loss::cell_loss_grad`].
#[target_feature(enable = "avx2,fma")]
pub(crate) fn cell_loss_grad_avx2(
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
    scratch.fit(g_n);
    let LossScratch { s, l: _, nz } = scratch;
    let mut pi = pi;
    // the heads' biases (the portable add on the tail; the max pass below adds them to the
    // full blocks)
    let full = g_n / 8 * 8;
    let has_bs = !disp.bias_scale.is_empty();
    if has_bs {
        for (v, b) in a[full..].iter_mut().zip(&disp.bias_scale[full..g_n]) {
            *v += b;
        }
    }
    if let Some(p) = pi.as_deref_mut() {
        if !disp.bias_pi.is_empty() {
            for (v, b) in p.iter_mut().zip(&disp.bias_pi[..g_n]) {
                *v += b;
            }
        }
    }
    // softmax: max, exp, sum, scale
    let mut mx = splat(f32::NEG_INFINITY);
    let mut i = 0;
    while i < full {
        let mut v = ld(a, i);
        if has_bs {
            v = _mm256_add_ps(v, ld(&disp.bias_scale, i));
            st(a, i, v);
        }
        mx = _mm256_max_ps(mx, v);
        i += 8;
    }
    let it = a.chunks_exact(8);
    let mut lanes = [0.0f32; 8];
    // SAFETY: 8 floats.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), mx) };
    let m = it
        .remainder()
        .iter()
        .chain(&lanes)
        .fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    let mut sum = 0.0f64;
    {
        let vm = splat(m);
        let mut acc = Acc::new();
        let full = g_n / 8 * 8;
        let mut i = 0;
        while i < full {
            let e = exp8(_mm256_sub_ps(ld(a, i), vm));
            st(s, i, e);
            acc.add(e);
            i += 8;
        }
        sum += acc.sum();
        for g in full..g_n {
            let e = super::loss::fast_exp(a[g] - m);
            s[g] = e;
            sum += e as f64;
        }
    }
    let inv = splat((1.0 / sum) as f32);
    blocks(&mut [&mut s[..]], [0.0], |v| {
        v[0] = _mm256_mul_ps(v[0], inv)
    });

    // the non-zero genes, gathered: mu, theta, log theta, pi (ZINB), x
    super::loss::gather_nonzeros(cell, s, theta, lth, nz);
    let [n_mu, n_th, n_lth, n_pi, _, n_x] = nz;
    n_x.copy_from_slice(cell.x);
    let (vlib, veps, vgs) = (splat(lib), splat(EPS), splat(grad_scale));
    let mut ll = 0.0f64;
    let mut lacc = Acc::new();
    match pi {
        Some(pi) => {
            for (i, &g) in cell.genes.iter().enumerate() {
                n_pi[i] = pi[g as usize];
            }
            // per non-zero: (l1 - l0), d/d log mu, d/dpi (padding lanes: finite, masked out of
            // the sum, never scattered)
            let mut nacc = Acc::new();
            blocks(
                &mut [
                    &mut n_mu[..],
                    &mut n_th[..],
                    &mut n_lth[..],
                    &mut n_pi[..],
                    &mut n_x[..],
                ],
                [1.0, 1.0, 0.0, 0.0, 0.0],
                |v| {
                    let [mu, th, lt_, p, x] = *v;
                    let tm = _mm256_add_ps(_mm256_add_ps(th, mu), veps);
                    let lt = ln8(tm);
                    let tht = _mm256_mul_ps(th, _mm256_sub_ps(lt_, lt));
                    let w = _mm256_sub_ps(tht, p);
                    let (sp_w, _) = softplus_sigmoid8(w);
                    let mue = _mm256_add_ps(mu, veps);
                    // l1 - l0 = -p + th t + x (ln(mu + eps) - lt) - softplus(w)
                    let d = _mm256_fmadd_ps(x, _mm256_sub_ps(ln8(mue), lt), _mm256_sub_ps(w, sp_w));
                    // padding lanes have x = 0 but l1 - l0 != 0: zero them via the mask x > 0
                    let real = _mm256_cmp_ps::<_CMP_GT_OQ>(x, splat(0.0));
                    nacc.add(_mm256_and_ps(real, d));
                    // (th / tm - x / (mu + eps) + x / tm) mu
                    let q = _mm256_mul_ps(
                        _mm256_add_ps(
                            _mm256_div_ps(_mm256_add_ps(th, x), tm),
                            _mm256_sub_ps(splat(0.0), _mm256_div_ps(x, mue)),
                        ),
                        mu,
                    );
                    let (_, sig_p) = softplus_sigmoid8(p);
                    v[0] = q;
                    v[3] = _mm256_mul_ps(sig_p, vgs);
                },
            );
            ll += nacc.sum();
            // the x = 0 formula for every gene
            let mut ai = a.chunks_exact_mut(8);
            let mut pii = pi.chunks_exact_mut(8);
            let mut i = 0;
            for (ac, pc) in (&mut ai).zip(&mut pii) {
                let sv = ld(s, i);
                let th = ld(theta, i);
                let lt_ = ld(lth, i);
                let p = ld(pc, 0);
                let mu = _mm256_mul_ps(vlib, sv);
                let tm = _mm256_add_ps(_mm256_add_ps(th, mu), veps);
                let w = _mm256_fmsub_ps(th, _mm256_sub_ps(lt_, ln8(tm)), p);
                // softplus(w) - softplus(-pi) = max(w, 0) - max(-pi, 0) + ln((1 + e_w) / (1 + e_p))
                // with e_w = exp(-|w|), e_p = exp(-|pi|); the sigmoids from the same terms
                let ew = exp8(_mm256_sub_ps(splat(0.0), _mm256_andnot_ps(splat(-0.0), w)));
                let ep = exp8(_mm256_sub_ps(splat(0.0), _mm256_andnot_ps(splat(-0.0), p)));
                let one_ew = _mm256_add_ps(splat(1.0), ew);
                let one_ep = _mm256_add_ps(splat(1.0), ep);
                let inv_w = recip8(one_ew);
                let inv_p = recip8(one_ep);
                let zero = splat(0.0);
                let d = _mm256_sub_ps(
                    _mm256_max_ps(w, zero),
                    _mm256_max_ps(_mm256_sub_ps(zero, p), zero),
                );
                let l0 = _mm256_add_ps(d, ln8(_mm256_mul_ps(one_ew, inv_p)));
                let sig_w = _mm256_blendv_ps(
                    _mm256_mul_ps(ew, inv_w),
                    inv_w,
                    _mm256_cmp_ps::<_CMP_GE_OQ>(w, zero),
                );
                // sigmoid(-pi): 1/(1+e_p) where pi <= 0, else e_p/(1+e_p)
                let sig_np = _mm256_blendv_ps(
                    _mm256_mul_ps(ep, inv_p),
                    inv_p,
                    _mm256_cmp_ps::<_CMP_LE_OQ>(p, zero),
                );
                lacc.add(l0);
                let q = _mm256_mul_ps(_mm256_mul_ps(_mm256_mul_ps(sig_w, th), recip8(tm)), mu);
                st(ac, 0, q);
                st(pc, 0, _mm256_mul_ps(_mm256_sub_ps(sig_w, sig_np), vgs));
                i += 8;
            }
            // scalar tail (G not a multiple of 8)
            for ((av, pv), g) in ai
                .into_remainder()
                .iter_mut()
                .zip(pii.into_remainder())
                .zip(i..)
            {
                let (th, lt_, p) = (theta[g], lth[g], *pv);
                let mu = lib * s[g];
                let tm = th + mu + EPS;
                let w = th * (lt_ - super::loss::fast_ln(tm)) - p;
                let (sp_w, sig_w) = super::loss::softplus_sigmoid(w);
                let (sp_np, sig_np) = super::loss::softplus_sigmoid(-p);
                ll += (sp_w - sp_np) as f64;
                *av = sig_w * th / tm * mu;
                *pv = (sig_w - sig_np) * grad_scale;
            }
            for (i, &g) in cell.genes.iter().enumerate() {
                a[g as usize] = n_mu[i];
                pi[g as usize] = n_pi[i];
            }
        }
        None => {
            let mut nacc = Acc::new();
            blocks(
                &mut [&mut n_mu[..], &mut n_th[..], &mut n_x[..]],
                [1.0, 1.0, 0.0],
                |v| {
                    let [mu, th, x] = *v;
                    let tm = _mm256_add_ps(_mm256_add_ps(th, mu), veps);
                    let mue = _mm256_add_ps(mu, veps);
                    let d = _mm256_mul_ps(x, _mm256_sub_ps(ln8(mue), ln8(tm)));
                    nacc.add(d);
                    let q = _mm256_mul_ps(
                        _mm256_sub_ps(
                            _mm256_div_ps(_mm256_add_ps(th, x), tm),
                            _mm256_div_ps(x, mue),
                        ),
                        mu,
                    );
                    v[0] = q;
                },
            );
            ll += nacc.sum();
            let mut ai = a.chunks_exact_mut(8);
            let mut i = 0;
            for ac in &mut ai {
                let sv = ld(s, i);
                let th = ld(theta, i);
                let lt_ = ld(lth, i);
                let mu = _mm256_mul_ps(vlib, sv);
                let tm = _mm256_add_ps(_mm256_add_ps(th, mu), veps);
                lacc.add(_mm256_mul_ps(th, _mm256_sub_ps(lt_, ln8(tm))));
                st(ac, 0, _mm256_div_ps(_mm256_mul_ps(th, mu), tm));
                i += 8;
            }
            for (av, g) in ai.into_remainder().iter_mut().zip(i..) {
                let th = theta[g];
                let mu = lib * s[g];
                let tm = th + mu + EPS;
                ll += (th * (lth[g] - super::loss::fast_ln(tm))) as f64;
                *av = th / tm * mu;
            }
            for (i, &g) in cell.genes.iter().enumerate() {
                a[g as usize] = n_mu[i];
            }
        }
    }
    ll += lacc.sum();
    let lgc = cell.lgc;
    // a = (q - s sum(q)) * grad_scale
    let mut qacc = Acc::new();
    let mut ai = a.chunks_exact(8);
    for c in &mut ai {
        qacc.add(ld(c, 0));
    }
    let q_sum = qacc.sum() + ai.remainder().iter().map(|&v| v as f64).sum::<f64>();
    let vq = splat(q_sum as f32);
    let mut ai = a.chunks_exact_mut(8);
    let mut i = 0;
    for c in &mut ai {
        let v = _mm256_mul_ps(_mm256_fnmadd_ps(ld(s, i), vq, ld(c, 0)), vgs);
        st(c, 0, v);
        i += 8;
    }
    for (av, g) in ai.into_remainder().iter_mut().zip(i..) {
        *av = (*av - s[g] * q_sum as f32) * grad_scale;
    }
    -(ll + lgc)
}
