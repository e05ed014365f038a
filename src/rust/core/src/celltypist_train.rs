//! CellTypist training (`celltypist.train`, spec section 4.4): StandardScaler, clip at +10,
//! one-vs-rest L2 logistic regression (L-BFGS) or SGD (`SGDClassifier(loss='log_loss')`, with
//! optional mini-batches), and the optional two-round feature selection.
//!
//! The scaled matrix `X' = min((X - mean) / scale, 10)` is dense in CellTypist (a copy of the
//! whole training set). Here it is never formed: `X' = Z - 1 muᵀ` with `mu = mean / scale`
//! and `Z` sparse with the pattern of `X` (`z = min((x - mean) / scale, 10) + mu` on stored
//! entries; an unstored zero gives `-mu`, which is never above 10). Products with `X'` are then
//! sparse products plus a rank-one correction, exact in real arithmetic.
//!
//! * [`fit_lbfgs`]: the K one-vs-rest problems of scikit-learn's `LogisticRegression(
//!   multi_class='ovr', solver='lbfgs')`, each minimising `mean(log(1 + exp(-y t))) +
//!   |w|² / (2 C n)` (intercept unpenalised, scikit-learn >= 1.2 scaling) with L-BFGS (memory
//!   10, stop when `max |grad| <= tol` or the relative decrease is below `64 eps`, as scipy's
//!   L-BFGS-B called by scikit-learn). The K problems advance in lock step, so that one pass
//!   over the data evaluates every class (a sparse x dense product with K columns).
//! * [`fit_sgd`]: scikit-learn's plain SGD with `learning_rate='optimal'`, L2 penalty, shuffling,
//!   `tol`/`n_iter_no_change` stopping, or CellTypist's mini-batch loop of `partial_fit` calls.
//!   Seeded (CellTypist's runs are not).

use crate::celltypist::CelltypistModel;
use crate::error::{ScError, ScResult};
use crate::matrix::ExprMatrix;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use std::collections::VecDeque;

/// `StandardScaler` statistics of the training genes.
#[derive(Debug, Clone, PartialEq)]
pub struct Scaler {
    pub mean: Vec<f64>,
    /// Population variance (ddof 0).
    pub var: Vec<f64>,
    /// `sqrt(var)`, 1 for constant genes.
    pub scale: Vec<f64>,
    pub with_mean: bool,
}

/// The scaled training data, cells as rows: `X' = Z - 1 muᵀ` (see the module docs).
#[derive(Debug, Clone)]
pub struct TrainData {
    pub n_cells: usize,
    pub n_genes: usize,
    /// Row pointers of `Z` (cells).
    pub p: Vec<usize>,
    /// Gene index of each stored entry.
    pub j: Vec<u32>,
    pub z: Vec<f64>,
    /// `mean / scale` (zeros without centring).
    pub mu: Vec<f64>,
}

/// Column sums of the genes `rows` over all cells.
pub fn gene_sums(m: &ExprMatrix, rows: &[usize]) -> Vec<f64> {
    let mut pos = vec![usize::MAX; m.nrow()];
    for (k, &r) in rows.iter().enumerate() {
        pos[r] = k;
    }
    let mut s = vec![0.0; rows.len()];
    for_each_entry(m, |_, g, x| {
        let k = pos[g];
        if k != usize::MAX {
            s[k] += x;
        }
    });
    s
}

fn for_each_entry(m: &ExprMatrix, mut f: impl FnMut(usize, usize, f64)) {
    match m {
        ExprMatrix::Csc(c) => {
            for cell in 0..c.ncol() {
                let (i, x) = c.col(cell);
                for (&g, &v) in i.iter().zip(x) {
                    f(cell, g as usize, v);
                }
            }
        }
        ExprMatrix::Dense(d) => {
            for cell in 0..d.ncol() {
                for (g, &v) in d.col(cell).iter().enumerate() {
                    if v != 0.0 {
                        f(cell, g, v);
                    }
                }
            }
        }
    }
}

/// scikit-learn's `StandardScaler().fit` on the cells x `rows` matrix (dense semantics:
/// `var = (sum (x-m)² - (sum (x-m))² / n) / n`; constant genes get scale 1).
pub fn fit_scaler(m: &ExprMatrix, rows: &[usize], with_mean: bool) -> Scaler {
    let n = m.ncol() as f64;
    let mut pos = vec![usize::MAX; m.nrow()];
    for (k, &r) in rows.iter().enumerate() {
        pos[r] = k;
    }
    let g = rows.len();
    let mut sum = vec![0.0; g];
    let mut nnz = vec![0usize; g];
    for_each_entry(m, |_, r, x| {
        let k = pos[r];
        if k != usize::MAX {
            sum[k] += x;
            nnz[k] += 1;
        }
    });
    let mean: Vec<f64> = sum.iter().map(|s| s / n).collect();
    let mut sq = vec![0.0; g];
    let mut corr = vec![0.0; g];
    for_each_entry(m, |_, r, x| {
        let k = pos[r];
        if k != usize::MAX {
            let d = x - mean[k];
            sq[k] += d * d;
            corr[k] += d;
        }
    });
    let nc = m.ncol();
    let mut var = vec![0.0; g];
    for k in 0..g {
        let zeros = (nc - nnz[k]) as f64;
        let s2 = sq[k] + zeros * mean[k] * mean[k];
        let c = corr[k] - zeros * mean[k];
        var[k] = ((s2 - c * c / n) / n).max(0.0);
    }
    let eps = f64::EPSILON;
    let scale = var
        .iter()
        .zip(&mean)
        .map(|(&v, &mu)| {
            let bound = n * eps * v + (n * mu * eps).powi(2);
            let s = v.sqrt();
            if v <= bound || s < 10.0 * eps {
                1.0
            } else {
                s
            }
        })
        .collect();
    Scaler {
        mean,
        var,
        scale,
        with_mean,
    }
}

