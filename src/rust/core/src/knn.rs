//! Weighted kNN label transfer, identical to scArches' `weighted_knn_trainer` /
//! `weighted_knn_transfer` (spec §6):
//!
//! 1. exact Euclidean k nearest reference cells of every query cell (a k-d tree with
//!    incremental box distances, parallel over query cells; no self exclusion);
//! 2. per query cell, with `s` the population standard deviation of its k (unsquared)
//!    distances, kernel `exp(-d / (2/s)^2)` (linear in the distance), normalised to sum 1;
//!    `s = 0` gives uniform weights;
//! 3. per label column, the probability of a label is the summed weight of the neighbours
//!    carrying it; the best label is found by a strict `>` from 0.0 over the labels in
//!    sorted order (ties go to the first), and the uncertainty is `max(1 - p, 0)`.
//!
//! Distance ties are broken by reference index (the k nearest by `(distance, index)`),
//! so results are deterministic; sklearn's brute-force search breaks them arbitrarily.

use crate::error::{ScError, ScResult};
use rayon::prelude::*;

/// Cells in rows, dimensions in columns, column-major (an R embedding matrix).
#[derive(Debug, Clone, Copy)]
pub struct Embedding<'a> {
    data: &'a [f64],
    n: usize,
    dim: usize,
}

impl<'a> Embedding<'a> {
    /// Wrap a column-major `n x dim` matrix; every value must be finite.
    pub fn new(n: usize, dim: usize, data: &'a [f64], what: &str) -> ScResult<Self> {
        if n.checked_mul(dim) != Some(data.len()) {
            return Err(ScError::Dims(format!(
                "{what} embedding has {} values, expected {n} cells x {dim} dimensions",
                data.len()
            )));
        }
        if let Some(pos) = data.iter().position(|v| !v.is_finite()) {
            return Err(ScError::Value(format!(
                "{what} embedding has a non-finite value (NA, NaN or Inf) at cell {}, \
                 dimension {}; remove or fix such cells first",
                pos % n.max(1) + 1,
                pos / n.max(1) + 1
            )));
        }
        Ok(Self { data, n, dim })
    }
    pub fn n(&self) -> usize {
        self.n
    }
    pub fn dim(&self) -> usize {
        self.dim
    }
    fn row_into(&self, i: usize, out: &mut [f64]) {
        for (d, o) in out.iter_mut().enumerate() {
            *o = self.data[d * self.n + i];
        }
    }
}

/// The k nearest reference cells of each query cell, row-major `n_query x k`, ascending
/// by `(distance, reference index)`.
#[derive(Debug, Clone, PartialEq)]
pub struct Neighbors {
    pub k: usize,
    pub index: Vec<usize>,
    /// Euclidean (not squared) distances
    pub dist: Vec<f64>,
}

/// Reference cells per bucket (a leaf of the space partition), at most.
const BUCKET: usize = 64;
/// Query cells per block (searched together against the buckets), at most.
const BLOCK: usize = 32;
/// Distances are computed for this many reference cells at once (buckets are padded).
const LANES: usize = 8;
/// Relative slack on pruning bounds, so that rounding never prunes a tie.
const SLACK: f64 = 1e-10;

/// The current k best of one query: `(squared distance, reference id)`, ascending.
type Best = Vec<(f64, usize)>;

/// Cells partitioned into spatially compact groups by recursive median splits on the
/// widest dimension (split points rounded to multiples of [`LANES`]).
fn partition(e: &Embedding, leaf: usize) -> (Vec<usize>, Vec<(usize, usize)>) {
    let mut ids: Vec<usize> = (0..e.n).collect();
    let ranges = if e.n > 0 {
        split(e, &mut ids, 0, leaf)
    } else {
        Vec::new()
    };
    (ids, ranges)
}

