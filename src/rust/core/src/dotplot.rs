//! Marker dotplot aggregation, identical to scanpy's `sc.pl.dotplot` data
//! (spec §1): per group and gene, the fraction of cells with `x > expression_cutoff`
//! (dot size) and the mean expression (dot colour), optionally over expressing cells
//! only, then `standard_scale` of the colour values.
//!
//! One parallel pass over the stored values of the cells; selected genes are found
//! through a row -> slot table, so the cost is O(nnz) for sparse input and
//! O(cells x genes) for dense input, and the matrix is never copied.

use crate::error::{ScError, ScResult};
use crate::matrix::ExprMatrix;
use rayon::prelude::*;

/// How the colour matrix is rescaled to 0..1 (scanpy's `standard_scale`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StandardScale {
    None,
    /// per gene, across groups
    Var,
    /// per group, across genes
    Group,
}

impl std::str::FromStr for StandardScale {
    type Err = ScError;
    fn from_str(s: &str) -> ScResult<Self> {
        match s {
            "none" => Ok(Self::None),
            "var" => Ok(Self::Var),
            "group" => Ok(Self::Group),
            _ => Err(ScError::Input(format!(
                "standard_scale must be one of \"none\", \"var\", \"group\", not \"{s}\""
            ))),
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct DotplotOptions {
    pub expression_cutoff: f64,
    pub mean_only_expressed: bool,
    pub standard_scale: StandardScale,
    /// apply log1p to the values first (scanpy's `log=True`)
    pub log: bool,
    /// apply expm1 to the values first (Seurat's fold change of log-normalised data:
    /// means of `expm1(x)`; the fraction then counts `expm1(x) > cutoff`)
    pub expm1: bool,
}

impl DotplotOptions {
    /// The value transform: log1p, expm1 or none.
    #[inline(always)]
    fn tf(&self, v: f64) -> f64 {
        if self.log {
            v.ln_1p()
        } else if self.expm1 {
            v.exp_m1()
        } else {
            v
        }
    }
}

impl Default for DotplotOptions {
    fn default() -> Self {
        Self {
            expression_cutoff: 0.0,
            mean_only_expressed: false,
            standard_scale: StandardScale::None,
            log: false,
            expm1: false,
        }
    }
}

/// Results in group-fastest order: entry `k * n_groups + g` is gene `k`, group `g`.
#[derive(Debug, Clone, PartialEq)]
pub struct DotplotResult {
    pub n_groups: usize,
    pub n_genes: usize,
    /// cells per group (groups with 0 cells get NaN statistics)
    pub n_cells: Vec<usize>,
    pub mean: Vec<f64>,
    pub fraction: Vec<f64>,
    /// `mean` after `standard_scale`
    pub color: Vec<f64>,
}

/// The sums of one (group, gene) pair, together so that a value touches one cache line.
#[derive(Clone, Copy, Default)]
struct Cell {
    sum: f64,
    sum_expr: f64,
    n_expr: u64,
    n_stored: u64,
}

#[derive(Clone)]
struct Acc {
    cells: Vec<Cell>,
    n_cells: Vec<u64>,
    bad: Option<f64>,
    /// recent (value bits, expm1(value)) pairs: log-normalised data repeats a few values
    /// per cell (one per count), and expm1 costs ~8 ns a value
    memo: Vec<(u64, f64)>,
}

/// Entries of [`Acc::memo`] (a power of two).
const MEMO: usize = 256;

impl Acc {
    fn new(n_groups: usize, n_slots: usize) -> Self {
        let n = n_groups * n_slots;
        Self {
            cells: vec![Cell::default(); n],
            n_cells: vec![0; n_groups],
            bad: None,
            memo: Vec::new(),
        }
    }
    /// `opt.tf(v)`, with expm1 looked up in the memo first.
    #[inline]
    fn tf(&mut self, opt: &DotplotOptions, v: f64) -> f64 {
        // (log and expm1 together are refused before the pass)
        if !opt.expm1 {
            return opt.tf(v);
        }
        if self.memo.is_empty() {
            // no value has these bits and NaN's expm1 is NaN: never a wrong hit
            self.memo = vec![(u64::MAX, f64::NAN); MEMO];
        }
        let b = v.to_bits();
        let k = (b.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as usize & (MEMO - 1);
        let e = &mut self.memo[k];
        if e.0 != b {
            *e = (b, v.exp_m1());
        }
        e.1
    }
    #[inline]
    fn add(&mut self, idx: usize, v: f64, cutoff: f64) {
        if v.is_nan() {
            self.bad = Some(v);
        }
        let c = &mut self.cells[idx];
        c.sum += v;
        c.n_stored += 1;
        if v > cutoff {
            c.n_expr += 1;
            c.sum_expr += v;
        }
    }
    fn merge(mut self, o: Acc) -> Acc {
        for (a, b) in self.cells.iter_mut().zip(&o.cells) {
            a.sum += b.sum;
            a.sum_expr += b.sum_expr;
            a.n_expr += b.n_expr;
            a.n_stored += b.n_stored;
        }
        for (a, b) in self.n_cells.iter_mut().zip(&o.n_cells) {
            *a += b;
        }
        self.bad = self.bad.or(o.bad);
        self
    }
}

/// Aggregate `genes` (row indices, duplicates allowed) over cell groups.
///
/// `groups[j]` is the 0-based group of cell `j`, or a negative number to leave the
/// cell out (scanpy drops cells whose group is NaN).
pub fn dotplot(
    m: &ExprMatrix,
    genes: &[usize],
    groups: &[i32],
    n_groups: usize,
    opt: &DotplotOptions,
) -> ScResult<DotplotResult> {
    let (nrow, ncol) = (m.nrow(), m.ncol());
    if groups.len() != ncol {
        return Err(ScError::Dims(format!(
            "{} group labels for {} cells; give one label per cell (column)",
            groups.len(),
            ncol
        )));
    }
    if let Some(&g) = groups.iter().find(|&&g| g >= 0 && g as usize >= n_groups) {
        return Err(ScError::Groups(format!(
            "group code {g} is outside 0..{n_groups}"
        )));
    }
    if let Some(&r) = genes.iter().find(|&&r| r >= nrow) {
        return Err(ScError::Input(format!(
            "gene index {r} is outside the matrix's {nrow} rows"
        )));
    }
    if opt.log && opt.expm1 {
        return Err(ScError::Input(
            "choose one transform of the values: log1p or expm1, not both".into(),
        ));
    }
    if opt.expression_cutoff.is_nan() {
        return Err(ScError::Input("expression_cutoff must not be NaN".into()));
    }
    // unique rows -> slots
    let mut slot_of_row = vec![u32::MAX; nrow];
    let mut rows: Vec<usize> = Vec::new();
    for &r in genes {
        if slot_of_row[r] == u32::MAX {
            slot_of_row[r] = rows.len() as u32;
            rows.push(r);
        }
    }
    let ns = rows.len();
    // selected rows in increasing order, for the search path
    let mut sel_sorted: Vec<(i32, usize)> = rows
        .iter()
        .enumerate()
        .map(|(s, &r)| (r as i32, s))
        .collect();
    sel_sorted.sort_unstable();
    // Few genes: binary-search each selected row in the (sorted) column instead of
    // reading every stored value; the scan is memory-bound, the search is not.
    let search = match m {
        ExprMatrix::Csc(c) if ncol > 0 => {
            let avg = c.nnz() as f64 / ncol as f64;
            (ns as f64) * (avg.max(2.0).log2() + 1.0) < avg
        }
        _ => false,
    };
    let cutoff = opt.expression_cutoff;
    let step = |mut acc: Acc, j: usize| -> Acc {
        let g = groups[j];
        if g < 0 {
            return acc;
        }
        let g = g as usize;
        acc.n_cells[g] += 1;
        let base = g * ns;
        match m {
            ExprMatrix::Csc(c) if search => {
                let (is, xs) = c.col(j);
                let mut lo = 0;
                for &(r, s) in &sel_sorted {
                    lo += is[lo..].partition_point(|&q| q < r);
                    if lo == is.len() {
                        break;
                    }
                    if is[lo] == r {
                        let t = acc.tf(opt, xs[lo]);
                        acc.add(base + s, t, cutoff);
                    }
                }
            }
            ExprMatrix::Csc(c) => {
                let (is, xs) = c.col(j);
                for (&r, &v) in is.iter().zip(xs) {
                    let s = slot_of_row[r as usize];
                    if s != u32::MAX {
                        let t = acc.tf(opt, v);
                        acc.add(base + s as usize, t, cutoff);
                    }
                }
            }
            ExprMatrix::Dense(d) => {
                let col = d.col(j);
                for (s, &r) in rows.iter().enumerate() {
                    let v = col[r];
                    // dense zeros are handled like sparse implicit zeros below
                    if v != 0.0 {
                        let t = acc.tf(opt, v);
                        acc.add(base + s, t, cutoff);
                    }
                }
            }
        }
        acc
    };
    // with every gene selected an accumulator is groups x genes x 32 bytes, so rayon's
    // fold (one per stolen split) would make and merge many: then one per range of
    // cells, a few ranges per thread
    let acc = if n_groups * ns * std::mem::size_of::<Cell>() <= 1 << 18 {
        // small accumulators (a few marker genes): rayon's fold balances best
        (0..ncol)
            .into_par_iter()
            .with_min_len(256)
            .fold(|| Acc::new(n_groups, ns), step)
            .reduce(|| Acc::new(n_groups, ns), Acc::merge)
    } else {
        let n_ranges = (rayon::current_num_threads() * 4).clamp(1, ncol.max(1));
        (0..n_ranges)
            .into_par_iter()
            .map(|k| {
                let (a, b) = (k * ncol / n_ranges, (k + 1) * ncol / n_ranges);
                (a..b).fold(Acc::new(n_groups, ns), step)
            })
            .reduce(|| Acc::new(n_groups, ns), Acc::merge)
    };

    if let Some(v) = acc.bad {
        return Err(ScError::Value(format!(
            "the expression matrix holds {v} for a selected gene; remove or impute \
             non-finite values first"
        )));
    }

    let zero_expressed = 0.0 > cutoff;
    let ng = n_groups;
    let nk = genes.len();
    let mut mean = vec![f64::NAN; ng * nk];
    let mut fraction = vec![f64::NAN; ng * nk];
    for (k, &r) in genes.iter().enumerate() {
        let s = slot_of_row[r] as usize;
        for g in 0..ng {
            let n = acc.n_cells[g];
            if n == 0 {
                continue;
            }
            let idx = g * ns + s;
            let c = &acc.cells[idx];
            let zeros = n - c.n_stored;
            let n_expr = c.n_expr + if zero_expressed { zeros } else { 0 };
            let out = k * ng + g;
            fraction[out] = n_expr as f64 / n as f64;
            mean[out] = if opt.mean_only_expressed {
                if n_expr > 0 {
                    c.sum_expr / n_expr as f64
                } else {
                    0.0
                }
            } else {
                c.sum / n as f64
            };
        }
    }
    let color = standard_scale(&mean, ng, nk, opt.standard_scale);
    Ok(DotplotResult {
        n_groups: ng,
        n_genes: nk,
        n_cells: acc.n_cells.iter().map(|&c| c as usize).collect(),
        mean,
        fraction,
        color,
    })
}

/// scanpy's standard_scale on a group-fastest matrix: subtract the min, divide by the
/// max, along genes (`Var`: each gene across groups) or groups (`Group`); 0/0 gives 0.
/// NaN entries (empty groups) are ignored and stay NaN.
pub fn standard_scale(m: &[f64], ng: usize, nk: usize, how: StandardScale) -> Vec<f64> {
    let mut out = m.to_vec();
    let scale = |idx: &mut dyn Iterator<Item = usize>, out: &mut Vec<f64>| {
        let idx: Vec<usize> = idx.filter(|&i| !out[i].is_nan()).collect();
        let min = idx.iter().map(|&i| out[i]).fold(f64::INFINITY, f64::min);
        for &i in &idx {
            out[i] -= min;
        }
        let max = idx
            .iter()
            .map(|&i| out[i])
            .fold(f64::NEG_INFINITY, f64::max);
        for &i in &idx {
            let v = out[i] / max;
            out[i] = if v.is_nan() { 0.0 } else { v };
        }
    };
    match how {
        StandardScale::None => {}
        StandardScale::Var => {
            for k in 0..nk {
                scale(&mut (k * ng..(k + 1) * ng), &mut out);
            }
        }
        StandardScale::Group => {
            for g in 0..ng {
                scale(&mut (0..nk).map(|k| k * ng + g), &mut out);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matrix::{CscOwned, DenseView};
    use proptest::prelude::*;

    /// Straightforward reference: loop over every cell and gene of a dense matrix.
    fn naive(
        d: &[f64],
        nrow: usize,
        genes: &[usize],
        groups: &[i32],
        ng: usize,
        opt: &DotplotOptions,
    ) -> (Vec<f64>, Vec<f64>) {
        let mut mean = vec![f64::NAN; ng * genes.len()];
        let mut frac = mean.clone();
        for (k, &r) in genes.iter().enumerate() {
            for g in 0..ng {
                let vals: Vec<f64> = groups
                    .iter()
                    .enumerate()
                    .filter(|(_, &gg)| gg == g as i32)
                    .map(|(j, _)| d[j * nrow + r])
                    .map(|v| opt.tf(v))
                    .collect();
                if vals.is_empty() {
                    continue;
                }
                let ex: Vec<f64> = vals
                    .iter()
                    .copied()
                    .filter(|&v| v > opt.expression_cutoff)
                    .collect();
                frac[k * ng + g] = ex.len() as f64 / vals.len() as f64;
                mean[k * ng + g] = if opt.mean_only_expressed {
                    if ex.is_empty() {
                        0.0
                    } else {
                        ex.iter().sum::<f64>() / ex.len() as f64
                    }
                } else {
                    vals.iter().sum::<f64>() / vals.len() as f64
                };
            }
        }
        (mean, frac)
    }

    fn close(a: &[f64], b: &[f64]) -> bool {
        a.iter()
            .zip(b)
            .all(|(x, y)| (x.is_nan() && y.is_nan()) || (x - y).abs() < 1e-12)
    }

    #[test]
    fn small_example_by_hand() {
        // 2 genes x 4 cells; groups A A B B
        let d = [1.0, 0.0, 3.0, 2.0, 0.0, 0.0, 0.0, -1.0];
        let m = CscOwned::from_dense(2, 4, &d);
        let r = dotplot(
            &ExprMatrix::Csc(m.view()),
            &[0, 1, 0],
            &[0, 0, 1, 1],
            2,
            &DotplotOptions::default(),
        )
        .unwrap();
        assert_eq!(r.mean, vec![2.0, 0.0, 1.0, -0.5, 2.0, 0.0]);
        assert_eq!(r.fraction, vec![1.0, 0.0, 0.5, 0.0, 1.0, 0.0]);
        // negative cutoff: zeros and -1 > -2 count as expressed
        let opt = DotplotOptions {
            expression_cutoff: -2.0,
            mean_only_expressed: true,
            ..Default::default()
        };
        let r = dotplot(&ExprMatrix::Csc(m.view()), &[1], &[0, 0, 1, 1], 2, &opt).unwrap();
        assert_eq!(r.fraction, vec![1.0, 1.0]);
        assert_eq!(r.mean, vec![1.0, -0.5]);
    }

    #[test]
    fn search_and_scan_paths_agree() {
        // 400 genes x 30 cells, dense-ish columns, 3 genes selected -> search path
        let (nrow, ncol) = (400, 30);
        let d: Vec<f64> = (0..nrow * ncol)
            .map(|k| {
                if (k * 7919) % 3 == 0 {
                    0.0
                } else {
                    ((k * 31) % 17) as f64 - 4.0
                }
            })
            .collect();
        let s = CscOwned::from_dense(nrow, ncol, &d);
        let groups: Vec<i32> = (0..ncol as i32)
            .map(|j| j % 3 - (j % 7 == 0) as i32)
            .collect();
        let genes = [399usize, 0, 17, 0];
        let opt = DotplotOptions::default();
        let a = dotplot(&ExprMatrix::Csc(s.view()), &genes, &groups, 3, &opt).unwrap();
        let (mean, frac) = naive(&d, nrow, &genes, &groups, 3, &opt);
        assert!(close(&a.mean, &mean) && close(&a.fraction, &frac));
        // all genes selected -> scan path
        let all: Vec<usize> = (0..nrow).collect();
        let b = dotplot(&ExprMatrix::Csc(s.view()), &all, &groups, 3, &opt).unwrap();
        let (mean, frac) = naive(&d, nrow, &all, &groups, 3, &opt);
        assert!(close(&b.mean, &mean) && close(&b.fraction, &frac));
    }

    #[test]
    fn expm1_memo_gives_expm1_of_every_value() {
        // 1,000 distinct values, each over several cells, in 256 memo entries: slots are
        // shared and overwritten, yet every value must get its own expm1
        let ncol = 5000;
        let d: Vec<f64> = (0..ncol)
            .map(|j| 0.001 * ((j * 7) % 1000) as f64 + 0.5)
            .collect();
        let m = CscOwned::from_dense(1, ncol, &d);
        let opt = DotplotOptions {
            expm1: true,
            ..Default::default()
        };
        let groups = vec![0i32; ncol];
        let r = dotplot(&ExprMatrix::Csc(m.view()), &[0], &groups, 1, &opt).unwrap();
        let want = d.iter().map(|v| v.exp_m1()).sum::<f64>() / ncol as f64;
        assert!(
            (r.mean[0] - want).abs() <= 1e-14 * want,
            "{} vs {want}",
            r.mean[0]
        );
        assert_eq!(r.fraction[0], 1.0);
        let both = DotplotOptions { log: true, ..opt };
        assert!(dotplot(&ExprMatrix::Csc(m.view()), &[0], &groups, 1, &both).is_err());
    }

    #[test]
    fn standard_scale_constant_gene_is_zero() {
        let m = [1.0, 1.0, 0.0, 2.0];
        assert_eq!(
            standard_scale(&m, 2, 2, StandardScale::Var),
            vec![0.0, 0.0, 0.0, 1.0]
        );
        assert_eq!(
            standard_scale(&m, 2, 2, StandardScale::Group),
            vec![1.0, 0.0, 0.0, 1.0]
        );
    }

    #[test]
    fn errors() {
        let m = CscOwned::from_dense(1, 2, &[1.0, f64::NAN]);
        let v = ExprMatrix::Csc(m.view());
        let o = DotplotOptions::default();
        assert!(matches!(
            dotplot(&v, &[0], &[0, 0], 1, &o),
            Err(ScError::Value(_))
        ));
        assert!(matches!(
            dotplot(&v, &[0], &[0], 1, &o),
            Err(ScError::Dims(_))
        ));
        assert!(matches!(
            dotplot(&v, &[3], &[0, 0], 1, &o),
            Err(ScError::Input(_))
        ));
        assert!(matches!(
            dotplot(&v, &[0], &[0, 5], 1, &o),
            Err(ScError::Groups(_))
        ));
        // NaN in an unselected cell group is fine: excluded cells are skipped
        assert!(dotplot(&v, &[0], &[0, -1], 1, &o).is_ok());
    }

    proptest! {
        #[test]
        fn sparse_dense_and_naive_agree(
            vals in proptest::collection::vec(-3i32..6, 40),
            groups in proptest::collection::vec(-1i32..3, 8),
            cutoff in -1.0f64..2.0,
            only in any::<bool>(),
            log in any::<bool>(),
            expm1 in any::<bool>(),
        ) {
            let (nrow, ncol) = (5, 8);
            // negatives only without log (log1p of values <= -1 is NaN, an error)
            let d: Vec<f64> = vals.iter().map(|&v| if (0..2).contains(&v) { 0.0 } else if log { v.abs() as f64 * 0.7 } else { v as f64 * 0.7 }).collect();
            let genes = [4usize, 0, 2, 0];
            let opt = DotplotOptions { expression_cutoff: cutoff, mean_only_expressed: only, standard_scale: StandardScale::None, log, expm1: expm1 && !log };
            let s = CscOwned::from_dense(nrow, ncol, &d);
            let a = dotplot(&ExprMatrix::Csc(s.view()), &genes, &groups, 3, &opt).unwrap();
            let b = dotplot(&ExprMatrix::Dense(DenseView::new(nrow, ncol, &d).unwrap()), &genes, &groups, 3, &opt).unwrap();
            let (mean, frac) = naive(&d, nrow, &genes, &groups, 3, &opt);
            prop_assert!(close(&a.mean, &mean));
            prop_assert!(close(&a.fraction, &frac));
            prop_assert!(close(&b.mean, &mean));
            prop_assert!(close(&b.fraction, &frac));
        }
    }
}