/// The scaled and clipped training data of the genes `rows` (in that order).
pub fn scale_data(m: &ExprMatrix, rows: &[usize], sc: &Scaler) -> TrainData {
    let mut pos = vec![u32::MAX; m.nrow()];
    for (k, &r) in rows.iter().enumerate() {
        pos[r] = k as u32;
    }
    let mu: Vec<f64> = if sc.with_mean {
        sc.mean.iter().zip(&sc.scale).map(|(m, s)| m / s).collect()
    } else {
        vec![0.0; rows.len()]
    };
    let mut p = vec![0usize; m.ncol() + 1];
    let mut j = Vec::new();
    let mut z = Vec::new();
    let mut last = 0usize;
    for_each_entry(m, |cell, r, x| {
        while last < cell {
            last += 1;
            p[last] = j.len();
        }
        let k = pos[r];
        if k != u32::MAX {
            let k = k as usize;
            let c = if sc.with_mean { sc.mean[k] } else { 0.0 };
            let v = ((x - c) / sc.scale[k]).min(10.0) + mu[k];
            j.push(k as u32);
            z.push(v);
        }
    });
    while last < m.ncol() {
        last += 1;
        p[last] = j.len();
    }
    TrainData {
        n_cells: m.ncol(),
        n_genes: rows.len(),
        p,
        j,
        z,
        mu,
    }
}

impl TrainData {
    /// The same data restricted to the genes `keep` (sorted, in the current indexing).
    pub fn subset_genes(&self, keep: &[usize]) -> TrainData {
        let mut pos = vec![u32::MAX; self.n_genes];
        for (k, &g) in keep.iter().enumerate() {
            pos[g] = k as u32;
        }
        let mut p = Vec::with_capacity(self.n_cells + 1);
        p.push(0);
        let (mut j, mut z) = (Vec::new(), Vec::new());
        for c in 0..self.n_cells {
            for e in self.p[c]..self.p[c + 1] {
                let k = pos[self.j[e] as usize];
                if k != u32::MAX {
                    j.push(k);
                    z.push(self.z[e]);
                }
            }
            p.push(j.len());
        }
        TrainData {
            n_cells: self.n_cells,
            n_genes: keep.len(),
            p,
            j,
            z,
            mu: keep.iter().map(|&g| self.mu[g]).collect(),
        }
    }

    /// Dense cells x genes `X'` (row-major), for tests.
    pub fn to_dense(&self) -> Vec<f64> {
        let g = self.n_genes;
        let mut d = vec![0.0; self.n_cells * g];
        for c in 0..self.n_cells {
            for k in 0..g {
                d[c * g + k] = -self.mu[k];
            }
            for e in self.p[c]..self.p[c + 1] {
                d[c * g + self.j[e] as usize] += self.z[e];
            }
        }
        d
    }
}

/// A fitted linear classifier: `coef` gene-major (`coef[f * n_rows + k]`).
#[derive(Debug, Clone, PartialEq)]
pub struct LinearFit {
    pub n_rows: usize,
    pub coef: Vec<f64>,
    pub intercept: Vec<f64>,
    /// Iterations (L-BFGS: per row; SGD: one value, epochs of the longest row).
    pub n_iter: Vec<i32>,
    /// SGD's `t_` (updates + 1); 0 for L-BFGS.
    pub t: f64,
}

/// The binary targets of the one-vs-rest rows: row `k` is class `k`, or for two classes a
/// single row for class 1 (scikit-learn's binary case).
fn row_classes(n_classes: usize) -> Vec<usize> {
    if n_classes == 2 {
        vec![1]
    } else {
        (0..n_classes).collect()
    }
}

#[inline]
fn softplus(t: f64) -> f64 {
    if t > 0.0 {
        t + (-t).exp().ln_1p()
    } else {
        t.exp().ln_1p()
    }
}

#[inline]
fn sigmoid(t: f64) -> f64 {
    if t >= 0.0 {
        1.0 / (1.0 + (-t).exp())
    } else {
        let e = t.exp();
        e / (1.0 + e)
    }
}

/// Classes evaluated side by side in one SIMD-friendly block.
const LANES: usize = 8;
type Lane = [f64; LANES];

/// Cells per block of the blocked layout.
const BLOCK: usize = 256;

/// The training data in blocks of [`BLOCK`] cells, each block's entries sorted by gene, so
/// that the coefficient and gradient rows are visited in increasing gene order (streamed,
/// and reused by all cells of the block that express the gene) instead of at random.
struct Blocked {
    /// First cell of each block, and the end.
    start: Vec<usize>,
    /// Entry offsets of each block.
    off: Vec<usize>,
    gene: Vec<u32>,
    cell: Vec<u16>,
    z: Vec<f64>,
}