fn split(e: &Embedding, ids: &mut [usize], offset: usize, leaf: usize) -> Vec<(usize, usize)> {
    let n = ids.len();
    if n <= leaf {
        return vec![(offset, offset + n)];
    }
    // widest dimension, judged on an evenly spaced sample of at most 1024 cells (the
    // split only shapes the partition; the search is exact whatever it is)
    let step = n.div_ceil(1024);
    let widest = |step: usize| {
        let (mut best_d, mut best_w) = (0usize, 0.0f64);
        for d in 0..e.dim {
            let col = &e.data[d * e.n..(d + 1) * e.n];
            let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
            for &i in ids.iter().step_by(step) {
                lo = lo.min(col[i]);
                hi = hi.max(col[i]);
            }
            if hi - lo > best_w {
                best_w = hi - lo;
                best_d = d;
            }
        }
        (best_d, best_w)
    };
    let (mut best_d, mut best_w) = widest(step);
    if best_w <= 0.0 && step > 1 {
        (best_d, best_w) = widest(1);
    }
    if best_w <= 0.0 {
        return vec![(offset, offset + n)]; // identical points: one group, whatever its size
    }
    let col = &e.data[best_d * e.n..(best_d + 1) * e.n];
    let half = n / 2;
    let mid = if half >= LANES {
        half / LANES * LANES
    } else {
        half
    };
    ids.select_nth_unstable_by(mid, |&a, &b| col[a].total_cmp(&col[b]));
    let (l, r) = ids.split_at_mut(mid);
    let (mut a, b) = if n > 20_000 {
        rayon::join(
            || split(e, l, offset, leaf),
            || split(e, r, offset + mid, leaf),
        )
    } else {
        (split(e, l, offset, leaf), split(e, r, offset + mid, leaf))
    };
    a.extend(b);
    a
}

/// Bounding boxes of groups, `g * dim + d`.
fn boxes(e: &Embedding, ids: &[usize], ranges: &[(usize, usize)]) -> (Vec<f64>, Vec<f64>) {
    let dim = e.dim;
    let mut lo = vec![f64::INFINITY; ranges.len() * dim];
    let mut hi = vec![f64::NEG_INFINITY; ranges.len() * dim];
    for (g, &(s, t)) in ranges.iter().enumerate() {
        for d in 0..dim {
            let col = &e.data[d * e.n..(d + 1) * e.n];
            let (l, h) = (&mut lo[g * dim + d], &mut hi[g * dim + d]);
            for &i in &ids[s..t] {
                *l = l.min(col[i]);
                *h = h.max(col[i]);
            }
        }
    }
    (lo, hi)
}

/// Whether the squared distance from a point to a box (0 inside) is at most `w`; stops
/// early once the partial sum exceeds `w` (partial sums only grow).
#[inline]
fn point_box_within(q: &[f64], lo: &[f64], hi: &[f64], w: f64) -> bool {
    let half = q.len() / 2;
    let s = point_box(&q[..half], &lo[..half], &hi[..half]);
    s <= w && s + point_box(&q[half..], &lo[half..], &hi[half..]) <= w
}

/// Squared distance from a point to a box (0 inside).
#[inline]
fn point_box(q: &[f64], lo: &[f64], hi: &[f64]) -> f64 {
    let mut s = 0.0;
    for ((&x, &l), &h) in q.iter().zip(lo).zip(hi) {
        // branch-free: at most one of the two gaps is positive
        let a = l - x;
        let b = x - h;
        let g = (if a > 0.0 { a } else { 0.0 }) + (if b > 0.0 { b } else { 0.0 });
        s += g * g;
    }
    s
}

/// An exact kNN index over the reference cells: buckets of nearby cells with their
/// bounding boxes; coordinates are copied bucket by bucket in chunks of [`LANES`] cells
/// (dimension-major within a chunk; buckets padded to whole chunks) so distances are
/// computed in SIMD lanes over contiguous memory.
#[derive(Debug, Clone)]
pub struct KnnIndex {
    dim: usize,
    /// reference ids in bucket order
    ids: Vec<usize>,
    /// `[start, end)` of each bucket in `ids`
    ranges: Vec<(usize, usize)>,
    /// start of each bucket's padded block in `pts`
    offsets: Vec<usize>,
    pts: Vec<f64>,
    /// bucket boxes, `b * dim + d`
    lo: Vec<f64>,
    hi: Vec<f64>,
    /// bucket boxes transposed, `d * n_buckets + b`
    lo_t: Vec<f64>,
    hi_t: Vec<f64>,
}

fn padded(len: usize) -> usize {
    len.div_ceil(LANES) * LANES
}

