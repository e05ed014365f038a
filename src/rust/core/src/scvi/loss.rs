//! The scVI reconstruction loss of one cell and its gradient with respect to the decoder's
//! output logits, fused: softmax (`px_scale`), `px_rate = library * px_scale`, and
//! `-log p(x | ...)` summed over genes as scvi-tools' `log_zinb_positive` / `log_nb_positive`
//! (eps 1e-8) compute it.
//!
//! Per gene, with `mu = L s_g`, `t = log(theta + eps) - log(theta + mu + eps)`:
//! * ZINB, x = 0: `l = softplus(-pi + theta t) - softplus(-pi)`
//! * ZINB, x > 0: `l = -softplus(-pi) - pi + theta t + x (log(mu + eps) - log(theta + mu + eps))
//!   + lgamma(x + theta) - lgamma(theta) - lgamma(x + 1)`
//! * NB: the x > 0 formula without the pi terms, for every x.
//!
//! The dense pass evaluates the x = 0 formula for every gene (vectorisable, no branch); the
//! non-zero genes of the cell are then corrected. The lgamma terms depend only on x and the
//! frozen dispersion, so they are precomputed per non-zero ([`lgamma_const`]).

const EPS: f32 = 1e-8;

/// `ln Γ(x)` for x > 0 (Lanczos, g = 7, 9 terms; relative error ~1e-15).
pub fn ln_gamma(x: f64) -> f64 {
    const G: f64 = 7.0;
    const C: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // reflection
        let pi = std::f64::consts::PI;
        return (pi / (pi * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut a = C[0];
    let t = x + G + 0.5;
    for (i, c) in C.iter().enumerate().skip(1) {
        a += c / (x + i as f64);
    }
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + a.ln()
}

/// `lgamma(x + theta) - lgamma(theta) - lgamma(x + 1)`.
pub fn lgamma_const(x: f64, theta: f64) -> f64 {
    ln_gamma(x + theta) - ln_gamma(theta) - ln_gamma(x + 1.0)
}

/// `exp(x)` in f32, branch-free (vectorisable): Cephes' expf polynomial, relative error
/// ~2e-7; 0 below -87, saturating above 88.
#[inline(always)]
pub fn fast_exp(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    // n = round(x / ln 2)
    let n = (x * std::f32::consts::LOG2_E + 12_582_912.0) - 12_582_912.0;
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let r2 = r * r;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let p = p * r2 + r + 1.0;
    p * f32::from_bits(((n as i32 + 127) << 23) as u32)
}

/// `ln(x)` in f32 for x > 0 (normal numbers), branch-free: Cephes' logf polynomial, absolute
/// error ~1e-7.
#[inline(always)]
pub fn fast_ln(x: f32) -> f32 {
    let bits = x.to_bits();
    let mut e = ((bits >> 23) & 0xff) as i32 - 126;
    // mantissa in [0.5, 1)
    let mut m = f32::from_bits((bits & 0x007f_ffff) | 0x3f00_0000);
    // m < sqrt(1/2): use 2m and e - 1
    let small = m < std::f32::consts::FRAC_1_SQRT_2;
    e -= small as i32;
    m = if small { m + m - 1.0 } else { m - 1.0 };
    let z = m * m;
    let y = ((((((((7.037_683_6e-2 * m - 1.151_461e-1) * m + 1.167_699_9e-1) * m
        - 1.242_014_1e-1)
        * m
        + 1.424_932_3e-1)
        * m
        - 1.666_805_8e-1)
        * m
        + 2.000_071_4e-1)
        * m
        - 2.499_999_4e-1)
        * m
        + 3.333_333e-1)
        * m
        * z;
    let ef = e as f32;
    y + ef * -2.121_944_4e-4 - 0.5 * z + m + ef * 0.693_359_4
}

/// `softplus(x) = ln(1 + e^x)` and `sigmoid(x)` from one exponential, branch-free
/// (vectorisable); agrees with torch's softplus (threshold 20) to ~2e-9 absolute.
#[inline(always)]
pub(crate) fn softplus_sigmoid(x: f32) -> (f32, f32) {
    let e = fast_exp(-x.abs());
    let inv = 1.0 / (1.0 + e);
    let sp = x.max(0.0) + fast_ln(1.0 + e);
    let sig = if x >= 0.0 { inv } else { e * inv };
    (sp, sig)
}

/// Per-gene constants of the frozen decoder output: the dispersion and (optionally) the
/// biases of the `px_scale` / `px_dropout` heads, which the loss adds to the logits it is
/// given (so that the head GEMM can overwrite its output instead of accumulating onto a
/// bias copy).
#[derive(Debug, Clone)]
pub struct Dispersion {
    pub theta: Vec<f32>,
    /// `log(theta + eps)`
    pub log_theta: Vec<f32>,
    /// bias of the `px_scale` logits (empty: none)
    pub bias_scale: Vec<f32>,
    /// bias of the `px_dropout` logits (empty: none)
    pub bias_pi: Vec<f32>,
}

impl Dispersion {
    pub fn new(px_r: &[f32]) -> Self {
        let theta: Vec<f32> = px_r.iter().map(|r| r.exp()).collect();
        let log_theta = theta.iter().map(|t| (t + EPS).ln()).collect();
        Dispersion {
            theta,
            log_theta,
            bias_scale: Vec::new(),
            bias_pi: Vec::new(),
        }
    }

    /// With the heads' biases (each empty or one per gene) added to the logits by the loss.
    pub fn with_bias(px_r: &[f32], bias_scale: &[f32], bias_pi: &[f32]) -> Self {
        let mut d = Dispersion::new(px_r);
        d.bias_scale = bias_scale.to_vec();
        d.bias_pi = bias_pi.to_vec();
        d
    }
}

/// Adds the heads' biases of `disp` (if any) to the logits.
#[inline]
pub(crate) fn add_bias(a: &mut [f32], pi: Option<&mut [f32]>, disp: &Dispersion) {
    if !disp.bias_scale.is_empty() {
        for (v, b) in a.iter_mut().zip(&disp.bias_scale) {
            *v += b;
        }
    }
    if let Some(pi) = pi {
        if !disp.bias_pi.is_empty() {
            for (v, b) in pi.iter_mut().zip(&disp.bias_pi) {
                *v += b;
            }
        }
    }
}

/// One cell's counts: the non-zero genes, their counts and the sum of their lgamma constants.
pub struct CellCounts<'a> {
    pub genes: &'a [u32],
    pub x: &'a [f32],
    /// the sum over the non-zeros of `lgamma(x + theta) - lgamma(theta) - lgamma(x + 1)`
    pub lgc: f64,
    /// observed library size (sum of counts)
    pub library: f32,
}

/// Scratch buffers of [`cell_loss_grad`], reused across cells.
#[derive(Debug, Default, Clone)]
pub struct LossScratch {
    /// softmax (`px_scale`), length G
    pub(crate) s: Vec<f32>,
    /// per-gene log-likelihood terms, length G
    pub(crate) l: Vec<f32>,
    /// the non-zero genes' inputs and outputs, gathered
    pub(crate) nz: [Vec<f32>; 6],
}

impl LossScratch {
    pub fn new(n_genes: usize) -> Self {
        LossScratch {
            s: vec![0.0; n_genes],
            l: vec![0.0; n_genes],
            nz: Default::default(),
        }
    }

    /// Sizes the per-gene buffers for `n_genes` (a no-op when they already fit).
    pub(crate) fn fit(&mut self, n_genes: usize) {
        if self.s.len() != n_genes {
            *self = LossScratch::new(n_genes);
        }
    }
}

/// Sizes the six gather buffers to the cell's non-zeros and fills the first three with
/// `mu = library * s`, theta and log theta at the non-zero genes; returns their number.
pub(crate) fn gather_nonzeros(
    cell: &CellCounts,
    s: &[f32],
    theta: &[f32],
    lth: &[f32],
    nz: &mut [Vec<f32>; 6],
) -> usize {
    let k = cell.genes.len();
    for v in nz.iter_mut() {
        v.clear();
        v.resize(k, 0.0);
    }
    let [n_mu, n_th, n_lth, ..] = nz;
    for (i, &g) in cell.genes.iter().enumerate() {
        let g = g as usize;
        n_mu[i] = cell.library * s[g];
        n_th[i] = theta[g];
        n_lth[i] = lth[g];
    }
    k
}

/// Sum of `v` with 16 f32 lanes per 256-value block, blocks added in f64.
#[inline(always)]
fn lane_sum(v: &[f32]) -> f64 {
    let mut total = 0.0f64;
    for blk in v.chunks(256) {
        let mut acc = [0.0f32; 16];
        let mut it = blk.chunks_exact(16);
        for c in &mut it {
            for (a, &x) in acc.iter_mut().zip(c) {
                *a += x;
            }
        }
        for (a, &x) in acc.iter_mut().zip(it.remainder()) {
            *a += x;
        }
        total += acc.iter().map(|&a| a as f64).sum::<f64>();
    }
    total
}

#[inline(always)]
fn lane_max(v: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    let mut it = v.chunks_exact(16);
    for c in &mut it {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a = if x > *a { x } else { *a };
        }
    }
    let mut m = it
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    for a in acc {
        m = m.max(a);
    }
    m
}