impl Blocked {
    fn new(d: &TrainData) -> Blocked {
        let n = d.n_cells;
        let nblocks = n.div_ceil(BLOCK);
        let mut start: Vec<usize> = (0..nblocks).map(|b| b * BLOCK).collect();
        start.push(n);
        let nnz = d.z.len();
        let mut gene = vec![0u32; nnz];
        let mut cell = vec![0u16; nnz];
        let mut z = vec![0.0; nnz];
        let off: Vec<usize> = (0..=nblocks).map(|b| d.p[start[b.min(nblocks)]]).collect();
        // counting sort by gene within each block (blocks in parallel)
        let mut parts: Vec<(&mut [u32], &mut [u16], &mut [f64])> = Vec::with_capacity(nblocks);
        {
            let (mut g_rest, mut c_rest, mut z_rest) = (&mut gene[..], &mut cell[..], &mut z[..]);
            for b in 0..nblocks {
                let len = off[b + 1] - off[b];
                let (g1, g2) = g_rest.split_at_mut(len);
                let (c1, c2) = c_rest.split_at_mut(len);
                let (z1, z2) = z_rest.split_at_mut(len);
                parts.push((g1, c1, z1));
                g_rest = g2;
                c_rest = c2;
                z_rest = z2;
            }
        }
        parts
            .into_par_iter()
            .enumerate()
            .for_each(|(b, (gs, cs, zs))| {
                let mut count = vec![0usize; d.n_genes + 1];
                let (e0, e1) = (off[b], off[b + 1]);
                for &j in &d.j[e0..e1] {
                    count[j as usize + 1] += 1;
                }
                for k in 1..count.len() {
                    count[k] += count[k - 1];
                }
                for c in start[b]..start[b + 1] {
                    for e in d.p[c]..d.p[c + 1] {
                        let j = d.j[e] as usize;
                        let pos = count[j];
                        count[j] += 1;
                        gs[pos] = j as u32;
                        cs[pos] = (c - start[b]) as u16;
                        zs[pos] = d.z[e];
                    }
                }
            });
        Blocked {
            start,
            off,
            gene,
            cell,
            z,
        }
    }
}

/// Objective and gradient of the problems `rows` (class ids) at `points` (each `G + 1`
/// long, the intercept last), in one pass over the data: the classes are packed in blocks of
/// [`LANES`] (padding lanes are computed and ignored), so that each stored entry updates
/// whole blocks with fixed-width loops.
#[cfg(test)]
fn eval_batch(
    d: &TrainData,
    y: &[usize],
    rows: &[usize],
    points: &[&[f64]],
    c: f64,
) -> Vec<(f64, Vec<f64>)> {
    eval_blocked(d, &Blocked::new(d), y, rows, points, c)
}

