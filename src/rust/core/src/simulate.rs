//! A generator of realistic labelled counts: gamma-Poisson (negative binomial) counts for
//! cell types with marker genes carrying real symbols (PTPRC, CD3D, MS4A1, EPCAM, PECAM1,
//! COL1A2, ...), per-cell library sizes and multiplicative per-batch gene effects.
//! Any size, seeded, and identical for any number of threads (each cell draws from its own
//! ChaCha stream).

use crate::error::{ScError, ScResult};
use crate::matrix::CscOwned;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Gamma, LogNormal, Normal, Poisson};
use rayon::prelude::*;

/// Cell types and their markers, in the order `n_types` takes them.
pub const CELL_TYPES: &[(&str, &[&str])] = &[
    ("CD4 T", &["PTPRC", "CD3D", "CD3E", "IL7R", "CCR7", "LEF1"]),
    ("CD8 T", &["PTPRC", "CD3D", "CD3E", "CD8A", "CD8B", "GZMK"]),
    ("NK", &["PTPRC", "GNLY", "NKG7", "KLRD1", "PRF1", "GZMB"]),
    ("B", &["PTPRC", "MS4A1", "CD79A", "CD79B", "CD19", "BANK1"]),
    (
        "CD14 Mono",
        &["PTPRC", "CD14", "LYZ", "S100A8", "S100A9", "FCN1"],
    ),
    ("Epithelial", &["EPCAM", "KRT8", "KRT18", "KRT19", "CDH1"]),
    ("Endothelial", &["PECAM1", "VWF", "CDH5", "CLDN5", "KDR"]),
    ("Fibroblast", &["COL1A2", "COL1A1", "DCN", "LUM", "PDGFRA"]),
    (
        "FCGR3A Mono",
        &["PTPRC", "FCGR3A", "MS4A7", "LST1", "AIF1", "IFITM3"],
    ),
    (
        "DC",
        &["PTPRC", "FCER1A", "CST3", "CLEC10A", "CD1C", "HLA-DQA1"],
    ),
    ("Platelet", &["PPBP", "PF4", "GP9", "ITGA2B", "TUBB1"]),
    (
        "Plasma",
        &["PTPRC", "MZB1", "JCHAIN", "IGHG1", "SDC1", "XBP1"],
    ),
];

#[derive(Debug, Clone)]
pub struct SimParams {
    pub n_cells: usize,
    pub n_genes: usize,
    pub n_types: usize,
    pub n_batches: usize,
    pub seed: u64,
    /// mean total counts per cell
    pub depth: f64,
    /// fold change of a marker in its own cell types
    pub marker_fold: f64,
    /// sd (natural log) of the per-batch, per-gene multiplicative effect
    pub batch_effect: f64,
}

