#![allow(clippy::needless_range_loop)]

use super::*;
use crate::celltypist::{read_model, CelltypistModel};
use crate::matrix::{CscOwned, DenseView};
use crate::pickle;

/// A small log-expression matrix (genes x cells, column-major) with class structure,
/// one all-zero gene and one large outlier (clipped at 10 after scaling).
fn toy(n_genes: usize, n_cells: usize, n_classes: usize, seed: u64) -> (Vec<f64>, Vec<usize>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut x = vec![0.0; n_genes * n_cells];
    let y: Vec<usize> = (0..n_cells).map(|c| c % n_classes).collect();
    for c in 0..n_cells {
        for g in 1..n_genes {
            let boost = if g % n_classes == y[c] { 1.5 } else { 0.0 };
            let u: f64 = rng.random();
            if u < 0.45 + 0.3 * (boost > 0.0) as i32 as f64 {
                x[c * n_genes + g] = (rng.random::<f64>() * 2.0 + boost).ln_1p();
            }
        }
    }
    x[3 * n_genes + 2] = 60.0; // outlier -> clipped
    (x, y)
}

fn dense_scaled(x: &[f64], ng: usize, nc: usize, rows: &[usize], sc: &Scaler) -> Vec<f64> {
    let mut d = vec![0.0; nc * rows.len()];
    for c in 0..nc {
        for (k, &r) in rows.iter().enumerate() {
            let m = if sc.with_mean { sc.mean[k] } else { 0.0 };
            d[c * rows.len() + k] = ((x[c * ng + r] - m) / sc.scale[k]).min(10.0);
        }
    }
    d
}

#[test]
fn scaler_matches_naive_population_variance_and_sparse_equals_dense() {
    let (ng, nc) = (12, 150); // a z-score above 10 needs n > 101
    let (x, _) = toy(ng, nc, 3, 1);
    let rows: Vec<usize> = (0..ng).collect();
    let dense = ExprMatrix::Dense(DenseView::new(ng, nc, &x).unwrap());
    let csc = CscOwned::from_dense(ng, nc, &x);
    let sparse = ExprMatrix::Csc(csc.view());
    for with_mean in [true, false] {
        let a = fit_scaler(&dense, &rows, with_mean);
        let b = fit_scaler(&sparse, &rows, with_mean);
        assert_eq!(a, b);
        for g in 0..ng {
            let v: Vec<f64> = (0..nc).map(|c| x[c * ng + g]).collect();
            let m = v.iter().sum::<f64>() / nc as f64;
            let var = v.iter().map(|u| (u - m).powi(2)).sum::<f64>() / nc as f64;
            assert!((a.mean[g] - m).abs() < 1e-14);
            assert!((a.var[g] - var).abs() < 1e-13);
            let want = if var == 0.0 { 1.0 } else { var.sqrt() };
            assert!((a.scale[g] - want).abs() < 1e-13, "gene {g}");
        }
        // X' = Z - mu equals the dense scaled and clipped matrix
        let d = scale_data(&sparse, &rows, &a).to_dense();
        let want = dense_scaled(&x, ng, nc, &rows, &a);
        for (u, v) in d.iter().zip(&want) {
            assert!((u - v).abs() < 1e-12);
        }
        assert!(want.contains(&10.0), "the clip is exercised");
    }
}

/// Dense reference objective: mean log-loss + |w|²/(2Cn).
fn naive_objective(xd: &[f64], ng: usize, y: &[f64], w: &[f64], c: f64) -> f64 {
    let n = y.len();
    let mut f = 0.0;
    for i in 0..n {
        let t: f64 = (0..ng).map(|j| xd[i * ng + j] * w[j]).sum::<f64>() + w[ng];
        f += (1.0 + t.exp()).ln() - y[i] * t;
    }
    f / n as f64 + w[..ng].iter().map(|v| v * v).sum::<f64>() / (2.0 * c * n as f64)
}