fn eval_blocked(
    d: &TrainData,
    bl: &Blocked,
    y: &[usize],
    rows: &[usize],
    points: &[&[f64]],
    c: f64,
) -> Vec<(f64, Vec<f64>)> {
    let a = rows.len();
    let nb = a.div_ceil(LANES).max(1);
    let g = d.n_genes;
    let n = d.n_cells;
    // W gene-major: w[j * nb + b][q] is gene j of class b * LANES + q
    let mut w = vec![[0.0; LANES]; g * nb];
    let mut shift = vec![[0.0; LANES]; nb];
    // class of each lane (usize::MAX for padding: never a target)
    let mut lane_class = vec![[usize::MAX; LANES]; nb];
    for (q, pt) in points.iter().enumerate() {
        let (b, l) = (q / LANES, q % LANES);
        let mut dot = 0.0;
        for j in 0..g {
            w[j * nb + b][l] = pt[j];
            dot += d.mu[j] * pt[j];
        }
        shift[b][l] = pt[g] - dot;
        lane_class[b][l] = rows[q];
    }
    // a fixed split of the cell blocks, summed in order: bit-identical for any thread count
    let nblocks = bl.start.len() - 1;
    let n_chunks = N_CHUNKS.clamp(1, nblocks.max(1));
    let per = nblocks.div_ceil(n_chunks).max(1);
    // accumulators: gradient (g * nb lanes), then per block: sum of residuals, loss
    let acc = (0..nblocks.div_ceil(per))
        .into_par_iter()
        .map(|ch| {
            let mut grad: Vec<Lane> = vec![[0.0; LANES]; g * nb];
            let mut sums: Vec<Lane> = vec![[0.0; LANES]; 2 * nb];
            let mut t: Vec<Lane> = vec![[0.0; LANES]; BLOCK * nb];
            for blk in ch * per..((ch + 1) * per).min(nblocks) {
                let (c0, c1) = (bl.start[blk], bl.start[blk + 1]);
                let ncell = c1 - c0;
                for k in 0..ncell {
                    t[k * nb..(k + 1) * nb].copy_from_slice(&shift);
                }
                let (e0, e1) = (bl.off[blk], bl.off[blk + 1]);
                let (gs, cs, zs) = (&bl.gene[e0..e1], &bl.cell[e0..e1], &bl.z[e0..e1]);
                for ((&j, &cl), &z) in gs.iter().zip(cs).zip(zs) {
                    let wr = &w[j as usize * nb..][..nb];
                    let tr = &mut t[cl as usize * nb..][..nb];
                    for (tb, wb) in tr.iter_mut().zip(wr) {
                        for q in 0..LANES {
                            tb[q] += z * wb[q];
                        }
                    }
                }
                for k in 0..ncell {
                    let yc = y[c0 + k];
                    for b in 0..nb {
                        let tb = &mut t[k * nb + b];
                        for q in 0..LANES {
                            let yq = if lane_class[b][q] == yc { 1.0 } else { 0.0 };
                            let tq = tb[q];
                            sums[nb + b][q] += softplus(tq) - yq * tq;
                            let r = sigmoid(tq) - yq;
                            tb[q] = r;
                            sums[b][q] += r;
                        }
                    }
                }
                for ((&j, &cl), &z) in gs.iter().zip(cs).zip(zs) {
                    let gr = &mut grad[j as usize * nb..][..nb];
                    let tr = &t[cl as usize * nb..][..nb];
                    for (gb, tb) in gr.iter_mut().zip(tr) {
                        for q in 0..LANES {
                            gb[q] += z * tb[q];
                        }
                    }
                }
            }
            (grad, sums)
        })
        .collect::<Vec<_>>()
        .into_iter()
        .reduce(|mut x, y| {
            for (u, v) in x.0.iter_mut().zip(&y.0) {
                for q in 0..LANES {
                    u[q] += v[q];
                }
            }
            for (u, v) in x.1.iter_mut().zip(&y.1) {
                for q in 0..LANES {
                    u[q] += v[q];
                }
            }
            x
        })
        .unwrap_or_else(|| (vec![[0.0; LANES]; g * nb], vec![[0.0; LANES]; 2 * nb]));
    let (gacc, sums) = acc;
    let nf = n as f64;
    let lam = 1.0 / (c * nf);
    (0..a)
        .map(|q| {
            let (b, l) = (q / LANES, q % LANES);
            let pt = points[q];
            let sr = sums[b][l];
            let mut grad = vec![0.0; g + 1];
            let mut ww = 0.0;
            for j in 0..g {
                grad[j] = (gacc[j * nb + b][l] - d.mu[j] * sr) / nf + lam * pt[j];
                ww += pt[j] * pt[j];
            }
            grad[g] = sr / nf;
            (sums[nb + b][l] / nf + 0.5 * lam * ww, grad)
        })
        .collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn max_abs(a: &[f64]) -> f64 {
    a.iter().fold(0.0f64, |m, v| m.max(v.abs()))
}

/// One L-BFGS problem, advanced by the objective values it is fed.
struct Lbfgs {
    x: Vec<f64>,
    f: f64,
    g: Vec<f64>,
    hist: VecDeque<(Vec<f64>, Vec<f64>, f64)>,
    d: Vec<f64>,
    gd: f64,
    alpha: f64,
    trial: Vec<f64>,
    n_ls: usize,
    iter: usize,
    done: bool,
}

const MEMORY: usize = 10;

/// Cell chunks of one objective evaluation (fixed, so that sums do not depend on threads).
const N_CHUNKS: usize = 32;

impl Lbfgs {
    fn direction(&mut self) {
        let mut q: Vec<f64> = self.g.iter().map(|v| -v).collect();
        let mut alphas = Vec::with_capacity(self.hist.len());
        for (s, y, rho) in self.hist.iter().rev() {
            let a = rho * dot(s, &q);
            for (qi, yi) in q.iter_mut().zip(y) {
                *qi -= a * yi;
            }
            alphas.push(a);
        }
        if let Some((s, y, _)) = self.hist.back() {
            let gamma = dot(s, y) / dot(y, y);
            q.iter_mut().for_each(|v| *v *= gamma);
        }
        for ((s, y, rho), a) in self.hist.iter().zip(alphas.iter().rev()) {
            let b = rho * dot(y, &q);
            for (qi, si) in q.iter_mut().zip(s) {
                *qi += (a - b) * si;
            }
        }
        self.gd = dot(&self.g, &q);
        if self.gd >= 0.0 {
            // not a descent direction (numerical trouble): restart with steepest descent
            self.hist.clear();
            q = self.g.iter().map(|v| -v).collect();
            self.gd = dot(&self.g, &q);
        }
        self.alpha = if self.hist.is_empty() {
            1.0 / dot(&q, &q).sqrt().max(1e-300)
        } else {
            1.0
        };
        self.d = q;
        self.n_ls = 0;
        self.set_trial();
    }

    fn set_trial(&mut self) {
        self.trial = self
            .x
            .iter()
            .zip(&self.d)
            .map(|(x, d)| x + self.alpha * d)
            .collect();
    }

    /// Feed the value at `trial`; returns whether another evaluation is needed.
    fn feed(&mut self, f: f64, g: Vec<f64>, tol: f64, max_iter: usize) {
        const C1: f64 = 1e-4;
        let armijo = f <= self.f + C1 * self.alpha * self.gd;
        if !armijo || !f.is_finite() {
            self.n_ls += 1;
            if self.n_ls >= 40 {
                self.done = true;
                return;
            }
            // quadratic interpolation, safeguarded
            let denom = 2.0 * (f - self.f - self.gd * self.alpha);
            let mut a = if denom > 0.0 && f.is_finite() {
                -self.gd * self.alpha * self.alpha / denom
            } else {
                0.5 * self.alpha
            };
            a = a.clamp(0.1 * self.alpha, 0.5 * self.alpha);
            self.alpha = a;
            self.set_trial();
            return;
        }
        let s: Vec<f64> = self.trial.iter().zip(&self.x).map(|(a, b)| a - b).collect();
        let yv: Vec<f64> = g.iter().zip(&self.g).map(|(a, b)| a - b).collect();
        let sy = dot(&s, &yv);
        let f_old = self.f;
        self.x = std::mem::take(&mut self.trial);
        self.f = f;
        self.g = g;
        self.iter += 1;
        if sy > f64::EPSILON * dot(&yv, &yv) {
            if self.hist.len() == MEMORY {
                self.hist.pop_front();
            }
            self.hist.push_back((s, yv, 1.0 / sy));
        }
        let rel = (f_old - f) / f_old.abs().max(f.abs()).max(1.0);
        if max_abs(&self.g) <= tol || rel <= 64.0 * f64::EPSILON || self.iter >= max_iter {
            self.done = true;
            return;
        }
        self.direction();
    }
}

/// One-vs-rest L2 logistic regression by L-BFGS (see the module docs). `y` holds class ids
/// `0..n_classes`.
pub fn fit_lbfgs(
    d: &TrainData,
    y: &[usize],
    n_classes: usize,
    c: f64,
    max_iter: usize,
    tol: f64,
) -> ScResult<LinearFit> {
    if y.len() != d.n_cells {
        return Err(ScError::Dims(format!(
            "{} labels for {} cells",
            y.len(),
            d.n_cells
        )));
    }
    if c.is_nan() || c <= 0.0 {
        return Err(ScError::Input("`C` must be positive".into()));
    }
    let rows = row_classes(n_classes);
    let g = d.n_genes;
    let zero = vec![0.0; g + 1];
    let bl = Blocked::new(d);
    let init = eval_blocked(d, &bl, y, &rows, &vec![zero.as_slice(); rows.len()], c);
    let mut st: Vec<Lbfgs> = init
        .into_iter()
        .map(|(f, grad)| {
            let mut s = Lbfgs {
                x: zero.clone(),
                f,
                g: grad,
                hist: VecDeque::new(),
                d: Vec::new(),
                gd: 0.0,
                alpha: 0.0,
                trial: Vec::new(),
                n_ls: 0,
                iter: 0,
                done: false,
            };
            if max_abs(&s.g) <= tol || max_iter == 0 {
                s.done = true;
            } else {
                s.direction();
            }
            s
        })
        .collect();
    loop {
        let active: Vec<usize> = (0..st.len()).filter(|&k| !st[k].done).collect();
        if active.is_empty() {
            break;
        }
        let cls: Vec<usize> = active.iter().map(|&k| rows[k]).collect();
        let pts: Vec<&[f64]> = active.iter().map(|&k| st[k].trial.as_slice()).collect();
        let res = eval_blocked(d, &bl, y, &cls, &pts, c);
        for (&k, (f, grad)) in active.iter().zip(res) {
            st[k].feed(f, grad, tol, max_iter);
        }
    }
    let nr = rows.len();
    let mut coef = vec![0.0; g * nr];
    for (k, s) in st.iter().enumerate() {
        for j in 0..g {
            coef[j * nr + k] = s.x[j];
        }
    }
    Ok(LinearFit {
        n_rows: nr,
        coef,
        intercept: st.iter().map(|s| s.x[g]).collect(),
        n_iter: st.iter().map(|s| s.iter as i32).collect(),
        t: 0.0,
    })
}

/// SGD settings (scikit-learn `SGDClassifier` + CellTypist's mini-batch loop).
#[derive(Debug, Clone)]
pub struct SgdOptions {
    pub alpha: f64,
    pub max_iter: usize,
    pub tol: f64,
    pub n_iter_no_change: usize,
    pub mini_batch: bool,
    pub batch_number: usize,
    pub batch_size: usize,
    pub epochs: usize,
    pub balance_cell_type: bool,
    pub seed: u64,
}

/// Per-row SGD state: `w = wscale * (v - a mu)` so that a sample costs its stored entries.
struct SgdRow {
    v: Vec<f64>,
    a: f64,
    wscale: f64,
    vmu: f64,
    b: f64,
}

impl SgdRow {
    fn new(g: usize) -> Self {
        SgdRow {
            v: vec![0.0; g],
            a: 0.0,
            wscale: 1.0,
            vmu: 0.0,
            b: 0.0,
        }
    }

    fn weights(&self, mu: &[f64]) -> Vec<f64> {
        self.v
            .iter()
            .zip(mu)
            .map(|(v, m)| self.wscale * (v - self.a * m))
            .collect()
    }

    /// One `_plain_sgd` step on cell `c`; returns the loss before the update.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    fn step(
        &mut self,
        d: &TrainData,
        c: usize,
        zmu: f64,
        mumu: f64,
        y01: f64,
        eta: f64,
        alpha: f64,
    ) -> f64 {
        let (s, e) = (d.p[c], d.p[c + 1]);
        let mut vz = 0.0;
        for k in s..e {
            vz += self.v[d.j[k] as usize] * d.z[k];
        }
        let p = self.wscale * (vz - self.a * zmu - self.vmu + self.a * mumu) + self.b;
        let loss = softplus(p) - y01 * p;
        let dloss = (sigmoid(p) - y01).clamp(-1e12, 1e12);
        let update = -eta * dloss;
        self.wscale *= (1.0 - eta * alpha).max(0.0);
        if update != 0.0 && self.wscale > 0.0 {
            let u = update / self.wscale;
            for k in s..e {
                self.v[d.j[k] as usize] += u * d.z[k];
            }
            self.a += u;
            self.vmu += u * zmu;
            self.b += update;
        } else if update != 0.0 {
            self.b += update;
        }
        if self.wscale < 1e-9 {
            let ws = self.wscale;
            self.v.iter_mut().for_each(|v| *v *= ws);
            self.a *= ws;
            self.vmu *= ws;
            self.wscale = 1.0;
        }
        loss
    }
}