impl KnnIndex {
    pub fn build(reference: &Embedding) -> Self {
        let dim = reference.dim;
        let (ids, ranges) = partition(reference, BUCKET);
        let (lo, hi) = boxes(reference, &ids, &ranges);
        let nb = ranges.len();
        let mut offsets = Vec::with_capacity(nb);
        let mut total = 0;
        for &(s, t) in &ranges {
            offsets.push(total);
            total += padded(t - s) * dim;
        }
        // padding cells sit at +inf: their distance is inf and they are never offered
        let mut pts = vec![f64::INFINITY; total];
        for (b, &(s, t)) in ranges.iter().enumerate() {
            for d in 0..dim {
                let col = &reference.data[d * reference.n..(d + 1) * reference.n];
                for (j, &i) in ids[s..t].iter().enumerate() {
                    let (c, u) = (j / LANES, j % LANES);
                    pts[offsets[b] + (c * dim + d) * LANES + u] = col[i];
                }
            }
        }
        let mut lo_t = vec![0.0; nb * dim];
        let mut hi_t = vec![0.0; nb * dim];
        for b in 0..nb {
            for d in 0..dim {
                lo_t[d * nb + b] = lo[b * dim + d];
                hi_t[d * nb + b] = hi[b * dim + d];
            }
        }
        Self {
            dim,
            ids,
            ranges,
            offsets,
            pts,
            lo,
            hi,
            lo_t,
            hi_t,
        }
    }

    fn n(&self) -> usize {
        self.ids.len()
    }

    /// The k nearest reference cells of every query cell: query cells are grouped into
    /// compact blocks; each block visits first the buckets overlapping its box, then the
    /// others in ascending order of box-to-box distance until no bucket can hold a closer
    /// cell for any of its queries; each query scans a bucket only when its own
    /// point-to-box distance allows.
    pub fn query(&self, query: &Embedding, k: usize) -> ScResult<Neighbors> {
        let dim = self.dim;
        check_k(k, self.n(), query.dim, dim)?;
        let mut index = vec![0usize; query.n * k];
        let mut dist = vec![0.0f64; query.n * k];
        if query.n == 0 {
            return Ok(Neighbors { k, index, dist });
        }
        let (qids, qranges) = partition(query, BLOCK);
        let (qlo, qhi) = boxes(query, &qids, &qranges);
        let simd = Simd::detect();
        let blocks: Vec<Vec<(usize, Best)>> = (0..qranges.len())
            .into_par_iter()
            .map_init(Scratch::default, |sc, g| {
                let (s, t) = qranges[g];
                let qs: Vec<(Vec<f64>, Best)> = qids[s..t]
                    .iter()
                    .map(|&qi| {
                        let mut q = vec![0.0; dim];
                        query.row_into(qi, &mut q);
                        (q, Vec::with_capacity(k + 1))
                    })
                    .collect();
                let best = self.search_block(
                    qs,
                    &qlo[g * dim..(g + 1) * dim],
                    &qhi[g * dim..(g + 1) * dim],
                    k,
                    simd,
                    sc,
                );
                qids[s..t].iter().copied().zip(best).collect()
            })
            .collect();
        for block in blocks {
            for (qi, best) in block {
                for (t, &(d2, id)) in best.iter().enumerate() {
                    index[qi * k + t] = id;
                    dist[qi * k + t] = d2.sqrt();
                }
            }
        }
        Ok(Neighbors { k, index, dist })
    }

    fn search_block(
        &self,
        mut qs: Vec<(Vec<f64>, Best)>,
        blo: &[f64],
        bhi: &[f64],
        k: usize,
        simd: Simd,
        sc: &mut Scratch,
    ) -> Vec<Best> {
        let (dim, nb) = (self.dim, self.ranges.len());
        // box-to-box lower bounds, vectorised over buckets
        let lb = &mut sc.lb;
        lb.clear();
        lb.resize(nb, 0.0);
        for d in 0..dim {
            let (rlo, rhi) = (
                &self.lo_t[d * nb..(d + 1) * nb],
                &self.hi_t[d * nb..(d + 1) * nb],
            );
            let (ql, qh) = (blo[d], bhi[d]);
            for ((l, &a), &b) in lb.iter_mut().zip(rlo).zip(rhi) {
                let gap = (a - qh).max(ql - b).max(0.0);
                *l += gap * gap;
            }
        }
        let mut max_worst = f64::INFINITY;
        for b in 0..nb {
            if sc.lb[b] == 0.0 {
                max_worst = self.visit(&mut qs, b, k, simd);
            }
        }
        sc.order.clear();
        for (b, &l) in sc.lb.iter().enumerate() {
            if l > 0.0 && l <= max_worst + max_worst * SLACK {
                sc.order.push((l, b as u32));
            }
        }
        sc.order.sort_unstable_by(|a, b| a.0.total_cmp(&b.0));
        for &(l, b) in sc.order.iter() {
            if l > max_worst + max_worst * SLACK {
                break;
            }
            max_worst = self.visit(&mut qs, b as usize, k, simd);
        }
        qs.into_iter().map(|(_, best)| best).collect()
    }

