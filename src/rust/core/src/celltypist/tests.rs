//! Model files written by celltypist 1.7.1 itself (tools/fixtures/celltypist, committed under
//! tests/testthat/fixtures/celltypist), a direct dense reference for the sparse decision
//! function, and reference implementations of the vote and of anndata's make_unique.

use super::*;
use crate::matrix::{CscOwned, DenseView};
use proptest::prelude::*;

fn fixture(name: &str) -> Vec<u8> {
    let p = format!(
        "{}/../../../tests/testthat/fixtures/celltypist/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read(&p).unwrap_or_else(|e| panic!("cannot read {p}: {e}"))
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[test]
fn reads_celltypist_models_from_every_writer() {
    let lr = read_model(&fixture("lr.pkl")).unwrap();
    assert_eq!(lr.classifier, "LogisticRegression");
    assert_eq!(
        lr.classes,
        strings(&["B cell", "CD4 T", "CD8 T", "Mono", "NK"])
    );
    assert_eq!(lr.n_rows, 5);
    assert_eq!(lr.features.len(), 158);
    assert_eq!(lr.features[0], "G000");
    assert_eq!(lr.coef.len(), 5 * 158);
    assert!(lr.with_mean);
    assert_eq!(lr.sklearn_version.as_deref(), Some("1.6.1"));
    assert!(lr
        .description
        .iter()
        .any(|(k, v)| k == "details" && v == "scannot fixture"));
    assert!(lr
        .description
        .iter()
        .any(|(k, v)| k == "number_celltypes" && v == "5"));
    // protocols 2 and 5 (numpy 2), and a numpy 1.x writer at protocols 2 and 4 with a
    // Fortran-ordered coef_ and a <U classes_ array: same numbers
    for f in ["lr_p2.pkl", "lr_p5.pkl", "lr_np1_p2.pkl", "lr_np1_p4.pkl"] {
        let m = read_model(&fixture(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
        assert_eq!(m.classes, lr.classes, "{f}");
        assert_eq!(m.features, lr.features, "{f}");
        assert_eq!(m.coef, lr.coef, "{f}");
        assert_eq!(m.intercept, lr.intercept, "{f}");
        assert_eq!(m.scaler_mean, lr.scaler_mean, "{f}");
        assert_eq!(m.scaler_scale, lr.scaler_scale, "{f}");
    }
    let sgd = read_model(&fixture("sgd.pkl")).unwrap();
    assert_eq!(sgd.classifier, "SGDClassifier");
    assert_eq!(sgd.classes, lr.classes);
    let bin = read_model(&fixture("binary.pkl")).unwrap();
    assert_eq!(bin.classes, strings(&["CD4 T", "CD8 T"]));
    assert_eq!(bin.n_rows, 1);
    assert!(!bin.with_mean);
}

#[test]
fn corrupt_and_foreign_pickles_are_format_errors() {
    let lr = fixture("lr.pkl");
    for cut in [0, 1, 10, lr.len() / 2, lr.len() - 1] {
        assert!(matches!(read_model(&lr[..cut]), Err(ScError::Format(_))));
    }
    // a pickled list, a dict without the keys
    assert!(matches!(
        read_model(b"\x80\x04]\x94."),
        Err(ScError::Format(_))
    ));
    assert!(matches!(
        read_model(b"\x80\x04}\x94."),
        Err(ScError::Format(m)) if m.contains("'Model'")
    ));
    // flipping bytes never panics
    for i in (0..lr.len()).step_by(7) {
        let mut b = lr.clone();
        b[i] ^= 0x5a;
        let _ = read_model(&b);
    }
}

#[test]
fn make_unique_matches_anndata() {
    let v = make_unique(&strings(&["A", "B", "A", "A-1", "A", "B"]));
    // anndata: duplicates get -1, -2..., skipping existing names (A-1 exists)
    assert_eq!(v, strings(&["A", "B", "A-2", "A-1", "A-3", "B-1"]));
    let u = strings(&["x", "y"]);
    assert_eq!(make_unique(&u), u);
}

#[test]
fn feature_matching_keeps_query_order_and_first_copy() {
    let q = strings(&["C", "A", "Z", "A"]);
    let f = strings(&["A", "B", "C", "A-1"]);
    // the second A becomes A-1, which is a model feature (as in CellTypist)
    assert_eq!(
        match_features(&q, &f).unwrap(),
        vec![(0, 2), (1, 0), (3, 3)]
    );
    assert!(matches!(
        match_features(&strings(&["Q"]), &f),
        Err(ScError::Input(_))
    ));
}

#[test]
fn input_check_looks_at_first_1000_cells_only() {
    let mut d = vec![0.5; 3 * 1001];
    d[3 * 1000] = 20.0; // cell 1001 is out of range: not checked
    let m = ExprMatrix::Dense(DenseView::new(3, 1001, &d).unwrap());
    let s = check_log1p_cp10k(&m).unwrap();
    assert!((s - 3.0 * 0.5f64.exp_m1()).abs() < 1e-12);
    d[5] = 9.3;
    let m = ExprMatrix::Dense(DenseView::new(3, 1001, &d).unwrap());
    assert!(
        matches!(check_log1p_cp10k(&m), Err(ScError::Value(msg)) if msg.contains("normalize_counts"))
    );
    d[5] = -0.1;
    let m = ExprMatrix::Dense(DenseView::new(3, 1001, &d).unwrap());
    assert!(check_log1p_cp10k(&m).is_err());
}

/// Direct formula: dense x', clip at +10, x' . coef^T + intercept.
fn reference(
    dense: &[f64],
    nrow: usize,
    ncol: usize,
    kept: &[(usize, usize)],
    mv: &ModelView,
) -> Vec<f64> {
    let r = mv.n_rows;
    let mut out = vec![0.0; ncol * r];
    for j in 0..ncol {
        for k in 0..r {
            let mut s = 0.0;
            for &(row, f) in kept {
                let m = if mv.with_mean { mv.mean[f] } else { 0.0 };
                let z = ((dense[j * nrow + row] - m) / mv.scale[f]).min(10.0);
                s += z * mv.coef[f * r + k];
            }
            out[k * ncol + j] = s + mv.intercept[k];
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(40))]
    #[test]
    fn sparse_and_dense_paths_equal_the_direct_formula(
        nrow in 1usize..30, ncol in 1usize..20, nclass in 2usize..5, binary in any::<bool>(),
        with_mean in any::<bool>(), seed in any::<u64>()
    ) {
        use rand::{RngExt, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let nf = nrow + 3;
        let n_rows = if binary { 1 } else { nclass };
        let n_classes = if binary { 2 } else { nclass };
        let coef: Vec<f64> = (0..nf * n_rows).map(|_| rng.random_range(-3.0..3.0)).collect();
        let intercept: Vec<f64> = (0..n_rows).map(|_| rng.random_range(-2.0..2.0)).collect();
        let mean: Vec<f64> = (0..nf).map(|_| rng.random_range(-1.0..3.0)).collect();
        // small scales make the +10 clip bite
        let scale: Vec<f64> = (0..nf).map(|_| rng.random_range(0.05..2.0)).collect();
        let dense: Vec<f64> = (0..nrow * ncol)
            .map(|_| if rng.random_bool(0.6) { 0.0 } else { rng.random_range(0.0..9.0) })
            .collect();
        // query rows map to a subset of model features, in a shuffled order
        let mut feats: Vec<usize> = (0..nf).collect();
        for i in (1..nf).rev() { feats.swap(i, rng.random_range(0..=i)); }
        let kept: Vec<(usize, usize)> = (0..nrow).filter(|r| r % 4 != 3).map(|r| (r, feats[r])).collect();
        let mv = ModelView { n_classes, n_rows, coef: &coef, intercept: &intercept, mean: &mean,
                             scale: &scale, with_mean };
        let refd = reference(&dense, nrow, ncol, &kept, &mv);
        let csc = CscOwned::from_dense(nrow, ncol, &dense);
        for m in [ExprMatrix::Csc(csc.view()), ExprMatrix::Dense(DenseView::new(nrow, ncol, &dense).unwrap())] {
            let p = predict(&m, &kept, &mv).unwrap();
            for j in 0..ncol {
                for k in 0..n_classes {
                    let want = if binary { if k == 0 { -refd[j] } else { refd[j] } } else { refd[k * ncol + j] };
                    let got = p.decision[k * ncol + j];
                    prop_assert!((got - want).abs() < 1e-9 * (1.0 + want.abs()), "{got} vs {want}");
                    prop_assert_eq!(p.probability[k * ncol + j], expit(got));
                }
                let row: Vec<f64> = (0..n_classes).map(|k| p.decision[k * ncol + j]).collect();
                let mx = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                prop_assert_eq!(p.best[j], row.iter().position(|&v| v == mx).unwrap());
            }
        }
    }
}

#[test]
fn prob_match_joins_in_class_order() {
    let p = Prediction {
        n_cells: 3,
        n_classes: 3,
        decision: vec![],
        probability: vec![0.9, 0.1, 0.5, 0.6, 0.2, 0.5, 0.7, 0.3, 0.5000001],
        best: vec![0, 0, 0],
    };
    let c = strings(&["A", "B", "C"]);
    assert_eq!(
        prob_match_labels(&p, &c, 0.5),
        strings(&["A|B|C", "Unassigned", "C"])
    );
}

/// Reference vote: a crosstab over sorted label strings, pandas idxmax (first max).
fn vote_reference(labels: &[&str], clusters: &[usize], min_prop: f64) -> Vec<Option<String>> {
    let mut names: Vec<&str> = labels.to_vec();
    names.sort();
    names.dedup();
    let nc = clusters.iter().max().map_or(0, |m| m + 1);
    (0..nc)
        .map(|c| {
            let counts: Vec<usize> = names
                .iter()
                .map(|n| {
                    labels
                        .iter()
                        .zip(clusters)
                        .filter(|(l, &k)| *l == n && k == c)
                        .count()
                })
                .collect();
            let size: usize = counts.iter().sum();
            if size == 0 {
                return None;
            }
            let mx = *counts.iter().max().unwrap();
            let i = counts.iter().position(|&x| x == mx).unwrap();
            Some(if (mx as f64 / size as f64) < min_prop {
                "Heterogeneous".into()
            } else {
                names[i].to_string()
            })
        })
        .collect()
}

#[test]
fn majority_vote_ties_go_to_alphabetically_first() {
    // label codes in an unsorted order: "b" = 0, "B" = 1, "a" = 2 (code points: B < a < b)
    let names = strings(&["b", "B", "a"]);
    let labels = [0, 2, 1, 0, 2, 0, 0, 1];
    let clusters = [0, 0, 0, 1, 1, 2, 2, 2];
    let v = majority_vote(&labels, &names, &clusters, 4, 0.0).unwrap();
    assert_eq!(
        v,
        vec![Some("B".into()), Some("a".into()), Some("b".into()), None]
    );
    // cluster 2: b has 2/3; min_prop is strict
    let v = majority_vote(&labels, &names, &clusters, 3, 2.0 / 3.0).unwrap();
    assert_eq!(v[2].as_deref(), Some("b"));
    let v = majority_vote(&labels, &names, &clusters, 3, 0.67).unwrap();
    assert_eq!(v[2].as_deref(), Some("Heterogeneous"));
}

proptest! {
    #[test]
    fn majority_vote_equals_reference(
        cells in prop::collection::vec((0usize..4, 0usize..5), 1..60), min_prop in 0.0f64..1.0
    ) {
        let names = strings(&["NK", "B cell", "A|B", "Unassigned"]);
        let labels: Vec<usize> = cells.iter().map(|c| c.0).collect();
        let clusters: Vec<usize> = cells.iter().map(|c| c.1).collect();
        let nc = clusters.iter().max().unwrap() + 1;
        let got = majority_vote(&labels, &names, &clusters, nc, min_prop).unwrap();
        let lab: Vec<&str> = labels.iter().map(|&l| names[l].as_str()).collect();
        prop_assert_eq!(got, vote_reference(&lab, &clusters, min_prop));
    }
}

#[test]
fn out_of_range_row_index_is_an_error_not_a_panic() {
    let p = [0, 1];
    let i = [7];
    let x = [1.0];
    let c = crate::matrix::CscView::new(2, 1, &p, &i, &x).unwrap();
    let (coef, b, mean, scale) = ([1.0, 1.0], [0.0], [0.0, 0.0], [1.0, 1.0]);
    let mv = ModelView {
        n_classes: 2,
        n_rows: 1,
        coef: &coef,
        intercept: &b,
        mean: &mean,
        scale: &scale,
        with_mean: true,
    };
    assert!(matches!(
        predict(&ExprMatrix::Csc(c), &[(0, 0), (1, 1)], &mv),
        Err(ScError::Dims(_))
    ));
}