fn shuffle(idx: &mut [usize], rng: &mut ChaCha8Rng) {
    for i in (1..idx.len()).rev() {
        let j = rng.random_range(0..=i);
        idx.swap(i, j);
    }
}

/// One-vs-rest SGD (`SGDClassifier(loss='log_loss')`, learning rate 'optimal', L2); with
/// `mini_batch`, CellTypist's loop of `partial_fit` calls on random batches.
pub fn fit_sgd(
    d: &TrainData,
    y: &[usize],
    n_classes: usize,
    o: &SgdOptions,
) -> ScResult<LinearFit> {
    let n = d.n_cells;
    if y.len() != n {
        return Err(ScError::Dims(format!("{} labels for {n} cells", y.len())));
    }
    if o.alpha.is_nan() || o.alpha <= 0.0 {
        return Err(ScError::Input("`alpha` must be positive".into()));
    }
    let rows = row_classes(n_classes);
    let g = d.n_genes;
    let mumu = dot(&d.mu, &d.mu);
    let zmu: Vec<f64> = (0..n)
        .map(|c| {
            (d.p[c]..d.p[c + 1])
                .map(|k| d.z[k] * d.mu[d.j[k] as usize])
                .sum()
        })
        .collect();
    // 'optimal' schedule: eta = 1 / (alpha (t0 + t - 1)), t0 = 1 / (eta0 alpha),
    // eta0 = typw / max(1, dloss(-typw, 1)) = typw
    let typw = (1.0 / o.alpha.sqrt()).sqrt();
    let t0 = 1.0 / (typw * o.alpha);
    let mut rng = ChaCha8Rng::seed_from_u64(o.seed);

    // the sequence of epochs, each a list of cells in visiting order
    let schedule: Vec<Vec<usize>> = if o.mini_batch {
        if o.batch_size >= n {
            return Err(ScError::Input(format!(
                "`batch_size` ({}) must be smaller than the number of cells ({n}) for mini-batch \
                 training",
                o.batch_size
            )));
        }
        let n_sample = (o.batch_number * o.batch_size).min(n);
        let weights: Option<Vec<f64>> = o.balance_cell_type.then(|| {
            let mut cnt = vec![0usize; n_classes];
            y.iter().for_each(|&l| cnt[l] += 1);
            y.iter().map(|&l| 1.0 / cnt[l] as f64).collect()
        });
        let mut out = Vec::new();
        for _ in 0..o.epochs {
            let sampled: Vec<usize> = match &weights {
                None => {
                    let mut idx: Vec<usize> = (0..n).collect();
                    shuffle(&mut idx, &mut rng);
                    idx.truncate(n_sample);
                    idx
                }
                Some(w) => {
                    // weighted sampling without replacement (Efraimidis-Spirakis keys)
                    let mut keys: Vec<(f64, usize)> = (0..n)
                        .map(|c| {
                            let u: f64 = rng.random::<f64>().max(1e-300);
                            (u.ln() / w[c], c)
                        })
                        .collect();
                    keys.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
                    keys.into_iter().take(n_sample).map(|(_, c)| c).collect()
                }
            };
            for batch in sampled.chunks(o.batch_size) {
                let mut b = batch.to_vec();
                shuffle(&mut b, &mut rng);
                out.push(b);
            }
        }
        out
    } else {
        Vec::new()
    };
    let seeds: Vec<u64> = rows.iter().map(|_| rng.random::<u64>()).collect();

    let fits: Vec<(Vec<f64>, f64, usize, f64)> = rows
        .par_iter()
        .zip(seeds)
        .map(|(&cls, seed)| {
            let mut r = SgdRow::new(g);
            let mut t = 1.0f64;
            let mut n_iter = 0usize;
            if o.mini_batch {
                for batch in &schedule {
                    for &c in batch {
                        let eta = 1.0 / (o.alpha * (t0 + t - 1.0));
                        let y01 = if y[c] == cls { 1.0 } else { 0.0 };
                        r.step(d, c, zmu[c], mumu, y01, eta, o.alpha);
                        t += 1.0;
                    }
                    n_iter += 1;
                }
            } else {
                let mut rng = ChaCha8Rng::seed_from_u64(seed);
                let mut idx: Vec<usize> = (0..n).collect();
                let mut best = f64::INFINITY;
                let mut no_improve = 0usize;
                for _ in 0..o.max_iter {
                    shuffle(&mut idx, &mut rng);
                    let mut sumloss = 0.0;
                    for &c in &idx {
                        let eta = 1.0 / (o.alpha * (t0 + t - 1.0));
                        let y01 = if y[c] == cls { 1.0 } else { 0.0 };
                        sumloss += r.step(d, c, zmu[c], mumu, y01, eta, o.alpha);
                        t += 1.0;
                    }
                    n_iter += 1;
                    if o.tol.is_finite() && sumloss > best - o.tol * n as f64 {
                        no_improve += 1;
                    } else {
                        no_improve = 0;
                    }
                    if sumloss < best {
                        best = sumloss;
                    }
                    if no_improve >= o.n_iter_no_change {
                        break;
                    }
                }
            }
            (r.weights(&d.mu), r.b, n_iter, t)
        })
        .collect();
    let nr = rows.len();
    let mut coef = vec![0.0; g * nr];
    for (k, f) in fits.iter().enumerate() {
        for j in 0..g {
            coef[j * nr + k] = f.0[j];
        }
    }
    let n_iter = fits.iter().map(|f| f.2).max().unwrap_or(0);
    Ok(LinearFit {
        n_rows: nr,
        coef,
        intercept: fits.iter().map(|f| f.1).collect(),
        n_iter: vec![n_iter as i32],
        t: if o.mini_batch {
            fits.first().map(|f| f.3).unwrap_or(1.0)
        } else {
            (n_iter * n) as f64 + 1.0
        },
    })
}