impl Default for SimParams {
    fn default() -> Self {
        Self {
            n_cells: 1000,
            n_genes: 2000,
            n_types: 8,
            n_batches: 2,
            seed: 42,
            depth: 3000.0,
            marker_fold: 30.0,
            batch_effect: 0.25,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Simulated {
    /// genes x cells counts
    pub counts: CscOwned,
    pub genes: Vec<String>,
    pub type_names: Vec<String>,
    /// 0-based type of each cell
    pub cell_type: Vec<u32>,
    /// 0-based batch of each cell
    pub batch: Vec<u32>,
}

fn bad(msg: String) -> ScError {
    ScError::Input(msg)
}

/// Gene-level parameters shared by both generators, drawn from stream 0 of the seed.
struct Model {
    genes: Vec<String>,
    disp: Vec<f64>,
    /// relative expression per type (sums to 1)
    rel: Vec<Vec<f64>>,
    batch_fac: Vec<Vec<f64>>,
    /// cumulative type proportions
    cum: Vec<f64>,
    size_d: LogNormal<f64>,
}

impl Model {
    /// Type, batch and library size factor of cell `j` (its own ChaCha stream, which the
    /// caller keeps drawing from).
    fn cell(&self, p: &SimParams, j: usize) -> (usize, usize, f64, ChaCha8Rng) {
        let mut r = ChaCha8Rng::seed_from_u64(p.seed);
        r.set_stream(j as u64 + 1);
        let u: f64 = r.random();
        let t = self
            .cum
            .iter()
            .position(|&c| u < c)
            .unwrap_or(p.n_types - 1);
        let b = r.random_range(0..p.n_batches);
        let size = self.size_d.sample(&mut r);
        (t, b, size, r)
    }
}

fn model(p: &SimParams) -> ScResult<Model> {
    if p.n_types == 0 || p.n_types > CELL_TYPES.len() {
        return Err(bad(format!(
            "n_types must be between 1 and {}",
            CELL_TYPES.len()
        )));
    }
    if p.n_batches == 0 || p.n_cells == 0 {
        return Err(bad("n_cells and n_batches must be at least 1".into()));
    }
    if !(p.depth > 0.0 && p.marker_fold >= 1.0 && p.batch_effect >= 0.0) {
        return Err(bad(
            "depth must be > 0, marker_fold >= 1 and batch_effect >= 0".into(),
        ));
    }
    if p.n_cells > i32::MAX as usize || p.n_genes > i32::MAX as usize {
        return Err(bad("n_cells and n_genes must fit a 32-bit integer".into()));
    }
    let types = &CELL_TYPES[..p.n_types];
    // gene names: the markers of the chosen types first, then fillers
    let mut genes: Vec<String> = Vec::new();
    for (_, ms) in types {
        for m in *ms {
            if !genes.iter().any(|g| g == m) {
                genes.push(m.to_string());
            }
        }
    }
    if p.n_genes < genes.len() {
        return Err(bad(format!(
            "n_genes must be at least {} to hold the markers of {} cell types",
            genes.len(),
            p.n_types
        )));
    }
    let n_markers = genes.len();
    for k in n_markers..p.n_genes {
        genes.push(format!("GENE{:05}", k + 1));
    }
    let ng = p.n_genes;

    // gene-level parameters from stream 0
    let mut rng = ChaCha8Rng::seed_from_u64(p.seed);
    let base_ln = Normal::new(-1.0, 1.6).unwrap();
    let mut base: Vec<f64> = (0..ng)
        .map(|_| Distribution::<f64>::sample(&base_ln, &mut rng).exp())
        .collect();
    // markers: a low baseline share of a cell's counts (5e-5, like CD3D outside T cells),
    // raised `marker_fold`-fold in their own types
    let other: f64 = base[n_markers..].iter().sum::<f64>().max(1.0);
    for b in base.iter_mut().take(n_markers) {
        *b = 5e-5 * other;
    }
    let disp: Vec<f64> = (0..ng).map(|_| 0.1 + 0.6 * rng.random::<f64>()).collect();
    let fold_ln = Normal::new(p.marker_fold.ln(), 0.3).unwrap();
    // relative expression per type (normalised to sum 1)
    let mut rel: Vec<Vec<f64>> = Vec::with_capacity(p.n_types);
    for (_, ms) in types {
        let mut r = base.clone();
        for m in *ms {
            let k = genes.iter().position(|g| g == m).unwrap();
            r[k] *= Distribution::<f64>::sample(&fold_ln, &mut rng).exp();
        }
        // a little type-specific noise on every gene
        for v in r.iter_mut() {
            *v *= (0.15 * Distribution::<f64>::sample(&Normal::new(0.0, 1.0).unwrap(), &mut rng))
                .exp();
        }
        let s: f64 = r.iter().sum();
        rel.push(r.into_iter().map(|v| v / s).collect());
    }
    let batch_fac: Vec<Vec<f64>> = (0..p.n_batches)
        .map(|_| {
            let d = LogNormal::new(0.0, p.batch_effect.max(1e-12)).unwrap();
            (0..ng).map(|_| d.sample(&mut rng)).collect()
        })
        .collect();
    // type proportions: uneven, like real tissues
    let w: Vec<f64> = (0..p.n_types)
        .map(|t| 1.0 / (t as f64 + 1.5).powf(0.6))
        .collect();
    let wsum: f64 = w.iter().sum();
    let cum: Vec<f64> = w
        .iter()
        .scan(0.0, |a, v| {
            *a += v / wsum;
            Some(*a)
        })
        .collect();
    let size_d = LogNormal::new(0.0, 0.35).unwrap();

    Ok(Model {
        genes,
        disp,
        rel,
        batch_fac,
        cum,
        size_d,
    })
}

pub fn simulate(p: &SimParams) -> ScResult<Simulated> {
    let md = model(p)?;
    let ng = p.n_genes;
    let (rel, batch_fac, disp) = (&md.rel, &md.batch_fac, &md.disp);
    let cells: Vec<(u32, u32, Vec<i32>, Vec<f64>)> = (0..p.n_cells)
        .into_par_iter()
        .map(|j| {
            let (t, b, size, mut r) = md.cell(p, j);
            let size = p.depth * size;
            let (mut is, mut xs) = (Vec::new(), Vec::new());
            for k in 0..ng {
                let mu = size * rel[t][k] * batch_fac[b][k];
                let phi = disp[k];
                let lam = Gamma::new(1.0 / phi, mu * phi)
                    .map(|g| g.sample(&mut r))
                    .unwrap_or(0.0);
                if lam > 0.0 {
                    if let Ok(po) = Poisson::new(lam) {
                        let c: f64 = po.sample(&mut r);
                        if c > 0.0 {
                            is.push(k as i32);
                            xs.push(c);
                        }
                    }
                }
            }
            (t as u32, b as u32, is, xs)
        })
        .collect();

    let nnz: usize = cells.iter().map(|c| c.2.len()).sum();
    if nnz > i32::MAX as usize {
        return Err(bad(format!(
            "{nnz} non-zeros exceed a dgCMatrix's 2^31 - 1 limit; simulate fewer cells"
        )));
    }
    let mut pp = Vec::with_capacity(p.n_cells + 1);
    pp.push(0i32);
    let (mut ii, mut xx) = (Vec::with_capacity(nnz), Vec::with_capacity(nnz));
    let (mut cell_type, mut batch) = (Vec::new(), Vec::new());
    for (t, b, is, xs) in cells {
        ii.extend_from_slice(&is);
        xx.extend_from_slice(&xs);
        pp.push(ii.len() as i32);
        cell_type.push(t);
        batch.push(b);
    }
    Ok(Simulated {
        counts: CscOwned {
            nrow: ng,
            ncol: p.n_cells,
            p: pp,
            i: ii,
            x: xx,
        },
        genes: md.genes,
        type_names: CELL_TYPES[..p.n_types]
            .iter()
            .map(|(n, _)| n.to_string())
            .collect(),
        cell_type,
        batch,
    })
}

/// The sparse generator for large data: each cell draws its library of counts from its
/// type's (batch-adjusted) gene distribution, so the cost is linear in the counts, not in
/// cells x genes. Built in two passes that both replay every cell's own stream: [`plan`]
/// counts each cell's detected genes (the column pointers, so the caller can allocate the
/// slots at their final size, e.g. as R vectors), then [`SparsePlan::fill`] writes the
/// row indices and counts into them in parallel. Same seed, same data, for any number of
/// threads.
///
/// [`plan`]: simulate_sparse_plan
pub struct SparsePlan {
    params: SimParams,
    pub genes: Vec<String>,
    pub type_names: Vec<String>,
    /// 0-based type of each cell
    pub cell_type: Vec<u32>,
    /// 0-based batch of each cell
    pub batch: Vec<u32>,
    /// column pointers (len n_cells + 1)
    pub p: Vec<i32>,
    /// counts drawn per unit library size factor (tuned to `genes_per_cell`)
    pub depth: f64,
    md: Model,
    /// alias table per (type, batch): probability threshold (high 32 bits) and alias
    tables: Vec<Vec<u64>>,
}

/// Walker/Vose alias table of `w` (non-negative, positive sum): entry = threshold << 32 |
/// alias, where a draw of bucket `k` with a uniform 32-bit `u` keeps `k` when
/// `u < threshold`, else takes the alias.
fn alias_table(w: &[f64]) -> Vec<u64> {
    let n = w.len();
    let s: f64 = w.iter().sum();
    let mut q: Vec<f64> = w.iter().map(|v| v * n as f64 / s).collect();
    let mut alias: Vec<u32> = (0..n as u32).collect();
    let (mut small, mut large): (Vec<usize>, Vec<usize>) = (0..n).partition(|&k| q[k] < 1.0);
    while let (Some(&l), Some(&g)) = (small.last(), large.last()) {
        small.pop();
        alias[l] = g as u32;
        q[g] -= 1.0 - q[l];
        if q[g] < 1.0 {
            large.pop();
            small.push(g);
        }
    }
    for k in large.into_iter().chain(small) {
        q[k] = 1.0;
    }
    q.iter()
        .zip(&alias)
        .map(|(&v, &a)| {
            let th = (v * 4294967296.0).min(4294967295.0) as u64;
            let th = if v >= 1.0 { 0xFFFF_FFFF } else { th };
            (th << 32) | a as u64
        })
        .collect()
}

/// wyrand: a fast, statistically sound 64-bit generator for the bulk draws (seeded per
/// cell from its ChaCha stream).
struct WyRand(u64);

impl WyRand {
    #[inline(always)]
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0xa076_1d64_78bd_642f);
        let t = (self.0 as u128).wrapping_mul((self.0 ^ 0xe703_7ed1_a0b4_28db) as u128);
        ((t >> 64) as u64) ^ (t as u64)
    }
}

/// Per-thread scratch of the sparse generator.
struct SparseScratch {
    count: Vec<u32>,
    touched: Vec<u32>,
}

impl SparsePlan {
    /// Draw cell `j`'s counts into `sc` (`touched` lists its detected genes, unsorted,
    /// `count` their counts). The caller resets `count` at the touched genes. Returns the
    /// cell's type and batch.
    fn draw(&self, j: usize, sc: &mut SparseScratch) -> (u32, u32) {
        let (t, b, size, mut r) = self.md.cell(&self.params, j);
        let lib = (self.depth * size).round().max(1.0) as u64;
        let tab = &self.tables[t * self.params.n_batches + b];
        let n = tab.len() as u64;
        let mut w = WyRand(r.random::<u64>());
        sc.touched.clear();
        for _ in 0..lib {
            let u = w.next();
            let k = ((u >> 32) * n) >> 32;
            let e = tab[k as usize];
            let g = if (u & 0xFFFF_FFFF) < (e >> 32) {
                k as u32
            } else {
                e as u32
            };
            let c = &mut sc.count[g as usize];
            if *c == 0 {
                sc.touched.push(g);
            }
            *c += 1;
        }
        (t as u32, b as u32)
    }