#[test]
fn batched_objective_and_gradient_match_the_dense_formula() {
    let (ng, nc) = (9, 30);
    let (x, y) = toy(ng, nc, 3, 2);
    let rows: Vec<usize> = (0..ng).collect();
    let csc = CscOwned::from_dense(ng, nc, &x);
    let m = ExprMatrix::Csc(csc.view());
    let sc = fit_scaler(&m, &rows, true);
    let d = scale_data(&m, &rows, &sc);
    let xd = d.to_dense();
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let pts: Vec<Vec<f64>> = (0..3)
        .map(|_| (0..=ng).map(|_| rng.random::<f64>() - 0.5).collect())
        .collect();
    let refs: Vec<&[f64]> = pts.iter().map(|p| p.as_slice()).collect();
    let res = eval_batch(&d, &y, &[0, 1, 2], &refs, 0.7);
    for (k, (f, g)) in res.iter().enumerate() {
        let yk: Vec<f64> = y.iter().map(|&l| (l == k) as i32 as f64).collect();
        let f0 = naive_objective(&xd, ng, &yk, &pts[k], 0.7);
        assert!((f - f0).abs() < 1e-12, "{f} vs {f0}");
        for j in 0..=ng {
            let mut p = pts[k].clone();
            let h = 1e-6;
            p[j] += h;
            let fp = naive_objective(&xd, ng, &yk, &p, 0.7);
            p[j] -= 2.0 * h;
            let fm = naive_objective(&xd, ng, &yk, &p, 0.7);
            assert!((g[j] - (fp - fm) / (2.0 * h)).abs() < 1e-7, "grad {j}");
        }
    }
}

#[test]
fn lbfgs_reaches_the_optimum_of_each_one_vs_rest_problem() {
    let (ng, nc) = (10, 90);
    let (x, y) = toy(ng, nc, 3, 4);
    let rows: Vec<usize> = (0..ng).collect();
    let m = ExprMatrix::Dense(DenseView::new(ng, nc, &x).unwrap());
    let sc = fit_scaler(&m, &rows, true);
    let d = scale_data(&m, &rows, &sc);
    let fit = fit_lbfgs(&d, &y, 3, 1.0, 1000, 1e-10).unwrap();
    assert_eq!(fit.n_rows, 3);
    let pts: Vec<Vec<f64>> = (0..3)
        .map(|k| {
            let mut p: Vec<f64> = (0..ng).map(|j| fit.coef[j * 3 + k]).collect();
            p.push(fit.intercept[k]);
            p
        })
        .collect();
    let refs: Vec<&[f64]> = pts.iter().map(|p| p.as_slice()).collect();
    for (k, (f, g)) in eval_batch(&d, &y, &[0, 1, 2], &refs, 1.0)
        .iter()
        .enumerate()
    {
        assert!(max_abs(g) < 1e-8, "class {k}: gradient {}", max_abs(g));
        assert!(fit.n_iter[k] > 1);
        // any perturbation is worse (strictly convex problem)
        let mut p = pts[k].clone();
        p[0] += 1e-3;
        let worse = eval_batch(&d, &y, &[k], &[p.as_slice()], 1.0);
        assert!(worse[0].0 > *f);
    }
    // the default tolerance stops earlier, deterministically
    let a = fit_lbfgs(&d, &y, 3, 1.0, 1000, 1e-4).unwrap();
    let b = fit_lbfgs(&d, &y, 3, 1.0, 1000, 1e-4).unwrap();
    assert_eq!(a, b);
    assert!(a.n_iter.iter().zip(&fit.n_iter).all(|(u, v)| u <= v));
    // max_iter caps the iterations
    let c = fit_lbfgs(&d, &y, 3, 1.0, 2, 1e-10).unwrap();
    assert_eq!(c.n_iter, vec![2, 2, 2]);
}

#[test]
fn binary_problems_fit_one_row_for_the_second_class() {
    let (ng, nc) = (6, 40);
    let (x, y) = toy(ng, nc, 2, 5);
    let rows: Vec<usize> = (0..ng).collect();
    let m = ExprMatrix::Dense(DenseView::new(ng, nc, &x).unwrap());
    let sc = fit_scaler(&m, &rows, false);
    let d = scale_data(&m, &rows, &sc);
    let fit = fit_lbfgs(&d, &y, 2, 1.0, 100, 1e-4).unwrap();
    assert_eq!(fit.n_rows, 1);
    assert_eq!(fit.coef.len(), ng);
    let fit1 = fit_lbfgs(
        &d,
        &y.iter().map(|&l| l ^ 1).collect::<Vec<_>>(),
        2,
        1.0,
        100,
        1e-4,
    )
    .unwrap();
    // swapping the classes flips the sign
    for (a, b) in fit.coef.iter().zip(&fit1.coef) {
        assert!((a + b).abs() < 1e-3);
    }
}

