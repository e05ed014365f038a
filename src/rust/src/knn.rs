//! Glue of the weighted kNN label transfer (scannot_core::knn).

use crate::convert::{guard, threads};
use extendr_api::prelude::*;
use extendr_api::Result;
use scannot_core::knn::{transfer, Embedding, KnnIndex, LabelColumn};
use scannot_core::{ScError, ScResult};

fn size(v: i32, what: &str) -> ScResult<usize> {
    usize::try_from(v).map_err(|_| ScError::Input(format!("{what} must be >= 0")))
}

/// Exact kNN of query cells among reference cells and scArches' weighted vote.
/// Embeddings are cells x dims, column-major. `codes` holds `n_cols` label columns one
/// after the other (0-based codes in sorted label order); `n_levels` their level counts.
/// Returns 1-based neighbour indices and distances (query-major, k per cell), and per
/// column (column after column) the 0-based best code (-1: none), its probability and
/// the uncertainty.
/// @noRd
#[extendr]
#[allow(clippy::too_many_arguments)]
fn rs_knn_transfer(
    reference: &[f64],
    n_ref: i32,
    ref_dim: i32,
    query: &[f64],
    n_query: i32,
    query_dim: i32,
    k: i32,
    codes: &[i32],
    n_levels: &[i32],
    n_threads: i32,
) -> Result<List> {
    guard(|| {
        let re = Embedding::new(
            size(n_ref, "n_ref")?,
            size(ref_dim, "ref_dim")?,
            reference,
            "reference",
        )?;
        let qe = Embedding::new(
            size(n_query, "n_query")?,
            size(query_dim, "query_dim")?,
            query,
            "query",
        )?;
        let k = size(k, "k")?;
        let nr = re.n();
        if codes.len() != nr * n_levels.len() {
            return Err(ScError::Dims(format!(
                "{} label codes for {} columns of {} reference cells",
                codes.len(),
                n_levels.len(),
                nr
            )));
        }
        let columns: Vec<LabelColumn> = n_levels
            .iter()
            .enumerate()
            .map(|(c, &nl)| {
                Ok(LabelColumn {
                    codes: &codes[c * nr..(c + 1) * nr],
                    n_levels: size(nl, "n_levels")?,
                })
            })
            .collect::<ScResult<_>>()?;
        let (nb, res) = threads(n_threads, || -> ScResult<_> {
            let nb = KnnIndex::build(&re).query(&qe, k)?;
            let res = transfer(&nb, &columns)?;
            Ok((nb, res))
        })??;
        let index: Vec<i32> = nb.index.iter().map(|&i| i as i32 + 1).collect();
        let mut label = Vec::with_capacity(res.len() * qe.n());
        let mut prob = Vec::with_capacity(res.len() * qe.n());
        let mut uncertainty = Vec::with_capacity(res.len() * qe.n());
        for r in res {
            label.extend(r.label);
            prob.extend(r.prob);
            uncertainty.extend(r.uncertainty);
        }
        Ok(list!(
            index = index,
            distance = nb.dist,
            label = label,
            prob = prob,
            uncertainty = uncertainty
        ))
    })
}

extendr_module! {
    mod knn;
    fn rs_knn_transfer;
}