/// CellTypist's feature selection: per row of `coef`, the `top` genes with the largest
/// `|coef|`; their union, sorted by gene index.
pub fn select_features(fit: &LinearFit, n_genes: usize, top: usize) -> ScResult<Vec<usize>> {
    if top >= n_genes {
        return Err(ScError::Input(format!(
            "`top_genes` ({top}) must be smaller than the number of genes ({n_genes})"
        )));
    }
    let nr = fit.n_rows;
    let mut keep = vec![false; n_genes];
    for k in 0..nr {
        let mut idx: Vec<usize> = (0..n_genes).collect();
        let key = |j: usize| fit.coef[j * nr + k].abs();
        idx.sort_by(|&a, &b| key(b).total_cmp(&key(a)).then(a.cmp(&b)));
        for &j in &idx[..top] {
            keep[j] = true;
        }
    }
    Ok((0..n_genes).filter(|&j| keep[j]).collect())
}

/// Everything `celltypist.train` decides.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    pub with_mean: bool,
    pub use_sgd: bool,
    pub c: f64,
    pub max_iter: usize,
    pub tol_lr: f64,
    pub sgd: SgdOptions,
    pub feature_selection: bool,
    pub top_genes: usize,
}

/// A trained model: gene indices into the input rows, scaler and classifier.
#[derive(Debug, Clone)]
pub struct Trained {
    pub genes: Vec<usize>,
    pub scaler: Scaler,
    pub fit: LinearFit,
}