    /// Offer bucket `b` to every query of a block that it may improve; returns the largest
    /// k-th distance of the block afterwards.
    #[inline]
    fn visit(&self, qs: &mut [(Vec<f64>, Best)], b: usize, k: usize, simd: Simd) -> f64 {
        let dim = self.dim;
        let (s, t) = self.ranges[b];
        let plen = padded(t - s);
        let bpts = &self.pts[self.offsets[b]..self.offsets[b] + plen * dim];
        let (rlo, rhi) = (
            &self.lo[b * dim..(b + 1) * dim],
            &self.hi[b * dim..(b + 1) * dim],
        );
        let bids = &self.ids[s..t];
        let mut mw = 0.0f64;
        for (q, best) in qs.iter_mut() {
            let w = worst(best, k);
            if point_box_within(q, rlo, rhi, w + w * SLACK) {
                simd.scan(q, bpts, plen, bids, w, k, best);
            }
            mw = mw.max(worst(best, k));
        }
        mw
    }
}

#[derive(Default)]
struct Scratch {
    lb: Vec<f64>,
    order: Vec<(f64, u32)>,
}

/// Which distance kernel the CPU runs (AVX2 when available, detected at run time).
#[derive(Debug, Clone, Copy)]
struct Simd {
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    avx2: bool,
}

