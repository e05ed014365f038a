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

#[inline]
fn softplus(x: f32) -> f32 {
    // torch's softplus (beta 1, threshold 20)
    if x > 20.0 {
        x
    } else {
        x.exp().ln_1p()
    }
}

#[inline]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// Per-gene constants of the (frozen) dispersion.
#[derive(Debug, Clone)]
pub struct Dispersion {
    pub theta: Vec<f32>,
    /// `log(theta + eps)`
    pub log_theta: Vec<f32>,
}

impl Dispersion {
    pub fn new(px_r: &[f32]) -> Self {
        let theta: Vec<f32> = px_r.iter().map(|r| r.exp()).collect();
        let log_theta = theta.iter().map(|t| (t + EPS).ln()).collect();
        Dispersion { theta, log_theta }
    }
}

/// One cell's counts: the non-zero genes, their counts and their lgamma constants.
pub struct CellCounts<'a> {
    pub genes: &'a [u32],
    pub x: &'a [f32],
    pub lgc: &'a [f64],
    /// observed library size (sum of counts)
    pub library: f32,
}

/// Reconstruction loss (`-log p(x|z)`, summed over genes) of one cell. On return `a` (the
/// `px_scale` logits, length G) and `pi` (the zero-inflation logits, ZINB only) hold
/// `grad_scale` times the gradients of the loss with respect to them. `s` is scratch of length G.
pub fn cell_loss_grad(
    a: &mut [f32],
    pi: Option<&mut [f32]>,
    s: &mut [f32],
    cell: &CellCounts,
    disp: &Dispersion,
    grad_scale: f32,
) -> f64 {
    let lib = cell.library;
    // softmax
    let m = a.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let mut sum = 0.0f64;
    for (sc, ac) in s.chunks_mut(64).zip(a.chunks(64)) {
        let mut part = 0.0f32;
        for (sv, &av) in sc.iter_mut().zip(ac) {
            let e = fast_exp(av - m);
            *sv = e;
            part += e;
        }
        sum += part as f64;
    }
    let inv = (1.0 / sum) as f32;
    for sv in s.iter_mut() {
        *sv *= inv;
    }
    let theta = &disp.theta;
    let lth = &disp.log_theta;
    let mut ll = 0.0f64;
    match pi {
        Some(pi) => {
            // corrections at the non-zero genes, computed before the dense pass overwrites
            let mut corr = 0.0f64;
            let mut nz_q = Vec::with_capacity(cell.genes.len());
            for ((&g, &x), &c) in cell.genes.iter().zip(cell.x).zip(cell.lgc) {
                let g = g as usize;
                let (th, p) = (theta[g], pi[g]);
                let mu = lib * s[g];
                let lt = (th + mu + EPS).ln();
                let t = lth[g] - lt;
                let sp_np = softplus(-p);
                let w = -p + th * t;
                let l0 = softplus(w) - sp_np;
                let l1 = -sp_np - p + th * t + x * ((mu + EPS).ln() - lt);
                corr += (l1 - l0) as f64 + c;
                // loss gradient (negated log-likelihood gradient)
                let dmu = th / (th + mu + EPS) - x / (mu + EPS) + x / (th + mu + EPS);
                let dpi = sigmoid(p);
                nz_q.push((g, dmu * mu, dpi));
            }
            let mut q_sum = 0.0f64;
            let mut l0_sum = 0.0f64;
            const CH: usize = 64;
            for ((((ac, pc), sc), thc), ltc) in a
                .chunks_mut(CH)
                .zip(pi.chunks_mut(CH))
                .zip(s.chunks(CH))
                .zip(theta.chunks(CH))
                .zip(lth.chunks(CH))
            {
                let (mut qs, mut ls) = (0.0f32, 0.0f32);
                for ((((av, pv), &sv), &th), &lt_) in
                    ac.iter_mut().zip(pc.iter_mut()).zip(sc).zip(thc).zip(ltc)
                {
                    let mu = lib * sv;
                    let tm = th + mu + EPS;
                    let t = lt_ - fast_ln(tm);
                    let p = *pv;
                    let w = -p + th * t;
                    // softplus / sigmoid of w and of -pi from one exp each
                    let ew = fast_exp(-w.abs());
                    let iw = 1.0 / (1.0 + ew);
                    let sp_w = w.max(0.0) + fast_ln(1.0 + ew);
                    let sig_w = if w >= 0.0 { iw } else { ew * iw };
                    let ep = fast_exp(-p.abs());
                    let ip = 1.0 / (1.0 + ep);
                    let sp_np = (-p).max(0.0) + fast_ln(1.0 + ep);
                    let sig_np = if p <= 0.0 { ip } else { ep * ip };
                    ls += sp_w - sp_np;
                    // d(-l0)/dmu = sigmoid(w) theta / (theta + mu + eps)
                    let q = sig_w * th / tm * mu;
                    *av = q;
                    // d(-l0)/dpi = sigmoid(w) - sigmoid(-pi)
                    *pv = (sig_w - sig_np) * grad_scale;
                    qs += q;
                }
                q_sum += qs as f64;
                l0_sum += ls as f64;
            }
            for &(g, q, dpi) in &nz_q {
                q_sum += (q - a[g]) as f64;
                a[g] = q;
                pi[g] = dpi * grad_scale;
            }
            ll += l0_sum + corr;
            let qs = q_sum as f32;
            for (av, &sv) in a.iter_mut().zip(s.iter()) {
                *av = (*av - sv * qs) * grad_scale;
            }
        }
        None => {
            let mut q_sum = 0.0f64;
            let mut l0_sum = 0.0f64;
            for ((av, &sv), (&th, &lt_)) in a.iter_mut().zip(s.iter()).zip(theta.iter().zip(lth)) {
                let mu = lib * sv;
                let tm = th + mu + EPS;
                let t = lt_ - fast_ln(tm);
                l0_sum += (th * t) as f64;
                let q = th / tm * mu;
                *av = q;
                q_sum += q as f64;
            }
            let mut corr = 0.0f64;
            for ((&g, &x), &c) in cell.genes.iter().zip(cell.x).zip(cell.lgc) {
                let g = g as usize;
                let th = theta[g];
                let mu = lib * s[g];
                let tm = th + mu + EPS;
                corr += (x * ((mu + EPS).ln() - tm.ln())) as f64 + c;
                let q = (th / tm - x / (mu + EPS) + x / tm) * mu;
                q_sum += (q - a[g]) as f64;
                a[g] = q;
            }
            ll += l0_sum + corr;
            let qs = q_sum as f32;
            for (av, &sv) in a.iter_mut().zip(s.iter()) {
                *av = (*av - sv * qs) * grad_scale;
            }
        }
    }
    -ll
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
            lgc: &lgc,
            library: x.iter().sum::<f64>() as f32,
        };
        let mut af: Vec<f32> = a.iter().map(|&v| v as f32).collect();
        let mut pf: Vec<f32> = pi.iter().map(|&v| v as f32).collect();
        let mut s = vec![0.0f32; n];
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

    #[test]
    fn zinb_loss_and_gradient_match_finite_differences() {
        case(true);
    }

    #[test]
    fn nb_loss_and_gradient_match_finite_differences() {
        case(false);
    }
}
