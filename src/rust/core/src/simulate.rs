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

pub fn simulate(p: &SimParams) -> ScResult<Simulated> {
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

    let cells: Vec<(u32, u32, Vec<i32>, Vec<f64>)> = (0..p.n_cells)
        .into_par_iter()
        .map(|j| {
            let mut r = ChaCha8Rng::seed_from_u64(p.seed);
            r.set_stream(j as u64 + 1);
            let u: f64 = r.random();
            let t = cum.iter().position(|&c| u < c).unwrap_or(p.n_types - 1);
            let b = r.random_range(0..p.n_batches);
            let size = p.depth * size_d.sample(&mut r);
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
        genes,
        type_names: types.iter().map(|(n, _)| n.to_string()).collect(),
        cell_type,
        batch,
    })
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
}