/// scikit-learn's `_plain_sgd` on the dense X' (reference for the sparse formulation).
fn naive_sgd(xd: &[f64], ng: usize, y01: &[f64], order: &[Vec<usize>], alpha: f64) -> Vec<f64> {
    let mut w = vec![0.0; ng];
    let (mut wscale, mut b, mut t) = (1.0f64, 0.0, 1.0f64);
    let typw = (1.0 / alpha.sqrt()).sqrt();
    let t0 = 1.0 / (typw * alpha);
    for epoch in order {
        for &i in epoch {
            let eta = 1.0 / (alpha * (t0 + t - 1.0));
            let p: f64 = (0..ng).map(|j| w[j] * xd[i * ng + j]).sum::<f64>() * wscale + b;
            let dloss = 1.0 / (1.0 + (-p).exp()) - y01[i];
            let update = -eta * dloss;
            wscale *= (1.0 - eta * alpha).max(0.0);
            for j in 0..ng {
                w[j] += update / wscale * xd[i * ng + j];
            }
            b += update;
            t += 1.0;
        }
    }
    let mut out: Vec<f64> = w.iter().map(|v| v * wscale).collect();
    out.push(b);
    out
}

#[test]
fn sparse_sgd_equals_dense_sgd_on_the_same_sample_order() {
    let (ng, nc) = (8, 50);
    let (x, y) = toy(ng, nc, 3, 6);
    let rows: Vec<usize> = (0..ng).collect();
    let csc = CscOwned::from_dense(ng, nc, &x);
    let m = ExprMatrix::Csc(csc.view());
    let sc = fit_scaler(&m, &rows, true);
    let d = scale_data(&m, &rows, &sc);
    let xd = d.to_dense();
    let o = SgdOptions {
        alpha: 1e-2,
        max_iter: 1000,
        tol: 1e-3,
        n_iter_no_change: 5,
        mini_batch: true,
        batch_number: 3,
        batch_size: 10,
        epochs: 4,
        balance_cell_type: false,
        seed: 11,
    };
    let fit = fit_sgd(&d, &y, 3, &o).unwrap();
    // rebuild the visiting order the same way
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut order = Vec::new();
    for _ in 0..4 {
        let mut idx: Vec<usize> = (0..nc).collect();
        shuffle(&mut idx, &mut rng);
        idx.truncate(30);
        for b in idx.chunks(10) {
            let mut b = b.to_vec();
            shuffle(&mut b, &mut rng);
            order.push(b);
        }
    }
    assert_eq!(fit.n_iter, vec![12]);
    for k in 0..3 {
        let yk: Vec<f64> = y.iter().map(|&l| (l == k) as i32 as f64).collect();
        let want = naive_sgd(&xd, ng, &yk, &order, 1e-2);
        for j in 0..ng {
            assert!(
                (fit.coef[j * 3 + k] - want[j]).abs() < 1e-9,
                "class {k} gene {j}"
            );
        }
        assert!((fit.intercept[k] - want[ng]).abs() < 1e-9);
    }
    // full-batch SGD: seeded, deterministic, stops by tol
    let o2 = SgdOptions {
        mini_batch: false,
        alpha: 1e-4,
        ..o
    };
    let a = fit_sgd(&d, &y, 3, &o2).unwrap();
    let b = fit_sgd(&d, &y, 3, &o2).unwrap();
    assert_eq!(a, b);
    assert!(a.n_iter[0] >= 6 && (a.n_iter[0] as usize) < 1000);
    assert_eq!(a.t, (a.n_iter[0] as usize * nc) as f64 + 1.0);
    let c = fit_sgd(&d, &y, 3, &SgdOptions { seed: 12, ..o2 }).unwrap();
    assert_ne!(a.coef, c.coef);
}

#[test]
fn feature_selection_takes_the_union_of_top_genes_per_class() {
    let fit = LinearFit {
        n_rows: 2,
        // gene-major: genes 0..5, rows 0,1
        coef: vec![0.1, -5.0, 3.0, 0.0, -0.2, 0.3, 0.0, 4.0, 1.0, 0.5],
        intercept: vec![0.0, 0.0],
        n_iter: vec![1],
        t: 0.0,
    };
    assert_eq!(select_features(&fit, 5, 2).unwrap(), vec![0, 1, 3, 4]);
    assert!(select_features(&fit, 5, 5).is_err());
}