    fn scratch(&self) -> SparseScratch {
        SparseScratch {
            count: vec![0; self.genes.len()],
            touched: Vec::new(),
        }
    }

    /// Number of stored values.
    pub fn nnz(&self) -> usize {
        self.p.last().copied().unwrap_or(0) as usize
    }

    /// Write the row indices (sorted within cells) and counts; `i` and `x` must have
    /// length [`SparsePlan::nnz`].
    pub fn fill(&self, i: &mut [i32], x: &mut [f64]) -> ScResult<()> {
        let nnz = self.nnz();
        if i.len() != nnz || x.len() != nnz {
            return Err(ScError::Dims(format!(
                "the slots must hold {nnz} values, not {} and {}",
                i.len(),
                x.len()
            )));
        }
        const BLOCK: usize = 2048;
        let n_cells = self.params.n_cells;
        let mut blocks = Vec::with_capacity(n_cells.div_ceil(BLOCK));
        let (mut ri, mut rx) = (i, x);
        for c0 in (0..n_cells).step_by(BLOCK) {
            let c1 = (c0 + BLOCK).min(n_cells);
            let len = (self.p[c1] - self.p[c0]) as usize;
            let (a, b) = std::mem::take(&mut ri).split_at_mut(len);
            let (u, v) = std::mem::take(&mut rx).split_at_mut(len);
            blocks.push((c0, c1, a, u));
            ri = b;
            rx = v;
        }
        blocks.into_par_iter().for_each_init(
            || self.scratch(),
            |sc, (c0, c1, bi, bx)| {
                let base = self.p[c0] as usize;
                for j in c0..c1 {
                    self.draw(j, sc);
                    sc.touched.sort_unstable();
                    let o = self.p[j] as usize - base;
                    for (q, &g) in sc.touched.iter().enumerate() {
                        bi[o + q] = g as i32;
                        bx[o + q] = sc.count[g as usize] as f64;
                        sc.count[g as usize] = 0;
                    }
                }
            },
        );
        Ok(())
    }
}

/// Plan the sparse generator: cells drawing about `genes_per_cell` detected genes on
/// average (the library size is tuned to it). Counts per gene are Poisson given the
/// cell's library size and type/batch profile (no extra gene dispersion).
pub fn simulate_sparse_plan(p: &SimParams, genes_per_cell: f64) -> ScResult<SparsePlan> {
    let md = model(p)?;
    let ng = p.n_genes;
    if !(genes_per_cell >= 1.0 && genes_per_cell < 0.9 * ng as f64) {
        return Err(bad(format!(
            "genes_per_cell must be between 1 and 90% of n_genes ({}), not {genes_per_cell}",
            0.9 * ng as f64
        )));
    }
    let mut profiles = Vec::with_capacity(p.n_types * p.n_batches);
    for t in 0..p.n_types {
        for b in 0..p.n_batches {
            let w: Vec<f64> = (0..ng).map(|k| md.rel[t][k] * md.batch_fac[b][k]).collect();
            let s: f64 = w.iter().sum();
            profiles.push(w.into_iter().map(|v| v / s).collect::<Vec<f64>>());
        }
    }
    // library size giving the wanted mean of detected genes: sum_k 1 - exp(-L q_k),
    // averaged over the profiles, increases with L: bisection on log L
    let detected = |l: f64| {
        profiles
            .iter()
            .map(|q| q.iter().map(|&v| -(-l * v).exp_m1()).sum::<f64>())
            .sum::<f64>()
            / profiles.len() as f64
    };
    let (mut lo, mut hi) = (0.0f64, 40.0f64);
    for _ in 0..100 {
        let mid = 0.5 * (lo + hi);
        if detected(mid.exp()) < genes_per_cell {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let depth = (0.5 * (lo + hi)).exp();
    if depth > 1e8 {
        return Err(bad(format!(
            "genes_per_cell = {genes_per_cell} needs more than 1e8 counts per cell; ask for fewer"
        )));
    }
    let tables = profiles.iter().map(|q| alias_table(q)).collect();
    let mut plan = SparsePlan {
        params: p.clone(),
        genes: md.genes.clone(),
        type_names: CELL_TYPES[..p.n_types]
            .iter()
            .map(|(n, _)| n.to_string())
            .collect(),
        cell_type: Vec::new(),
        batch: Vec::new(),
        p: Vec::new(),
        depth,
        md,
        tables,
    };
    let per_cell: Vec<(u32, u32, u32)> = (0..p.n_cells)
        .into_par_iter()
        .map_init(
            || plan.scratch(),
            |sc, j| {
                let (t, b) = plan.draw(j, sc);
                for &g in &sc.touched {
                    sc.count[g as usize] = 0;
                }
                (t, b, sc.touched.len() as u32)
            },
        )
        .collect();
    plan.cell_type = per_cell.iter().map(|c| c.0).collect();
    plan.batch = per_cell.iter().map(|c| c.1).collect();
    let mut pp = Vec::with_capacity(p.n_cells + 1);
    let mut acc = 0u64;
    pp.push(0i32);
    for &(_, _, c) in &per_cell {
        acc += c as u64;
        if acc > i32::MAX as u64 {
            return Err(bad(
                "more than 2^31 - 1 non-zeros (a dgCMatrix's limit); simulate fewer cells or \
                 a smaller genes_per_cell"
                    .into(),
            ));
        }
        pp.push(acc as i32);
    }
    plan.p = pp;
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::threads::with_threads;

    fn small() -> SimParams {
        SimParams {
            n_cells: 600,
            n_genes: 2000,
            ..Default::default()
        }
    }

    #[test]
    fn deterministic_across_threads() {
        let a = with_threads(1, || simulate(&small()).unwrap()).unwrap();
        let b = with_threads(2, || simulate(&small()).unwrap()).unwrap();
        assert_eq!(a.counts, b.counts);
        assert_eq!(a.cell_type, b.cell_type);
        let c = simulate(&SimParams { seed: 7, ..small() }).unwrap();
        assert_ne!(a.counts, c.counts);
    }

    #[test]
    fn realistic_sparsity_and_markers() {
        let s = simulate(&small()).unwrap();
        let m = &s.counts;
        let dens = m.x.len() as f64 / (m.nrow * m.ncol) as f64;
        assert!((0.05..0.5).contains(&dens), "density {dens}");
        assert!(s.genes.contains(&"EPCAM".to_string()));
        assert!(s.genes.contains(&"GENE02000".to_string()));
        assert_eq!(s.genes.len(), 2000);
        // every type present, both batches present
        for t in 0..8 {
            assert!(s.cell_type.contains(&t));
        }
        assert!(s.batch.contains(&0) && s.batch.contains(&1));
        // CD3D is higher in T cells (types 0,1) than in B cells (type 3)
        let k = s.genes.iter().position(|g| g == "CD3D").unwrap();
        let d = m.to_dense();
        let mean_in = |ts: &[u32]| {
            let v: Vec<f64> = (0..m.ncol)
                .filter(|&j| ts.contains(&s.cell_type[j]))
                .map(|j| d[j * m.nrow + k])
                .collect();
            v.iter().sum::<f64>() / v.len() as f64
        };
        assert!(mean_in(&[0, 1]) > 4.0 * mean_in(&[3]));
    }

    #[test]
    fn rejects_bad_sizes() {
        assert!(simulate(&SimParams {
            n_genes: 10,
            ..small()
        })
        .is_err());
        assert!(simulate(&SimParams {
            n_types: 0,
            ..small()
        })
        .is_err());
        assert!(simulate(&SimParams {
            n_types: 99,
            ..small()
        })
        .is_err());
    }

    fn sparse(p: &SimParams, gpc: f64) -> CscOwned {
        let plan = simulate_sparse_plan(p, gpc).unwrap();
        let mut i = vec![0i32; plan.nnz()];
        let mut x = vec![0f64; plan.nnz()];
        plan.fill(&mut i, &mut x).unwrap();
        CscOwned {
            nrow: p.n_genes,
            ncol: p.n_cells,
            p: plan.p.clone(),
            i,
            x,
        }
    }

    #[test]
    fn sparse_generator_is_seeded_valid_and_sized() {
        let p = SimParams {
            n_cells: 3000,
            n_genes: 5000,
            ..Default::default()
        };
        let a = with_threads(1, || sparse(&p, 300.0)).unwrap();
        let b = with_threads(2, || sparse(&p, 300.0)).unwrap();
        assert_eq!(a, b);
        let c = sparse(
            &SimParams {
                seed: 9,
                ..p.clone()
            },
            300.0,
        );
        assert_ne!(a, c);
        // valid CSC: rows strictly increasing in every column, positive whole counts
        for j in 0..a.ncol {
            let (s, e) = (a.p[j] as usize, a.p[j + 1] as usize);
            assert!(a.i[s..e].windows(2).all(|w| w[0] < w[1]));
            assert!(a.i[s..e].iter().all(|&r| (0..5000).contains(&r)));
            assert!(a.x[s..e].iter().all(|&v| v >= 1.0 && v.fract() == 0.0));
        }
        // about the asked number of detected genes per cell (library sizes vary)
        let mean = a.x.len() as f64 / a.ncol as f64;
        assert!((240.0..360.0).contains(&mean), "mean genes per cell {mean}");
        // same cell types as the dense generator; markers up in their type
        let plan = simulate_sparse_plan(&p, 300.0).unwrap();
        let dense = simulate(&SimParams {
            n_genes: 5000,
            ..p.clone()
        })
        .unwrap();
        assert_eq!(plan.cell_type, dense.cell_type);
        let k = plan.genes.iter().position(|g| g == "EPCAM").unwrap() as i32;
        let mut per_type = [(0.0f64, 0usize); 8];
        for j in 0..a.ncol {
            let (s, e) = (a.p[j] as usize, a.p[j + 1] as usize);
            let tot: f64 = a.x[s..e].iter().sum();
            let v = a.i[s..e]
                .iter()
                .position(|&r| r == k)
                .map_or(0.0, |q| a.x[s + q] / tot);
            let t = plan.cell_type[j] as usize;
            per_type[t].0 += v;
            per_type[t].1 += 1;
        }
        let means: Vec<f64> = per_type.iter().map(|(s, n)| s / *n as f64).collect();
        let best = (0..8)
            .max_by(|&x, &y| means[x].total_cmp(&means[y]))
            .unwrap();
        assert_eq!(plan.type_names[best], "Epithelial");
    }

    #[test]
    fn sparse_generator_rejects_bad_sizes() {
        let p = SimParams {
            n_cells: 10,
            n_genes: 500,
            ..Default::default()
        };
        assert!(simulate_sparse_plan(&p, 0.0).is_err());
        assert!(simulate_sparse_plan(&p, 480.0).is_err());
        assert!(simulate_sparse_plan(&p, f64::NAN).is_err());
        let plan = simulate_sparse_plan(&p, 50.0).unwrap();
        assert!(plan.fill(&mut [], &mut []).is_err() || plan.nnz() == 0);
    }

    #[test]
    fn alias_table_draws_the_weights() {
        let w = [1.0, 0.0, 3.0, 6.0];
        let tab = alias_table(&w);
        let mut hits = [0u32; 4];
        let mut r = WyRand(1);
        for _ in 0..200_000 {
            let u = r.next();
            let k = ((u >> 32) * 4) >> 32;
            let e = tab[k as usize];
            let g = if (u & 0xFFFF_FFFF) < (e >> 32) {
                k
            } else {
                e & 0xFFFF_FFFF
            };
            hits[g as usize] += 1;
        }
        assert_eq!(hits[1], 0);
        for (h, f) in hits.iter().zip([0.1, 0.0, 0.3, 0.6]) {
            assert!((*h as f64 / 200_000.0 - f).abs() < 0.005);
        }
    }
}
