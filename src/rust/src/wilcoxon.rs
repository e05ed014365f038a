//! Glue of the Wilcoxon marker tests (scanpy / presto flavours).

use crate::convert::{guard, threads};
use crate::expr_matrix;
use extendr_api::prelude::*;
use extendr_api::Result;
use scannot_core::wilcoxon::{wilcoxon, Reference, WilcoxonOptions};
use scannot_core::ScError;

fn u32s(v: &[u32]) -> Vec<i32> {
    v.iter().map(|&x| x as i32).collect()
}

/// Wilcoxon rank-sum statistics for all genes and the tested groups.
/// `groups`: 0-based codes (NA < 0); `tested`: 0-based codes (empty = all);
/// `reference`: -1 = rest, else a 0-based code; `log_base`: NaN = natural log.
/// @noRd
#[extendr]
#[allow(clippy::too_many_arguments)]
fn rs_wilcoxon(
    p: &[i32],
    i: &[i32],
    x: &[f64],
    nrow: i32,
    ncol: i32,
    dense: bool,
    groups: &[i32],
    n_groups: i32,
    tested: &[i32],
    reference: i32,
    tie_correct: bool,
    flavor: &str,
    log_base: f64,
    n_threads: i32,
) -> Result<List> {
    guard(|| {
        let m = expr_matrix(p, i, x, nrow, ncol, dense)?;
        let ng = usize::try_from(n_groups)
            .map_err(|_| ScError::Input("n_groups must be >= 0".into()))?;
        let tested: Vec<usize> = tested
            .iter()
            .map(|&t| {
                usize::try_from(t).map_err(|_| ScError::Input("group codes must be >= 0".into()))
            })
            .collect::<std::result::Result<_, _>>()?;
        let opt = WilcoxonOptions {
            flavor: flavor.parse()?,
            reference: if reference < 0 {
                Reference::Rest
            } else {
                Reference::Group(reference as usize)
            },
            tie_correct,
            log_base: if log_base.is_nan() {
                None
            } else {
                Some(log_base)
            },
        };
        let t = if tested.is_empty() {
            None
        } else {
            Some(&tested[..])
        };
        let r = threads(n_threads, || wilcoxon(&m, groups, ng, t, &opt))??;
        let n_in: Vec<f64> = r.n_in.iter().map(|&v| v as f64).collect();
        let n_out: Vec<f64> = r.n_out.iter().map(|&v| v as f64).collect();
        Ok(list!(
            tested = u32s(&r.tested),
            n_in = n_in,
            n_out = n_out,
            group = u32s(&r.group),
            gene = u32s(&r.gene),
            score = r.score,
            logfc = r.logfc,
            pval = r.pval,
            padj = r.padj,
            pts = r.pts,
            pts_rest = r.pts_rest,
            auc = r.auc,
            u = r.u,
            mean_in = r.mean_in,
            mean_out = r.mean_out
        ))
    })
}

extendr_module! {
    mod wilcoxon;
    fn rs_wilcoxon;
}