/// `celltypist.train` on the genes x cells matrix `m` restricted to the rows `rows`; `y` are
/// class ids `0..n_classes` (classes sorted by the caller).
pub fn train(
    m: &ExprMatrix,
    rows: &[usize],
    y: &[usize],
    n_classes: usize,
    o: &TrainOptions,
) -> ScResult<Trained> {
    if n_classes < 2 {
        return Err(ScError::Groups(
            "training needs at least two cell types".into(),
        ));
    }
    if y.len() != m.ncol() {
        return Err(ScError::Dims(format!(
            "{} labels for {} cells",
            y.len(),
            m.ncol()
        )));
    }
    if y.iter().any(|&l| l >= n_classes) {
        return Err(ScError::Input("label codes out of range".into()));
    }
    // drop genes never expressed
    let sums = gene_sums(m, rows);
    let kept: Vec<usize> = rows
        .iter()
        .zip(&sums)
        .filter(|(_, &s)| s != 0.0)
        .map(|(&r, _)| r)
        .collect();
    if kept.is_empty() {
        return Err(ScError::Input(
            "no gene is expressed in the training cells".into(),
        ));
    }
    let scaler = fit_scaler(m, &kept, o.with_mean);
    let data = scale_data(m, &kept, &scaler);
    let fit_final = |d: &TrainData| {
        if o.use_sgd {
            fit_sgd(d, y, n_classes, &o.sgd)
        } else {
            fit_lbfgs(d, y, n_classes, o.c, o.max_iter, o.tol_lr)
        }
    };
    if o.feature_selection {
        let round1 = fit_sgd(&data, y, n_classes, &o.sgd)?;
        let sel = select_features(&round1, data.n_genes, o.top_genes)?;
        let sub = data.subset_genes(&sel);
        drop(data);
        let fit = fit_final(&sub)?;
        let pick = |v: &[f64]| sel.iter().map(|&j| v[j]).collect::<Vec<f64>>();
        Ok(Trained {
            genes: sel.iter().map(|&j| kept[j]).collect(),
            scaler: Scaler {
                mean: pick(&scaler.mean),
                var: pick(&scaler.var),
                scale: pick(&scaler.scale),
                with_mean: scaler.with_mean,
            },
            fit,
        })
    } else {
        let fit = fit_final(&data)?;
        Ok(Trained {
            genes: kept,
            scaler,
            fit,
        })
    }
}

#[cfg(test)]
mod tests;

/// What a model file needs beyond [`CelltypistModel`]: the scaler's variance and sample
/// count and the classifier's fitted attributes and settings.
#[derive(Debug, Clone)]
pub struct ModelExtras {
    /// `Scaler_.var_` (when unknown, `scale²` is written).
    pub scaler_var: Option<Vec<f64>>,
    pub n_samples_seen: i64,
    /// `LogisticRegression`: `C`, `max_iter`, `n_iter_` (one per row).
    pub c: f64,
    pub max_iter: i64,
    pub n_iter: Vec<i32>,
    /// `SGDClassifier`: `alpha`, `t_` (`n_iter_` is `n_iter[0]`).
    pub alpha: f64,
    pub t: f64,
}

/// The scikit-learn version whose attribute layout is written.
pub const SKLEARN_VERSION: &str = "1.6.1";