#[test]
fn train_drops_unexpressed_genes_and_selects_features() {
    let (ng, nc) = (30, 120);
    let (x, y) = toy(ng, nc, 4, 7);
    let rows: Vec<usize> = (0..ng).collect();
    let m = ExprMatrix::Dense(DenseView::new(ng, nc, &x).unwrap());
    let mut o = TrainOptions {
        with_mean: true,
        use_sgd: false,
        c: 1.0,
        max_iter: 1000,
        tol_lr: 1e-4,
        sgd: SgdOptions {
            alpha: 1e-4,
            max_iter: 1000,
            tol: 1e-3,
            n_iter_no_change: 5,
            mini_batch: false,
            batch_number: 100,
            batch_size: 1000,
            epochs: 10,
            balance_cell_type: false,
            seed: 1,
        },
        feature_selection: false,
        top_genes: 5,
    };
    let t = train(&m, &rows, &y, 4, &o).unwrap();
    assert_eq!(
        t.genes,
        (1..ng).collect::<Vec<_>>(),
        "gene 0 is never expressed"
    );
    assert_eq!(t.fit.n_rows, 4);
    // training accuracy on this easy problem
    let d = scale_data(&m, &t.genes, &t.scaler).to_dense();
    let g = t.genes.len();
    let mut right = 0;
    for c in 0..nc {
        let best = (0..4)
            .map(|k| {
                (0..g)
                    .map(|j| d[c * g + j] * t.fit.coef[j * 4 + k])
                    .sum::<f64>()
                    + t.fit.intercept[k]
            })
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .unwrap()
            .0;
        right += (best == y[c]) as usize;
    }
    assert!(right as f64 / nc as f64 > 0.9, "accuracy {right}/{nc}");
    o.feature_selection = true;
    let s = train(&m, &rows, &y, 4, &o).unwrap();
    assert!(s.genes.len() >= 5 && s.genes.len() <= 20);
    assert!(s.genes.windows(2).all(|w| w[0] < w[1]));
    // the scaler is subset, not refit
    for (k, &gi) in s.genes.iter().enumerate() {
        let pos = t.genes.iter().position(|&q| q == gi).unwrap();
        assert_eq!(s.scaler.scale[k], t.scaler.scale[pos]);
    }
    assert!(train(&m, &rows, &vec![0; nc], 1, &o).is_err());
}

fn model_of(t: &Trained, classes: &[&str], sgd: bool) -> CelltypistModel {
    CelltypistModel {
        classifier: if sgd {
            "SGDClassifier"
        } else {
            "LogisticRegression"
        }
        .into(),
        classes: classes.iter().map(|s| s.to_string()).collect(),
        features: t.genes.iter().map(|g| format!("GENE{g}")).collect(),
        n_rows: t.fit.n_rows,
        coef: t.fit.coef.clone(),
        intercept: t.fit.intercept.clone(),
        scaler_mean: t.scaler.mean.clone(),
        scaler_scale: t.scaler.scale.clone(),
        with_mean: t.scaler.with_mean,
        description: vec![
            ("date".into(), "2026-01-01".into()),
            ("details".into(), "é unicode".into()),
            ("number_celltypes".into(), classes.len().to_string()),
        ],
        sklearn_version: Some(SKLEARN_VERSION.into()),
    }
}