/// Reconstruction loss (`-log p(x|z)`, summed over genes) of one cell. `a` (the `px_scale`
/// logits, length G) and `pi` (the zero-inflation logits, ZINB only) come without the heads'
/// biases of `disp` (which are added here); on return they hold `grad_scale` times the
/// gradients of the loss with respect to them.
pub fn cell_loss_grad(
    a: &mut [f32],
    pi: Option<&mut [f32]>,
    scratch: &mut LossScratch,
    cell: &CellCounts,
    disp: &Dispersion,
    grad_scale: f32,
) -> f64 {
    #[cfg(all(target_arch = "x86_64", scannot_avx512))]
    {
        if crate::scvi::simd::avx512() {
            // SAFETY: the CPU has AVX-512 F/DQ/VL (checked at run time).
            return unsafe {
                super::loss_avx512::cell_loss_grad_avx512(a, pi, scratch, cell, disp, grad_scale)
            };
        }
    }
    #[cfg(target_arch = "x86_64")]
    {
        if crate::scvi::simd::avx2_fma() {
            // SAFETY: the CPU has AVX2 and FMA (checked at run time).
            return unsafe {
                super::loss_avx2::cell_loss_grad_avx2(a, pi, scratch, cell, disp, grad_scale)
            };
        }
    }
    cell_loss_grad_body(a, pi, scratch, cell, disp, grad_scale)
}