/// The `.pkl` bytes of a CellTypist model, as `Model.write` gives them with celltypist 1.7.1 and
/// scikit-learn 1.6.1: `{'Model': LogisticRegression | SGDClassifier, 'Scaler_':
/// StandardScaler, 'description': dict}`.
pub fn model_pickle(m: &CelltypistModel, x: &ModelExtras) -> ScResult<Vec<u8>> {
    use crate::pickle::writer::{dict, global, ndarray, object, scalar_i64, ArrayOut};
    use crate::pickle::Value as V;
    let nf = m.features.len();
    let nr = m.n_rows;
    if m.coef.len() != nf * nr || m.intercept.len() != nr {
        return Err(ScError::Dims(format!(
            "coef has {} values and intercept {} for {nr} rows x {nf} features",
            m.coef.len(),
            m.intercept.len()
        )));
    }
    if m.scaler_mean.len() != nf || m.scaler_scale.len() != nf {
        return Err(ScError::Dims(
            "the scaler's mean and scale need one value per feature".into(),
        ));
    }
    let expected = if m.classes.len() == 2 {
        1
    } else {
        m.classes.len()
    };
    if nr != expected {
        return Err(ScError::Dims(format!(
            "{nr} coefficient rows for {} classes",
            m.classes.len()
        )));
    }
    // gene-major -> C order (rows x features)
    let mut coef_c = vec![0.0; nf * nr];
    for k in 0..nr {
        for f in 0..nf {
            coef_c[k * nf + f] = m.coef[f * nr + k];
        }
    }
    let s = |t: &str| V::Str(t.into());
    let coef = ndarray(&[nr, nf], ArrayOut::F64(&coef_c))?;
    let intercept = ndarray(&[nr], ArrayOut::F64(&m.intercept))?;
    let classes = ndarray(&[m.classes.len()], ArrayOut::Str(&m.classes))?;
    let features = ndarray(&[nf], ArrayOut::Str(&m.features))?;
    let nfi = V::Int(nf as i64);
    let sgd = m.classifier == "SGDClassifier";
    let model = if sgd {
        let ones = vec![1.0; m.classes.len()];
        object(
            global("sklearn.linear_model._stochastic_gradient", "SGDClassifier"),
            vec![],
            true,
            Some(dict(vec![
                ("loss", s("log_loss")),
                ("penalty", s("l2")),
                ("learning_rate", s("optimal")),
                ("epsilon", V::Float(0.1)),
                ("alpha", V::Float(x.alpha)),
                ("C", V::Float(1.0)),
                ("l1_ratio", V::Float(0.15)),
                ("fit_intercept", V::Bool(true)),
                ("shuffle", V::Bool(true)),
                ("random_state", V::None),
                ("verbose", V::Int(0)),
                ("eta0", V::Float(0.0)),
                ("power_t", V::Float(0.5)),
                ("early_stopping", V::Bool(false)),
                ("validation_fraction", V::Float(0.1)),
                ("n_iter_no_change", V::Int(5)),
                ("warm_start", V::Bool(false)),
                ("average", V::Bool(false)),
                ("max_iter", V::Int(x.max_iter)),
                ("tol", V::Float(1e-3)),
                ("class_weight", V::None),
                ("n_jobs", V::None),
                ("coef_", coef),
                ("intercept_", intercept),
                ("t_", V::Float(x.t)),
                ("n_features_in_", nfi),
                ("classes_", classes),
                (
                    "_expanded_class_weight",
                    ndarray(&[ones.len()], ArrayOut::F64(&ones))?,
                ),
                (
                    "_loss_function_",
                    object(global("_loss", "CyHalfBinomialLoss"), vec![], false, None),
                ),
                (
                    "n_iter_",
                    V::Int(x.n_iter.first().copied().unwrap_or(0) as i64),
                ),
                ("features", features),
                ("_sklearn_version", s(SKLEARN_VERSION)),
            ])),
        )
    } else {
        let n_iter: Vec<i32> = if x.n_iter.len() == nr {
            x.n_iter.clone()
        } else {
            vec![x.n_iter.first().copied().unwrap_or(0); nr]
        };
        object(
            global("sklearn.linear_model._logistic", "LogisticRegression"),
            vec![],
            true,
            Some(dict(vec![
                ("penalty", s("l2")),
                ("dual", V::Bool(false)),
                ("tol", V::Float(1e-4)),
                ("C", V::Float(x.c)),
                ("fit_intercept", V::Bool(true)),
                ("intercept_scaling", V::Int(1)),
                ("class_weight", V::None),
                ("random_state", V::None),
                ("solver", s("lbfgs")),
                ("max_iter", V::Int(x.max_iter)),
                ("multi_class", s("ovr")),
                ("verbose", V::Int(0)),
                ("warm_start", V::Bool(false)),
                ("n_jobs", V::None),
                ("l1_ratio", V::None),
                ("n_features_in_", nfi.clone()),
                ("classes_", classes),
                ("n_iter_", ndarray(&[nr], ArrayOut::I32(&n_iter))?),
                ("coef_", coef),
                ("intercept_", intercept),
                ("features", features),
                ("_sklearn_version", s(SKLEARN_VERSION)),
            ])),
        )
    };
    let var = match &x.scaler_var {
        Some(v) if v.len() == nf => v.clone(),
        Some(_) => {
            return Err(ScError::Dims(
                "scaler_var needs one value per feature".into(),
            ))
        }
        None => m.scaler_scale.iter().map(|s| s * s).collect(),
    };
    let scaler = object(
        global("sklearn.preprocessing._data", "StandardScaler"),
        vec![],
        true,
        Some(dict(vec![
            ("with_mean", V::Bool(m.with_mean)),
            ("with_std", V::Bool(true)),
            ("copy", V::Bool(true)),
            ("n_features_in_", V::Int(nf as i64)),
            ("n_samples_seen_", scalar_i64(x.n_samples_seen)),
            ("mean_", ndarray(&[nf], ArrayOut::F64(&m.scaler_mean))?),
            ("var_", ndarray(&[nf], ArrayOut::F64(&var))?),
            ("scale_", ndarray(&[nf], ArrayOut::F64(&m.scaler_scale))?),
            ("_sklearn_version", s(SKLEARN_VERSION)),
        ])),
    );
    let desc = V::Dict(
        m.description
            .iter()
            .map(|(k, v)| {
                let val = if k == "number_celltypes" {
                    v.parse::<i64>().map(V::Int).unwrap_or_else(|_| s(v))
                } else {
                    s(v)
                };
                (s(k), val)
            })
            .collect(),
    );
    crate::pickle::writer::write(&dict(vec![
        ("Model", model),
        ("Scaler_", scaler),
        ("description", desc),
    ]))
}