#[test]
fn written_models_read_back_identically() {
    let (ng, nc) = (300, 60);
    let (x, y) = toy(ng, nc, 3, 8);
    let rows: Vec<usize> = (0..ng).collect();
    let m = ExprMatrix::Dense(DenseView::new(ng, nc, &x).unwrap());
    let o = TrainOptions {
        with_mean: true,
        use_sgd: false,
        c: 1.0,
        max_iter: 50,
        tol_lr: 1e-4,
        sgd: SgdOptions {
            alpha: 1e-4,
            max_iter: 20,
            tol: 1e-3,
            n_iter_no_change: 5,
            mini_batch: false,
            batch_number: 100,
            batch_size: 1000,
            epochs: 10,
            balance_cell_type: false,
            seed: 1,
        },
        feature_selection: false,
        top_genes: 5,
    };
    for (sgd, ncls) in [(false, 3), (true, 3), (false, 2)] {
        let yy: Vec<usize> = y.iter().map(|&l| l % ncls).collect();
        let t = train(
            &m,
            &rows,
            &yy,
            ncls,
            &TrainOptions {
                use_sgd: sgd,
                ..o.clone()
            },
        )
        .unwrap();
        let names = ["Mono", "B cell", "T/NK"];
        let model = model_of(&t, &names[..ncls], sgd);
        let extras = ModelExtras {
            scaler_var: Some(t.scaler.var.clone()),
            n_samples_seen: nc as i64,
            c: 1.0,
            max_iter: 50,
            n_iter: t.fit.n_iter.clone(),
            alpha: 1e-4,
            t: t.fit.t,
        };
        let bytes = model_pickle(&model, &extras).unwrap();
        assert_eq!(&bytes[..2], &[0x80, 4]);
        let back = read_model(&bytes).unwrap();
        assert_eq!(back, model);
        // the scaler variance and sample count are in the file
        let v = pickle::parse(&bytes).unwrap();
        let sc = v
            .get("Scaler_")
            .unwrap()
            .as_object()
            .unwrap()
            .state
            .as_ref()
            .unwrap();
        let var = pickle::numpy::ndarray(sc.get("var_").unwrap()).unwrap();
        assert_eq!(var.to_f64().unwrap(), t.scaler.var);
        assert_eq!(
            pickle::numpy::scalar_i64(sc.get("n_samples_seen_").unwrap()),
            Some(nc as i64)
        );
    }
}

#[test]
fn pickle_writer_round_trips_values() {
    use crate::pickle::writer::{dict, global, object, write};
    use crate::pickle::Value as V;
    let long = "x".repeat(300);
    let v = dict(vec![
        (
            "ints",
            V::List(
                (-3..3)
                    .map(|i| V::Int(i * 40_000_000_000))
                    .chain(
                        [
                            0,
                            255,
                            256,
                            65535,
                            65536,
                            -1,
                            i32::MIN as i64,
                            i64::MAX,
                            i64::MIN,
                        ]
                        .map(V::Int),
                    )
                    .collect(),
            ),
        ),
        (
            "floats",
            V::Tuple(vec![V::Float(1.5), V::Float(-0.0), V::Float(f64::INFINITY)]),
        ),
        (
            "strs",
            V::Tuple(vec![V::Str("é".into()), V::Str(long.clone())]),
        ),
        (
            "bytes",
            V::Tuple(vec![V::Bytes(vec![1, 2]), V::Bytes(vec![7; 70_000])]),
        ),
        ("t4", V::Tuple((0..5).map(V::Int).collect())),
        ("empty", V::Tuple(vec![])),
        ("many", V::List((0..2500).map(V::Int).collect())),
        ("set", V::Set(vec![V::Int(1), V::Str("a".into())])),
        (
            "flags",
            V::Tuple(vec![V::Bool(true), V::Bool(false), V::None]),
        ),
        (
            "obj",
            object(
                global("m.n", "K"),
                vec![V::Int(1)],
                true,
                Some(dict(vec![("a", V::Int(2))])),
            ),
        ),
        ("call", object(global("m", "f"), vec![], false, None)),
    ]);
    assert_eq!(pickle::parse(&write(&v).unwrap()).unwrap(), v);
    assert!(write(&V::Recursive).is_err());
}

#[test]
fn lbfgs_is_bit_identical_for_any_number_of_threads() {
    let (ng, nc) = (20, 300);
    let (x, y) = toy(ng, nc, 4, 9);
    let rows: Vec<usize> = (0..ng).collect();
    let m = ExprMatrix::Dense(DenseView::new(ng, nc, &x).unwrap());
    let sc = fit_scaler(&m, &rows, true);
    let d = scale_data(&m, &rows, &sc);
    let one = crate::threads::with_threads(1, || fit_lbfgs(&d, &y, 4, 1.0, 1000, 1e-4)).unwrap();
    let three = crate::threads::with_threads(3, || fit_lbfgs(&d, &y, 4, 1.0, 1000, 1e-4)).unwrap();
    assert_eq!(one.unwrap(), three.unwrap());
}