/// The loss in passes without loop-carried dependencies (so they vectorise): softmax, the
/// x = 0 formula for every gene, then the non-zero genes gathered, corrected and scattered
/// back; sums are taken lane-wise afterwards.
pub(crate) fn cell_loss_grad_body(
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
    let mut pi = pi;
    add_bias(a, pi.as_deref_mut(), disp);
    let LossScratch { s, l, nz } = scratch;
    // softmax
    let m = lane_max(a);
    for (sv, &av) in s.iter_mut().zip(a.iter()) {
        *sv = fast_exp(av - m);
    }
    let inv = (1.0 / lane_sum(s)) as f32;
    for sv in s.iter_mut() {
        *sv *= inv;
    }
    let k = gather_nonzeros(cell, s, theta, lth, nz);
    let [n_mu, n_th, n_lth, n_pi, n_q, n_l] = nz;
    let ll = match pi {
        Some(pi) => {
            for (i, &g) in cell.genes.iter().enumerate() {
                n_pi[i] = pi[g as usize];
            }
            // x > 0 minus x = 0 log-likelihood (n_l), loss gradient w.r.t. log mu (n_q) and
            // w.r.t. pi (n_pi)
            for i in 0..k {
                let (th, p, mu, x) = (n_th[i], n_pi[i], n_mu[i], cell.x[i]);
                let tm = th + mu + EPS;
                let lt = fast_ln(tm);
                let t = n_lth[i] - lt;
                let w = -p + th * t;
                let (sp_w, _) = softplus_sigmoid(w);
                // l1 - l0 = -p + th t + x (ln(mu) - lt) - softplus(w)  (softplus(-pi) cancels)
                n_l[i] = -p + th * t + x * (fast_ln(mu + EPS) - lt) - sp_w;
                n_q[i] = (th / tm - x / (mu + EPS) + x / tm) * mu;
                let (_, sig_p) = softplus_sigmoid(p);
                n_pi[i] = sig_p * grad_scale;
            }
            for (((av, pv), lv), ((&sv, &th), &lt_)) in a
                .iter_mut()
                .zip(pi.iter_mut())
                .zip(l.iter_mut())
                .zip(s.iter().zip(theta).zip(lth))
            {
                let mu = lib * sv;
                let tm = th + mu + EPS;
                let t = lt_ - fast_ln(tm);
                let p = *pv;
                let w = -p + th * t;
                let (sp_w, sig_w) = softplus_sigmoid(w);
                let (sp_np, sig_np) = softplus_sigmoid(-p);
                *lv = sp_w - sp_np;
                // d(-l0)/d log mu = sigmoid(w) theta mu / (theta + mu + eps)
                *av = sig_w * th / tm * mu;
                // d(-l0)/dpi = sigmoid(w) - sigmoid(-pi)
                *pv = (sig_w - sig_np) * grad_scale;
            }
            for (i, &g) in cell.genes.iter().enumerate() {
                let g = g as usize;
                std::mem::swap(&mut a[g], &mut n_q[i]);
                pi[g] = n_pi[i];
            }
            lane_sum(l) + lane_sum(n_l)
        }
        None => {
            for i in 0..k {
                let (th, mu, x) = (n_th[i], n_mu[i], cell.x[i]);
                let tm = th + mu + EPS;
                n_l[i] = x * (fast_ln(mu + EPS) - fast_ln(tm));
                n_q[i] = (th / tm - x / (mu + EPS) + x / tm) * mu;
            }
            for ((av, lv), ((&sv, &th), &lt_)) in a
                .iter_mut()
                .zip(l.iter_mut())
                .zip(s.iter().zip(theta).zip(lth))
            {
                let mu = lib * sv;
                let tm = th + mu + EPS;
                *lv = th * (lt_ - fast_ln(tm));
                *av = th / tm * mu;
            }
            for (i, &g) in cell.genes.iter().enumerate() {
                std::mem::swap(&mut a[g as usize], &mut n_q[i]);
            }
            lane_sum(l) + lane_sum(n_l)
        }
    };
    let lgc = cell.lgc;
    // sum of q over genes: the dense values with the non-zero genes' swapped in
    let q_sum = lane_sum(a) as f32;
    for (av, &sv) in a.iter_mut().zip(s.iter()) {
        *av = (*av - sv * q_sum) * grad_scale;
    }
    -(ll + lgc)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Straightforward f64 reference of -log p(x) for logits a, pi.
    fn reference(a: &[f64], pi: Option<&[f64]>, x: &[f64], theta: &[f64]) -> f64 {
        let eps = 1e-8;
        let m = a.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = a.iter().map(|v| (v - m).exp()).collect();
        let s: f64 = e.iter().sum();
        let lib: f64 = x.iter().sum();
        let sp = |v: f64| if v > 20.0 { v } else { v.exp().ln_1p() };
        let mut ll = 0.0;
        for g in 0..a.len() {
            let mu = lib * e[g] / s;
            let th = theta[g];
            let t = (th + eps).ln() - (th + mu + eps).ln();
            let nb =
                th * t + x[g] * ((mu + eps).ln() - (th + mu + eps).ln()) + lgamma_const(x[g], th);
            ll += match pi {
                None => nb,
                Some(pi) => {
                    let p = pi[g];
                    if x[g] < eps {
                        sp(-p + th * t) - sp(-p)
                    } else {
                        -sp(-p) - p + nb
                    }
                }
            };
        }
        -ll
    }

    #[test]
    fn fast_exp_and_ln_are_accurate() {
        let mut x = -80.0f32;
        while x < 80.0 {
            let (a, b) = (fast_exp(x) as f64, (x as f64).exp());
            assert!((a - b).abs() <= 4e-7 * b, "exp({x}): {a} vs {b}");
            x += 0.0137;
        }
        assert_eq!(fast_exp(-200.0), 0.0f32.max(fast_exp(-200.0)));
        assert!(fast_exp(-200.0) < 1e-37);
        let mut x = 1e-30f32;
        while x < 1e30 {
            let (a, b) = (fast_ln(x) as f64, (x as f64).ln());
            assert!(
                (a - b).abs() <= 2e-7 * b.abs().max(1.0),
                "ln({x}): {a} vs {b}"
            );
            x *= 1.0371;
        }
        let r = std::f32::consts::FRAC_1_SQRT_2;
        // around the mantissa split at 1/sqrt(2)
        let (rb, one) = (r.to_bits(), 1.0f32.to_bits());
        let below_above = [
            f32::from_bits(rb - 1),
            f32::from_bits(rb + 1),
            f32::from_bits(one + 1),
        ];
        for x in [0.5f32, r, 1.0, 2.0, 3.0].into_iter().chain(below_above) {
            assert!(
                (fast_ln(x) as f64 - (x as f64).ln()).abs() < 2e-7,
                "ln({x})"
            );
        }
    }

    #[test]
    fn ln_gamma_values() {
        assert!((ln_gamma(1.0)).abs() < 1e-13);
        assert!((ln_gamma(5.0) - 24f64.ln()).abs() < 1e-12);
        assert!((ln_gamma(0.5) - std::f64::consts::PI.sqrt().ln()).abs() < 1e-12);
        assert!((ln_gamma(0.1) - 2.252_712_651_734_206).abs() < 1e-12);
        // math.lgamma(1000.5)
        assert!((ln_gamma(1000.5) - 5_908.674_175_848_678).abs() < 1e-9);
    }

    fn case(zinb: bool) {
        let n = 30;
        let x: Vec<f64> = (0..n)
            .map(|g| if g % 3 == 0 { (g % 7) as f64 } else { 0.0 })
            .collect();
        let a: Vec<f64> = (0..n).map(|g| ((g * 37 % 11) as f64 - 5.0) * 0.3).collect();
        let pi: Vec<f64> = (0..n).map(|g| ((g * 13 % 7) as f64 - 3.0) * 0.5).collect();
        let px_r: Vec<f32> = (0..n).map(|g| ((g % 5) as f32 - 2.0) * 0.6).collect();
        let theta: Vec<f64> = px_r.iter().map(|&r| (r as f64).exp()).collect();
        let disp = Dispersion::new(&px_r);
        let genes: Vec<u32> = (0..n as u32).filter(|&g| x[g as usize] > 0.0).collect();
        let xs: Vec<f32> = genes.iter().map(|&g| x[g as usize] as f32).collect();
        let lgc: Vec<f64> = genes
            .iter()
            .map(|&g| lgamma_const(x[g as usize], disp.theta[g as usize] as f64))
            .collect();
        let cell = CellCounts {
            genes: &genes,
            x: &xs,
            lgc: lgc.iter().sum(),
            library: x.iter().sum::<f64>() as f32,
        };
        let mut af: Vec<f32> = a.iter().map(|&v| v as f32).collect();
        let mut pf: Vec<f32> = pi.iter().map(|&v| v as f32).collect();
        let mut s = LossScratch::new(n);
        let loss = cell_loss_grad(
            &mut af,
            if zinb { Some(&mut pf) } else { None },
            &mut s,
            &cell,
            &disp,
            1.0,
        );
        let pr = if zinb { Some(&pi[..]) } else { None };
        let r = reference(&a, pr, &x, &theta);
        assert!((loss - r).abs() < 1e-4 * r.abs().max(1.0), "{loss} vs {r}");
        let h = 1e-5;
        for g in 0..n {
            let mut ap = a.clone();
            ap[g] += h;
            let mut am = a.clone();
            am[g] -= h;
            let fd = (reference(&ap, pr, &x, &theta) - reference(&am, pr, &x, &theta)) / (2.0 * h);
            assert!(
                (af[g] as f64 - fd).abs() < 1e-4 + 1e-3 * fd.abs(),
                "a[{g}]: {} vs {fd}",
                af[g]
            );
            if zinb {
                let mut pp = pi.clone();
                pp[g] += h;
                let mut pm = pi.clone();
                pm[g] -= h;
                let fd = (reference(&a, Some(&pp), &x, &theta)
                    - reference(&a, Some(&pm), &x, &theta))
                    / (2.0 * h);
                assert!(
                    (pf[g] as f64 - fd).abs() < 1e-4 + 1e-3 * fd.abs(),
                    "pi[{g}]"
                );
            }
        }
    }

    /// Every SIMD path the CPU has (AVX2, AVX-512) against the portable body, on gene counts
    /// that leave partial 8- and 16-lane blocks, with and without non-zeros and heads'
    /// biases.
    #[test]
    fn simd_and_portable_paths_agree() {
        use rand::{RngExt, SeedableRng};
        type Kernel = unsafe fn(
            &mut [f32],
            Option<&mut [f32]>,
            &mut LossScratch,
            &CellCounts,
            &Dispersion,
            f32,
        ) -> f64;
        #[allow(unused_mut)]
        let mut kernels: Vec<(&str, Kernel)> = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            if crate::scvi::simd::avx2_fma() {
                kernels.push(("avx2", crate::scvi::loss_avx2::cell_loss_grad_avx2));
            }
        }
        #[cfg(all(target_arch = "x86_64", scannot_avx512))]
        {
            if crate::scvi::simd::avx512() {
                kernels.push(("avx512", crate::scvi::loss_avx512::cell_loss_grad_avx512));
            }
        }
        // what cell_loss_grad dispatches to, always
        kernels.push(("dispatch", |a, pi, sc, cell, disp, gs| {
            cell_loss_grad(a, pi, sc, cell, disp, gs)
        }));
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for &n in &[1usize, 7, 8, 15, 16, 17, 37, 64, 203] {
            for &zinb in &[true, false] {
                for &density in &[0.0f64, 0.3, 1.0] {
                    for &biased in &[false, true] {
                        let px_r: Vec<f32> = (0..n).map(|_| rng.random_range(-2.0..3.0)).collect();
                        let disp = if biased {
                            let b1: Vec<f32> =
                                (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
                            let b2: Vec<f32> =
                                (0..n).map(|_| rng.random_range(-2.0..2.0)).collect();
                            Dispersion::with_bias(&px_r, &b1, &b2)
                        } else {
                            Dispersion::new(&px_r)
                        };
                        let a0: Vec<f32> = (0..n).map(|_| rng.random_range(-4.0..4.0)).collect();
                        let p0: Vec<f32> = (0..n).map(|_| rng.random_range(-6.0..6.0)).collect();
                        let mut genes = Vec::new();
                        let mut xs = Vec::new();
                        for g in 0..n {
                            if rng.random::<f64>() < density {
                                genes.push(g as u32);
                                xs.push(rng.random_range(1..60) as f32);
                            }
                        }
                        let lgc: Vec<f64> = genes
                            .iter()
                            .zip(&xs)
                            .map(|(&g, &x)| lgamma_const(x as f64, disp.theta[g as usize] as f64))
                            .collect();
                        let cell = CellCounts {
                            genes: &genes,
                            x: &xs,
                            lgc: lgc.iter().sum(),
                            library: xs.iter().sum::<f32>().max(1.0),
                        };
                        let (mut a2, mut p2) = (a0.clone(), p0.clone());
                        let mut sc = LossScratch::default();
                        let pi = if zinb { Some(&mut p2[..]) } else { None };
                        let l2 = cell_loss_grad_body(&mut a2, pi, &mut sc, &cell, &disp, 0.25);
                        for (name, f) in &kernels {
                            let (mut a1, mut p1) = (a0.clone(), p0.clone());
                            let pi = if zinb { Some(&mut p1[..]) } else { None };
                            // SAFETY: the kernels were listed only where the CPU has them.
                            let l1 = unsafe { f(&mut a1, pi, &mut sc, &cell, &disp, 0.25) };
                            let what = format!("{name}: n {n} zinb {zinb} density {density}");
                            assert!(
                                (l1 - l2).abs() <= 2e-5 * l2.abs().max(1.0),
                                "{what}: {l1} vs {l2}"
                            );
                            for (u, v) in a1.iter().zip(&a2).chain(p1.iter().zip(&p2)) {
                                assert!(
                                    (u - v).abs() <= 5e-5 * v.abs().max(1e-2),
                                    "{what}: {u} vs {v}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn zinb_loss_and_gradient_match_finite_differences() {
        case(true);
    }

    #[test]
    fn nb_loss_and_gradient_match_finite_differences() {
        case(false);
    }
}