impl Simd {
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        let avx2 = std::arch::is_x86_feature_detected!("avx2");
        #[cfg(not(target_arch = "x86_64"))]
        let avx2 = false;
        Self { avx2 }
    }

    /// Offer the cells of a dimension-major bucket (`plen` padded cells, ids `bids`) whose
    /// squared distance to `q` is at most `w` (the current k-th). Each distance sums the
    /// dimensions in order, so results are bit-identical on every kernel (and to
    /// [`knn_brute`]).
    #[allow(clippy::too_many_arguments)]
    #[inline]
    fn scan(
        self,
        q: &[f64],
        bpts: &[f64],
        plen: usize,
        bids: &[usize],
        w: f64,
        k: usize,
        best: &mut Vec<(f64, usize)>,
    ) {
        #[cfg(target_arch = "x86_64")]
        if self.avx2 {
            // SAFETY: the CPU supports AVX2 (checked at run time in `detect`).
            unsafe { scan_avx2(q, bpts, plen, bids, w, k, best) };
            return;
        }
        scan_lanes(q, bpts, plen, bids, w, k, best);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[allow(clippy::too_many_arguments)]
fn scan_avx2(
    q: &[f64],
    bpts: &[f64],
    plen: usize,
    bids: &[usize],
    w: f64,
    k: usize,
    best: &mut Vec<(f64, usize)>,
) {
    scan_lanes(q, bpts, plen, bids, w, k, best)
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn scan_lanes(
    q: &[f64],
    bpts: &[f64],
    plen: usize,
    bids: &[usize],
    mut w: f64,
    k: usize,
    best: &mut Vec<(f64, usize)>,
) {
    let dim = q.len();
    for (c, chunk) in bpts[..plen * dim].chunks_exact(dim * LANES).enumerate() {
        let mut acc = [0.0f64; LANES];
        for (p, &qd) in chunk.chunks_exact(LANES).zip(q) {
            for u in 0..LANES {
                let x = qd - p[u];
                acc[u] += x * x;
            }
        }
        let mut any = false;
        for &a in &acc {
            any |= a <= w;
        }
        if any {
            // padding cells (beyond `bids`) have infinite distance; `zip` skips them
            for (&a, &id) in acc.iter().zip(&bids[(c * LANES).min(bids.len())..]) {
                if a <= w {
                    offer(best, k, a, id);
                    w = worst(best, k);
                }
            }
        }
    }
}

/// The current k-th smallest squared distance (infinite until k are known).
#[inline]
fn worst(best: &[(f64, usize)], k: usize) -> f64 {
    if best.len() < k {
        f64::INFINITY
    } else {
        best[k - 1].0
    }
}

/// Keep the k smallest `(squared distance, reference id)` pairs, sorted ascending.
#[inline]
fn offer(best: &mut Vec<(f64, usize)>, k: usize, d2: f64, id: usize) {
    if best.len() == k {
        let (wd, wi) = best[k - 1];
        if d2 > wd || (d2 == wd && id > wi) {
            return;
        }
    }
    let mut pos = best.len();
    while pos > 0 {
        let (pd, pi) = best[pos - 1];
        if pd < d2 || (pd == d2 && pi < id) {
            break;
        }
        pos -= 1;
    }
    best.insert(pos, (d2, id));
    if best.len() > k {
        best.pop();
    }
}

/// k nearest neighbours (exact; ties in distance go to the smaller reference index).
pub fn knn(reference: &Embedding, query: &Embedding, k: usize) -> ScResult<Neighbors> {
    check_k(k, reference.n, query.dim, reference.dim)?;
    KnnIndex::build(reference).query(query, k)
}

fn check_k(k: usize, n_ref: usize, qdim: usize, rdim: usize) -> ScResult<()> {
    if qdim != rdim {
        return Err(ScError::Dims(format!(
            "the query embedding has {qdim} dimensions but the reference embedding has {rdim}; \
             both must come from the same model (the same latent space)"
        )));
    }
    if k == 0 {
        return Err(ScError::Input("k must be at least 1".into()));
    }
    if k > n_ref {
        return Err(ScError::Input(format!(
            "k = {k} is larger than the number of reference cells ({n_ref}); use k <= {n_ref}"
        )));
    }
    Ok(())
}

/// k nearest neighbours by brute force (the reference implementation for tests).
pub fn knn_brute(reference: &Embedding, query: &Embedding, k: usize) -> ScResult<Neighbors> {
    check_k(k, reference.n, query.dim, reference.dim)?;
    let dim = reference.dim;
    let mut index = Vec::with_capacity(query.n * k);
    let mut dist = Vec::with_capacity(query.n * k);
    let (mut q, mut p) = (vec![0.0; dim], vec![0.0; dim]);
    for i in 0..query.n {
        query.row_into(i, &mut q);
        let mut all: Vec<(f64, usize)> = (0..reference.n)
            .map(|j| {
                reference.row_into(j, &mut p);
                let d2: f64 = q
                    .iter()
                    .zip(&p)
                    .fold(0.0, |s, (a, b)| s + (a - b) * (a - b));
                (d2, j)
            })
            .collect();
        all.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        for &(d2, j) in &all[..k] {
            index.push(j);
            dist.push(d2.sqrt());
        }
    }
    Ok(Neighbors { k, index, dist })
}

/// numpy's pairwise summation (`pairwise_sum_DOUBLE`, used by `np.sum` / `np.add.reduce`
/// on contiguous float64 data): 8 interleaved partial sums in blocks of up to 128 values,
/// recursive halving above that. Reproducing it keeps sums bit-identical to scArches'.
pub fn numpy_sum(a: &[f64]) -> f64 {
    let n = a.len();
    if n < 8 {
        let mut r = 0.0;
        for &v in a {
            r += v;
        }
        r
    } else if n <= 128 {
        let mut r = [0.0f64; 8];
        r.copy_from_slice(&a[..8]);
        let full = n - n % 8;
        let mut i = 8;
        while i < full {
            for j in 0..8 {
                r[j] += a[i + j];
            }
            i += 8;
        }
        let mut res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for &v in &a[full..] {
            res += v;
        }
        res
    } else {
        let mut n2 = n / 2;
        n2 -= n2 % 8;
        numpy_sum(&a[..n2]) + numpy_sum(&a[n2..])
    }
}

/// scArches' kernel weights of one query cell's k distances (spec §6 step 2), with numpy's
/// operation order: `s = np.std(d)` (population), `w = exp(-d / (2/s)^2)`, `w / sum(w)`.
/// `s = 0` gives uniform weights; when every kernel value underflows to 0 the weights are
/// NaN (scArches then gives no label).
pub fn kernel_weights(dist: &[f64]) -> Vec<f64> {
    let k = dist.len() as f64;
    let mean = numpy_sum(dist) / k;
    let sq: Vec<f64> = dist.iter().map(|d| (d - mean) * (d - mean)).collect();
    let s = (numpy_sum(&sq) / k).sqrt();
    let scale = (2.0 / s) * (2.0 / s);
    let w: Vec<f64> = dist.iter().map(|d| (-(d / scale)).exp()).collect();
    let total = numpy_sum(&w);
    w.into_iter().map(|v| v / total).collect()
}

/// One label column's transfer result per query cell.
#[derive(Debug, Clone, PartialEq)]
pub struct TransferResult {
    /// best label code, or -1 when no label has positive probability (all weights NaN)
    pub label: Vec<i32>,
    /// probability of the best label (0 when none)
    pub prob: Vec<f64>,
    /// `max(1 - prob, 0)`
    pub uncertainty: Vec<f64>,
}

/// Label columns of the reference: codes `0..n_levels` per reference cell, numbered in the
/// label's sorted order (numpy's `np.unique`), so that ties go to the smaller code.
#[derive(Debug, Clone, Copy)]
pub struct LabelColumn<'a> {
    pub codes: &'a [i32],
    pub n_levels: usize,
}

/// Weighted vote of every query cell for every label column (spec §6 steps 2-5).
pub fn transfer(nb: &Neighbors, columns: &[LabelColumn]) -> ScResult<Vec<TransferResult>> {
    let k = nb.k;
    let nq = nb.index.len().checked_div(k).unwrap_or(0);
    for (c, col) in columns.iter().enumerate() {
        if let Some(&bad) = col
            .codes
            .iter()
            .find(|&&v| v < 0 || v as usize >= col.n_levels)
        {
            return Err(ScError::Groups(format!(
                "label column {} has an invalid code {bad} (missing labels are not allowed in \
                 the reference)",
                c + 1
            )));
        }
        if let Some(&mx) = nb.index.iter().max() {
            if mx >= col.codes.len() {
                return Err(ScError::Dims(format!(
                    "label column {} has {} entries but neighbour index {mx} refers beyond it",
                    c + 1,
                    col.codes.len()
                )));
            }
        }
    }
    let mut out: Vec<TransferResult> = columns
        .iter()
        .map(|_| TransferResult {
            label: vec![-1; nq],
            prob: vec![0.0; nq],
            uncertainty: vec![1.0; nq],
        })
        .collect();
    // per query: (label, prob) for each column, computed in parallel
    let rows: Vec<Vec<(i32, f64)>> = (0..nq)
        .into_par_iter()
        .map_init(Vec::new, |acc: &mut Vec<(i32, usize)>, i| {
            let w = kernel_weights(&nb.dist[i * k..(i + 1) * k]);
            let idx = &nb.index[i * k..(i + 1) * k];
            columns
                .iter()
                .map(|col| {
                    // (label, position) pairs sorted by label, then by neighbour rank: each
                    // label's weights are summed in neighbour order, as numpy's masked sum
                    acc.clear();
                    acc.extend(idx.iter().enumerate().map(|(t, &j)| (col.codes[j], t)));
                    acc.sort_unstable();
                    let (mut best, mut bp) = (-1i32, 0.0f64);
                    let mut run = Vec::with_capacity(k);
                    for grp in acc.chunk_by(|a, b| a.0 == b.0) {
                        run.clear();
                        run.extend(grp.iter().map(|&(_, t)| w[t]));
                        let p = numpy_sum(&run);
                        if bp < p {
                            bp = p;
                            best = grp[0].0;
                        }
                    }
                    (best, bp)
                })
                .collect()
        })
        .collect();
    for (i, row) in rows.into_iter().enumerate() {
        for (c, (best, bp)) in row.into_iter().enumerate() {
            out[c].label[i] = best;
            out[c].prob[i] = bp;
            out[c].uncertainty[i] = (1.0 - bp).max(0.0);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::{RngExt, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn random_points(n: usize, dim: usize, seed: u64, grid: bool) -> Vec<f64> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n * dim)
            .map(|_| {
                if grid {
                    rng.random_range(0..4) as f64 // many exact distance ties
                } else {
                    rng.random::<f64>() * 10.0 - 5.0
                }
            })
            .collect()
    }

    #[test]
    fn tree_matches_brute_force() {
        for &(nr, nq, dim, k, grid) in &[
            (500, 60, 10, 15, false),
            (300, 40, 3, 50, false),
            (200, 30, 2, 7, true),
            (40, 10, 5, 40, true),
            (1, 3, 4, 1, false),
        ] {
            let r = random_points(nr, dim, 1, grid);
            let q = random_points(nq, dim, 2, grid);
            let re = Embedding::new(nr, dim, &r, "reference").unwrap();
            let qe = Embedding::new(nq, dim, &q, "query").unwrap();
            let a = knn(&re, &qe, k).unwrap();
            let b = knn_brute(&re, &qe, k).unwrap();
            assert_eq!(a, b, "n_ref {nr} dim {dim} k {k} grid {grid}");
        }
    }

    #[test]
    fn identical_reference_points_break_ties_by_index() {
        let r = vec![1.0; 30 * 2]; // 30 identical points
        let q = vec![0.0, 0.0];
        let re = Embedding::new(30, 2, &r, "reference").unwrap();
        let qe = Embedding::new(1, 2, &q, "query").unwrap();
        let a = knn(&re, &qe, 5).unwrap();
        assert_eq!(a.index, vec![0, 1, 2, 3, 4]);
        assert!(a.dist.iter().all(|&d| (d - 2f64.sqrt()).abs() < 1e-15));
    }

    #[test]
    fn kernel_is_linear_in_distance_with_population_std() {
        let d = [1.0, 2.0, 4.0];
        let mean = 7.0 / 3.0;
        let s: f64 = (((1.0 - mean) * (1.0 - mean)
            + (2.0 - mean) * (2.0 - mean)
            + (4.0 - mean) * (4.0 - mean))
            / 3.0f64)
            .sqrt();
        let raw: Vec<f64> = d.iter().map(|x: &f64| (-x * s * s / 4.0).exp()).collect();
        let tot: f64 = raw.iter().sum();
        let w = kernel_weights(&d);
        for (a, b) in w.iter().zip(&raw) {
            assert!((a - b / tot).abs() < 1e-15);
        }
        // zero spread: uniform weights
        assert_eq!(kernel_weights(&[3.0, 3.0, 3.0, 3.0]), vec![0.25; 4]);
        // all kernel values underflow: NaN weights (scArches gives no label)
        assert!(kernel_weights(&[1e3, 2e3, 3e3]).iter().all(|w| w.is_nan()));
    }

    #[test]
    fn vote_ties_go_to_first_sorted_label_and_underflow_gives_none() {
        // 4 neighbours at equal distance: uniform weights, labels 1,0,1,0 -> tie -> 0
        let nb = Neighbors {
            k: 4,
            index: vec![0, 1, 2, 3, 0, 1, 2, 3],
            dist: vec![2.0, 2.0, 2.0, 2.0, 1e3, 2e3, 3e3, 4e3],
        };
        let codes = [1, 0, 1, 0];
        let r = transfer(
            &nb,
            &[LabelColumn {
                codes: &codes,
                n_levels: 2,
            }],
        )
        .unwrap();
        assert_eq!(r[0].label, vec![0, -1]);
        assert_eq!(r[0].prob, vec![0.5, 0.0]);
        assert_eq!(r[0].uncertainty, vec![0.5, 1.0]);
    }

    #[test]
    fn numpy_sum_matches_numpy() {
        // np.sum(((np.arange(1, n + 1) * 0.1) ** 2) / m) from numpy 2.4; a sequential sum
        // gives a different last digit in each case
        let v = |n: usize, m: f64| {
            (1..=n)
                .map(|i| (i as f64 * 0.1) * (i as f64 * 0.1) / m)
                .collect::<Vec<f64>>()
        };
        assert_eq!(numpy_sum(&v(50, 7.0)), 61.32142857142858);
        assert_eq!(numpy_sum(&v(129, 11.0)), 658.0954545454547);
        assert_eq!(numpy_sum(&v(300, 3.0)), 30150.16666666667);
        assert_ne!(v(50, 7.0).iter().sum::<f64>(), 61.32142857142858);
        assert_eq!(numpy_sum(&[]), 0.0);
        // same value as exact summation up to rounding
        let x: Vec<f64> = (0..1000).map(|i| ((i * 37) % 101) as f64 * 0.013).collect();
        let naive: f64 = x.iter().sum();
        assert!((numpy_sum(&x) - naive).abs() < 1e-9);
    }

    #[test]
    fn errors() {
        let r = [0.0; 6];
        let re = Embedding::new(3, 2, &r, "reference").unwrap();
        let q = [0.0; 3];
        let qe = Embedding::new(1, 3, &q, "query").unwrap();
        assert!(matches!(knn(&re, &qe, 1), Err(ScError::Dims(_))));
        let q2 = [0.0; 2];
        let qe2 = Embedding::new(1, 2, &q2, "query").unwrap();
        assert!(matches!(knn(&re, &qe2, 4), Err(ScError::Input(_))));
        assert!(matches!(knn(&re, &qe2, 0), Err(ScError::Input(_))));
        assert!(matches!(
            Embedding::new(3, 2, &[0.0; 5], "x"),
            Err(ScError::Dims(_))
        ));
        let bad = [0.0, f64::NAN];
        assert!(matches!(
            Embedding::new(1, 2, &bad, "x"),
            Err(ScError::Value(_))
        ));
        let nb = knn(&re, &qe2, 2).unwrap();
        let codes = [0, -1, 0];
        assert!(matches!(
            transfer(
                &nb,
                &[LabelColumn {
                    codes: &codes,
                    n_levels: 1
                }]
            ),
            Err(ScError::Groups(_))
        ));
    }

    /// Naive vote: per sorted label, sum of weights; strict > from 0.
    fn naive_vote(w: &[f64], labels: &[i32], n_levels: usize) -> (i32, f64) {
        let (mut best, mut bp) = (-1, 0.0);
        for l in 0..n_levels as i32 {
            if !labels.contains(&l) {
                continue;
            }
            let p: f64 = w
                .iter()
                .zip(labels)
                .filter(|(_, &c)| c == l)
                .map(|(w, _)| w)
                .sum();
            if bp < p {
                bp = p;
                best = l;
            }
        }
        (best, bp)
    }

    proptest! {
        #[test]
        fn tree_equals_brute_and_vote_equals_naive(
            nr in 1usize..120,
            nq in 1usize..20,
            dim in 1usize..6,
            kf in 0.0f64..1.0,
            seed in 0u64..1000,
            grid in any::<bool>(),
            n_levels in 1usize..5,
        ) {
            let k = 1 + ((nr - 1) as f64 * kf) as usize;
            let r = random_points(nr, dim, seed, grid);
            let q = random_points(nq, dim, seed + 7, grid);
            let re = Embedding::new(nr, dim, &r, "reference").unwrap();
            let qe = Embedding::new(nq, dim, &q, "query").unwrap();
            let a = with_pool(|| knn(&re, &qe, k).unwrap());
            let b = knn_brute(&re, &qe, k).unwrap();
            prop_assert_eq!(&a, &b);
            let codes: Vec<i32> = (0..nr).map(|i| ((i * 7 + seed as usize) % n_levels) as i32).collect();
            let res = transfer(&a, &[LabelColumn { codes: &codes, n_levels }]).unwrap();
            for i in 0..nq {
                let w = kernel_weights(&a.dist[i * k..(i + 1) * k]);
                let labs: Vec<i32> = a.index[i * k..(i + 1) * k].iter().map(|&j| codes[j]).collect();
                let (bl, bp) = naive_vote(&w, &labs, n_levels);
                prop_assert!((res[0].prob[i] - bp).abs() < 1e-12);
                prop_assert!((res[0].uncertainty[i] - (1.0 - bp).max(0.0)).abs() < 1e-12);
                // labels agree unless the top two are within rounding of each other
                if res[0].label[i] != bl {
                    let p_ours: f64 = w.iter().zip(&labs).filter(|(_, &c)| c == res[0].label[i]).map(|(w, _)| w).sum();
                    prop_assert!((p_ours - bp).abs() < 1e-12);
                }
                let wsum: f64 = w.iter().sum();
                prop_assert!((wsum - 1.0).abs() < 1e-12);
            }
        }
    }

    fn with_pool<T: Send>(f: impl FnOnce() -> T + Send) -> T {
        crate::threads::with_threads(2, f).unwrap()
    }
}
