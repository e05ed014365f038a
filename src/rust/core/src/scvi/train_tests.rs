//! scArches surgery against scvi-tools 1.4.2: goldens written by
//! `tools/fixtures/scvi/make_surgery_fixture.py` (query = the 300 fixture cells relabelled
//! b1 / q_b / q_a on the `scarches` reference; `surgery/init/model.pt` is the query model right
//! after `load_query_data(freeze_dropout=True)`).

use super::train::*;
use super::*;
use crate::matrix::{DenseView, ExprMatrix};
use std::path::PathBuf;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../tests/testthat/fixtures/scvi")
}

fn csv(name: &str) -> (Vec<String>, Vec<Vec<String>>) {
    let text = std::fs::read_to_string(dir().join(name)).unwrap();
    let mut lines = text.lines();
    let header = lines.next().unwrap().split(',').map(String::from).collect();
    let rows = lines
        .filter(|l| !l.is_empty())
        .map(|l| l.split(',').map(String::from).collect())
        .collect();
    (header, rows)
}

/// genes x cells column-major counts and the query batch codes (b0 b1 q_a q_b)
pub(super) fn query() -> (usize, usize, Vec<f64>, Vec<u32>) {
    let (h, rows) = csv("counts.csv");
    let g = h.len() - 1;
    let n = rows.len();
    let mut x = vec![0.0; g * n];
    for (j, r) in rows.iter().enumerate() {
        for k in 0..g {
            x[j * g + k] = r[k + 1].parse().unwrap();
        }
    }
    let batch = (0..n)
        .map(|j| {
            if j < 100 {
                1
            } else if j < 200 {
                3
            } else {
                2
            }
        })
        .collect();
    (g, n, x, batch)
}

fn init_model() -> (ScviModelFile, SurgeryModel) {
    let m = read_scvi_model(&dir().join("surgery/init")).unwrap();
    let s = SurgeryModel::from_model(&m, 0, 1).unwrap();
    (m, s)
}

fn prepared(s: &SurgeryModel) -> (QueryData, Vec<u32>) {
    let (g, n, x, batch) = query();
    let view = DenseView::new(g, n, &x).unwrap();
    (s.prepare(&ExprMatrix::Dense(view), &batch).unwrap(), batch)
}

#[test]
fn query_model_latent_equals_the_eval_encoder() {
    let (m, s) = init_model();
    assert_eq!(m.batch_mapping, ["b0", "b1", "q_a", "q_b"]);
    assert_eq!(s.n_batch(), 4);
    let (data, batch) = prepared(&s);
    let ours = s.latent(&data, 2).unwrap();
    let (g, n, x, _) = query();
    let enc = ScviEncoder::from_model(&m).unwrap();
    let cov = Covariates {
        batch: Some(&batch),
        ..Default::default()
    };
    let r = enc
        .latent(&ExprMatrix::Dense(DenseView::new(g, n, &x).unwrap()), &cov)
        .unwrap();
    for (a, b) in ours.mean.iter().zip(&r.mean) {
        assert!((a - b).abs() < 2e-5, "{a} vs {b}");
    }
    for (a, b) in ours.var.iter().zip(&r.var) {
        assert!((a - b).abs() < 2e-5 * b.abs().max(1.0), "{a} vs {b}");
    }
}

#[test]
fn loss_at_the_mean_matches_scvi_tools() {
    let (_, s) = init_model();
    let (data, _) = prepared(&s);
    let (rec, kl) = s.loss_at_mean(&data, 2).unwrap();
    let (h, rows) = csv("surgery/forward.csv");
    assert_eq!(h, ["cell", "reconstruction", "kl"]);
    assert_eq!(rows.len(), rec.len());
    for (j, r) in rows.iter().enumerate() {
        let (gr, gk): (f64, f64) = (r[1].parse().unwrap(), r[2].parse().unwrap());
        assert!(
            (rec[j] - gr).abs() < 2e-5 * gr.abs(),
            "cell {j}: rec {} vs {gr}",
            rec[j]
        );
        assert!(
            (kl[j] - gk).abs() < 1e-4 * gk.abs().max(1.0),
            "cell {j}: kl {} vs {gk}",
            kl[j]
        );
    }
}

fn grad_eps() -> Vec<f32> {
    let (_, rows) = csv("surgery/grad_eps.csv");
    rows.iter()
        .flat_map(|r| r[1..].iter().map(|v| v.parse::<f32>().unwrap()))
        .collect()
}

#[test]
fn minibatch_gradients_match_torch_after_the_scarches_hooks() {
    let (_, s) = init_model();
    let (data, _) = prepared(&s);
    let cells: Vec<usize> = (0..64).collect();
    let eps = grad_eps();
    let out = s.step(&data, &cells, &eps, 0.3, true);
    let loss = (out.reconstruction_sum + 0.3 * out.kl_sum) / 64.0;
    let text = std::fs::read_to_string(dir().join("surgery/grad.txt")).unwrap();
    let mut lines = text.lines();
    let l0: f64 = lines
        .next()
        .unwrap()
        .split('\t')
        .nth(2)
        .unwrap()
        .parse()
        .unwrap();
    assert!((loss - l0).abs() < 1e-5 * l0, "{loss} vs {l0}");
    let names = [
        "z_encoder.encoder.fc_layers.Layer 0.0",
        "z_encoder.encoder.fc_layers.Layer 1.0",
        "decoder.px_decoder.fc_layers.Layer 0.0",
        "decoder.px_decoder.fc_layers.Layer 1.0",
    ];
    let mut checked = 0;
    for l in lines {
        let f: Vec<&str> = l.split('\t').collect();
        let shape: Vec<usize> = f[1].split(',').map(|v| v.parse().unwrap()).collect();
        let vals: Vec<f64> = f[2].split(',').map(|v| v.parse().unwrap()).collect();
        if f[0].ends_with(".bias") {
            // the hooks zero every bias gradient
            assert!(vals.iter().all(|&v| v == 0.0), "{}", f[0]);
            continue;
        }
        let k = names
            .iter()
            .position(|n| f[0] == format!("{n}.weight"))
            .unwrap_or_else(|| panic!("unexpected gradient {}", f[0]));
        let (n_out, n_all) = (shape[0], shape[1]);
        let n_cov = 4;
        let n_in = n_all - n_cov;
        let ours = &out.grads[k];
        assert_eq!(ours.len(), n_cov * n_out);
        let scale = vals.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        for o in 0..n_out {
            for i in 0..n_all {
                let t = vals[o * n_all + i];
                if i < n_in {
                    assert_eq!(t, 0.0, "{}: feature column {i} has a gradient", f[0]);
                } else {
                    let r = ours[(i - n_in) * n_out + o] as f64;
                    assert!(
                        (r - t).abs() < 1e-4 * scale + 1e-6,
                        "{} [{o},{i}]: {r} vs torch {t}",
                        f[0]
                    );
                }
            }
        }
        checked += 1;
    }
    assert_eq!(checked, 4);
}

#[test]
fn gradients_match_finite_differences() {
    let (_, s) = init_model();
    let (data, _) = prepared(&s);
    let cells: Vec<usize> = (0..64).collect();
    let eps = grad_eps();
    let out = s.step(&data, &cells, &eps, 0.7, true);
    let loss = |m: &SurgeryModel| {
        let o = m.step(&data, &cells, &eps, 0.7, false);
        (o.reconstruction_sum + 0.7 * o.kl_sum) / 64.0
    };
    // directional derivatives (the f32 loss is too noisy for single entries): along the
    // gradient and along a fixed pseudo-random direction, per layer
    let h = 0.01f32;
    for k in 0..4 {
        let g = &out.grads[k];
        let norm = g.iter().map(|v| v * v).sum::<f32>().sqrt();
        let dirs: Vec<Vec<f32>> = vec![
            g.iter().map(|v| v / norm).collect(),
            (0..g.len())
                .map(|i| ((i * 7919 % 13) as f32 - 6.0) / 6.0)
                .collect(),
        ];
        for d in dirs {
            let dn = d.iter().map(|v| v * v).sum::<f32>().sqrt();
            let d: Vec<f32> = d.iter().map(|v| v / dn).collect();
            let mut p = s.clone();
            let mut q = s.clone();
            for (i, dv) in d.iter().enumerate() {
                p.covariate_weights_mut()[k][i] += h * dv;
                q.covariate_weights_mut()[k][i] -= h * dv;
            }
            let fd = (loss(&p) - loss(&q)) / (2.0 * h as f64);
            let an: f64 = g.iter().zip(&d).map(|(a, b)| (a * b) as f64).sum();
            assert!(
                (an - fd).abs() < 0.01 + 0.03 * fd.abs(),
                "layer {k}: analytic {an} vs finite difference {fd}"
            );
        }
    }
}

#[test]
fn new_batches_get_appended_columns() {
    let r = read_scvi_model(&dir().join("scarches")).unwrap();
    let (_, init) = init_model();
    let s = SurgeryModel::from_model(&r, 2, 5).unwrap();
    assert_eq!(s.n_batch(), 4);
    let ours = s.covariate_weights();
    let theirs = init.covariate_weights();
    for (k, (a, b)) in ours.iter().zip(&theirs).enumerate() {
        let n_out = a.len() / 4;
        // reference columns are kept; torch's init/model.pt carries the same values
        assert_eq!(a[..2 * n_out], b[..2 * n_out], "layer {k}");
        let fan_in = [104usize, 20, 8, 20][k];
        let bound = 1.0 / (fan_in as f32).sqrt();
        assert!(a[2 * n_out..].iter().all(|v| v.abs() <= bound));
        assert!(a[2 * n_out..].iter().any(|&v| v != 0.0));
    }
}

#[test]
fn split_and_schedule_follow_scvi() {
    let (t, v) = split_cells(300, 0.9, 128, 0);
    assert_eq!((t.len(), v.len()), (270, 30));
    let mut all: Vec<usize> = t.iter().chain(&v).copied().collect();
    all.sort();
    assert_eq!(all, (0..300).collect::<Vec<_>>());
    // 257 train cells = 2 x 128 + 1: that one cell moves to validation
    let (t, v) = split_cells(285, 0.9, 128, 0);
    assert_eq!((t.len(), v.len()), (256, 29));
    assert_eq!(max_epochs_heuristic(11_600), 400);
    assert_eq!(max_epochs_heuristic(50_000), 160);
    assert_eq!(max_epochs_heuristic(10_000_000), 1);
    let o = TrainOptions::default();
    assert_eq!(kl_weight(0, &o), 0.0);
    assert_eq!(kl_weight(100, &o), 0.25);
    assert_eq!(kl_weight(400, &o), 1.0);
}

/// One parameter's gradient from torch: name, shape, values (row-major).
type TorchGrad = (String, Vec<usize>, Vec<f64>);

/// torch's minibatch loss and gradients of a surgery fixture (`<dir>/grad.txt`: a loss
/// line, then one `name, shape, values` line per parameter).
fn torch_grads(dir_name: &str) -> (f64, Vec<TorchGrad>) {
    let text = std::fs::read_to_string(dir().join(dir_name).join("grad.txt")).unwrap();
    let mut lines = text.lines();
    let loss = lines
        .next()
        .unwrap()
        .split('\t')
        .nth(2)
        .unwrap()
        .parse()
        .unwrap();
    let grads = lines
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            let shape = f[1].split(',').map(|v| v.parse().unwrap()).collect();
            let vals = f[2].split(',').map(|v| v.parse().unwrap()).collect();
            (f[0].to_string(), shape, vals)
        })
        .collect();
    (loss, grads)
}

/// Our gradient equals torch's within 1e-4 of torch's largest value (`scale`).
fn assert_close_to_torch(ours: &[f32], theirs: &[f64], scale: f64, what: &str) {
    assert_eq!(ours.len(), theirs.len(), "{what}");
    for (i, (&r, &t)) in ours.iter().zip(theirs).enumerate() {
        assert!(
            (r as f64 - t).abs() < 1e-4 * scale + 1e-6,
            "{what} [{i}]: {r} vs torch {t}"
        );
    }
}

/// The last `n_cov` (one-hot) columns of torch's `n_out x n_all` weight gradient, in our
/// `n_cov x n_out` layout; the feature columns must have no gradient.
fn covariate_columns(vals: &[f64], shape: &[usize], n_cov: usize, what: &str) -> Vec<f64> {
    let (n_out, n_all) = (shape[0], shape[1]);
    let n_in = n_all - n_cov;
    let mut theirs = vec![0.0; n_cov * n_out];
    for o in 0..n_out {
        for i in 0..n_all {
            let t = vals[o * n_all + i];
            if i < n_in {
                assert_eq!(t, 0.0, "{what}: feature column {i} has a gradient");
            } else {
                theirs[(i - n_in) * n_out + o] = t;
            }
        }
    }
    theirs
}

fn mean_last(v: &[f64], k: usize) -> f64 {
    v[v.len() - k..].iter().sum::<f64>() / k as f64
}

/// scvi-tools' train/validation split of a surgery fixture (`<dir>/split.csv`).
fn fixture_split(dir: &str) -> (Vec<usize>, Vec<usize>) {
    let (_, split) = csv(&format!("{dir}/split.csv"));
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for r in &split {
        let j: usize = r[0].parse().unwrap();
        if r[1] == "train" {
            train.push(j)
        } else {
            val.push(j)
        }
    }
    (train, val)
}

/// scvi-tools' per-epoch train and validation ELBO of a surgery fixture (`<dir>/history.csv`).
fn fixture_elbo(dir: &str) -> (Vec<f64>, Vec<f64>) {
    let (_, hist) = csv(&format!("{dir}/history.csv"));
    let col = |k: usize| -> Vec<f64> { hist.iter().map(|r| r[k].parse().unwrap()).collect() };
    (col(1), col(2))
}

/// Our (train, validation) ELBO per epoch; asserts the mean of the last 10 epochs of each
/// is within 1 % of scvi-tools' `(elbo_t, elbo_v)`.
fn assert_elbo_within_1pct(
    res: &TrainResult,
    elbo_t: &[f64],
    elbo_v: &[f64],
) -> (Vec<f64>, Vec<f64>) {
    assert_eq!(res.history.len(), elbo_v.len());
    let ours_v: Vec<f64> = res.history.iter().map(|e| e.elbo_validation).collect();
    let ours_t: Vec<f64> = res.history.iter().map(|e| e.elbo_train).collect();
    for (what, ours, theirs) in [("validation", &ours_v, elbo_v), ("train", &ours_t, elbo_t)] {
        let (a, b) = (mean_last(ours, 10), mean_last(theirs, 10));
        eprintln!("{what} ELBO, last 10 epochs: scannot {a:.3}, scvi-tools {b:.3}");
        assert!(
            (a - b).abs() < 0.01 * b,
            "{what} ELBO {a} vs scvi-tools {b}"
        );
    }
    (ours_t, ours_v)
}

#[test]
fn surgery_training_reaches_scvi_tools_elbo() {
    let (_, mut s) = init_model();
    let (data, _) = prepared(&s);
    let (train, val) = fixture_split("surgery");
    let (elbo_t, elbo_v) = fixture_elbo("surgery");
    let opts = TrainOptions {
        max_epochs: Some(elbo_v.len()),
        freeze_dropout: true,
        split: Some((train, val)),
        seed: 3,
        n_threads: 2,
        ..Default::default()
    };
    let mut seen = 0;
    let res = s
        .train(
            &data,
            &opts,
            &mut |e| {
                assert_eq!(e.epoch, seen);
                seen += 1;
            },
            &|| false,
        )
        .unwrap();
    assert!(!res.stopped_early && !res.cancelled);
    let (ours_t, _) = assert_elbo_within_1pct(&res, &elbo_t, &elbo_v);
    // training improved on the first epoch, as it does in scvi-tools
    assert!(mean_last(&ours_t, 10) < ours_t[0]);
}

#[test]
fn cancellation_stops_between_minibatches() {
    let (_, mut s) = init_model();
    let (data, _) = prepared(&s);
    let before = s.covariate_weights().concat();
    let calls = std::cell::Cell::new(0);
    let opts = TrainOptions {
        max_epochs: Some(5),
        ..Default::default()
    };
    let res = s
        .train(&data, &opts, &mut |_| {}, &|| {
            calls.set(calls.get() + 1);
            calls.get() > 4
        })
        .unwrap();
    assert!(res.cancelled);
    assert_eq!(res.history.len(), 1); // 3 minibatches per epoch: cancelled in epoch 2
    assert_ne!(before, s.covariate_weights().concat());
}

// ---- batch norm: the `default` reference (BatchNorm in encoder and decoder, no layer norm,
// batch not encoded; n_hidden 16, n_latent 4, 1 layer), goldens in `surgery_bn/`

fn bn_model() -> (ScviModelFile, SurgeryModel) {
    let m = read_scvi_model(&dir().join("surgery_bn/init")).unwrap();
    assert_eq!(m.init.use_batch_norm, "both");
    let s = SurgeryModel::from_model(&m, 0, 1).unwrap();
    (m, s)
}

fn bn_grad_eps() -> Vec<f32> {
    let (_, rows) = csv("surgery_bn/grad_eps.csv");
    rows.iter()
        .flat_map(|r| r[1..].iter().map(|v| v.parse::<f32>().unwrap()))
        .collect()
}

fn bn_split() -> (Vec<usize>, Vec<usize>) {
    fixture_split("surgery_bn")
}

/// Eval-mode encoder with BatchNorm (running statistics): equal to the reference encoder of
/// `vae.rs` and, since the batch is not encoded and the encoder's BatchNorm is frozen, to
/// scvi-tools' latent after query training.
#[test]
fn bn_latent_matches_the_encoder_and_scvi_tools_after_training() {
    let (m, mut s) = bn_model();
    let (data, batch) = prepared(&s);
    let ours = s.latent(&data, 2).unwrap();
    let (g, n, x, _) = query();
    let enc = ScviEncoder::from_model(&m).unwrap();
    let cov = Covariates {
        batch: Some(&batch),
        ..Default::default()
    };
    let r = enc
        .latent(&ExprMatrix::Dense(DenseView::new(g, n, &x).unwrap()), &cov)
        .unwrap();
    for (a, b) in ours.mean.iter().zip(&r.mean) {
        assert!((a - b).abs() < 2e-5, "{a} vs {b}");
    }
    // a few epochs of training leave the latent unchanged
    let opts = TrainOptions {
        max_epochs: Some(3),
        freeze_dropout: true,
        split: Some(bn_split()),
        n_threads: 2,
        ..Default::default()
    };
    s.train(&data, &opts, &mut |_| {}, &|| false).unwrap();
    let after = s.latent(&data, 1).unwrap();
    assert_eq!(after.mean, ours.mean);
    let (h, rows) = csv("surgery_bn/latent.csv");
    let nl = h.len() - 1;
    assert_eq!(nl, after.n_latent);
    for (j, r) in rows.iter().enumerate() {
        for k in 0..nl {
            let t: f64 = r[k + 1].parse().unwrap();
            let o = after.mean[k * n + j];
            assert!((o - t).abs() < 2e-5, "cell {j} z{k}: {o} vs scvi-tools {t}");
        }
    }
}

#[test]
fn bn_loss_at_the_mean_matches_scvi_tools() {
    let (_, s) = bn_model();
    let (data, _) = prepared(&s);
    let (rec, kl) = s.loss_at_mean(&data, 2).unwrap();
    let (_, rows) = csv("surgery_bn/forward.csv");
    assert_eq!(rows.len(), rec.len());
    for (j, r) in rows.iter().enumerate() {
        let (gr, gk): (f64, f64) = (r[1].parse().unwrap(), r[2].parse().unwrap());
        assert!(
            (rec[j] - gr).abs() < 2e-5 * gr.abs(),
            "cell {j}: rec {} vs {gr}",
            rec[j]
        );
        assert!(
            (kl[j] - gk).abs() < 1e-4 * gk.abs().max(1.0),
            "cell {j}: kl"
        );
    }
}

/// One minibatch's loss and gradients against torch's (eval mode, after the scArches hooks):
/// the decoder's batch columns, and the decoder BatchNorm's weight and bias.
#[test]
fn bn_minibatch_gradients_match_torch() {
    let (_, s) = bn_model();
    let (data, _) = prepared(&s);
    let cells: Vec<usize> = (0..64).collect();
    let eps = bn_grad_eps();
    let out = s.step(&data, &cells, &eps, 0.3, true);
    // encoder layer (no covariates), decoder layer, then the decoder BatchNorm's gamma, beta
    assert_eq!(out.grads.len(), 4);
    assert!(out.grads[0].is_empty());
    let loss = (out.reconstruction_sum + 0.3 * out.kl_sum) / 64.0;
    let (l0, grads) = torch_grads("surgery_bn");
    assert!((loss - l0).abs() < 1e-5 * l0, "{loss} vs {l0}");
    let mut checked = 0;
    for (name, shape, vals) in &grads {
        let scale = vals.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        let close = |ours: &[f32], theirs: &[f64], what: &str| {
            assert_close_to_torch(ours, theirs, scale, what)
        };
        match name.as_str() {
            "z_encoder.encoder.fc_layers.Layer 0.0.weight"
            | "z_encoder.encoder.fc_layers.Layer 0.0.bias"
            | "decoder.px_decoder.fc_layers.Layer 0.0.bias" => {
                // hooked: no covariate columns in the encoder, biases zeroed
                assert!(vals.iter().all(|&v| v == 0.0), "{name}");
            }
            "decoder.px_decoder.fc_layers.Layer 0.0.weight" => {
                close(
                    &out.grads[1],
                    &covariate_columns(vals, shape, 4, name),
                    name,
                );
            }
            "decoder.px_decoder.fc_layers.Layer 0.1.weight" => close(&out.grads[2], vals, name),
            "decoder.px_decoder.fc_layers.Layer 0.1.bias" => close(&out.grads[3], vals, name),
            other => panic!("unexpected gradient {other}"),
        }
        checked += 1;
    }
    assert_eq!(checked, 6);
}

/// Directional finite differences of the loss along the decoder's batch columns and the
/// BatchNorm weight and bias.
#[test]
fn bn_gradients_match_finite_differences() {
    let (_, s) = bn_model();
    let (data, _) = prepared(&s);
    let cells: Vec<usize> = (0..64).collect();
    let eps = bn_grad_eps();
    let out = s.step(&data, &cells, &eps, 0.7, true);
    let loss = |m: &SurgeryModel| {
        let o = m.step(&data, &cells, &eps, 0.7, false);
        (o.reconstruction_sum + 0.7 * o.kl_sum) / 64.0
    };
    let h = 0.01f32;
    // 1: decoder batch columns, 2: BN gamma, 3: BN beta
    for k in 1..4 {
        let g = &out.grads[k];
        let norm = g.iter().map(|v| v * v).sum::<f32>().sqrt();
        let dirs: Vec<Vec<f32>> = vec![
            g.iter().map(|v| v / norm).collect(),
            (0..g.len())
                .map(|i| ((i * 7919 % 13) as f32 - 6.0) / 6.0)
                .collect(),
        ];
        for d in dirs {
            let dn = d.iter().map(|v| v * v).sum::<f32>().sqrt();
            let d: Vec<f32> = d.iter().map(|v| v / dn).collect();
            let shift = |m: &mut SurgeryModel, sign: f32| {
                let p: &mut [f32] = match k {
                    1 => m.covariate_weights_mut().swap_remove(1),
                    2 => m.batch_norm_affine_mut().swap_remove(0).0,
                    _ => m.batch_norm_affine_mut().swap_remove(0).1,
                };
                for (v, dv) in p.iter_mut().zip(&d) {
                    *v += sign * h * dv;
                }
            };
            let (mut p, mut q) = (s.clone(), s.clone());
            shift(&mut p, 1.0);
            shift(&mut q, -1.0);
            let fd = (loss(&p) - loss(&q)) / (2.0 * h as f64);
            let an: f64 = g.iter().zip(&d).map(|(a, b)| (a * b) as f64).sum();
            assert!(
                (an - fd).abs() < 0.01 + 0.03 * fd.abs(),
                "parameter {k}: analytic {an} vs finite difference {fd}"
            );
        }
    }
}

/// 60 epochs on scvi-tools' own split: the train and validation ELBO of the last 10 epochs
/// within 1 % of scvi-tools'; the BatchNorm weight and bias train.
#[test]
fn bn_surgery_training_reaches_scvi_tools_elbo() {
    let (_, mut s) = bn_model();
    let (data, _) = prepared(&s);
    let before = s.batch_norm_affine();
    assert_eq!(before.len(), 1);
    assert_eq!(before[0].0, "decoder.px_decoder.fc_layers.Layer 0.1");
    let (elbo_t, elbo_v) = fixture_elbo("surgery_bn");
    let opts = TrainOptions {
        max_epochs: Some(elbo_v.len()),
        freeze_dropout: true,
        split: Some(bn_split()),
        seed: 3,
        n_threads: 2,
        ..Default::default()
    };
    let res = s.train(&data, &opts, &mut |_| {}, &|| false).unwrap();
    let (_, ours_v) = assert_elbo_within_1pct(&res, &elbo_t, &elbo_v);
    // the first epoch too (the decoder starts from the same weights)
    assert!((ours_v[0] - elbo_v[0]).abs() < 0.01 * elbo_v[0]);
    let after = s.batch_norm_affine();
    assert_ne!(before[0].1, after[0].1);
    assert_ne!(before[0].2, after[0].2);
}

/// Cells whose row indices are not sorted (a CSC the caller did not sort) are ordered in
/// `prepare`: the latent and the losses equal those of the sorted matrix.
#[test]
fn unsorted_csc_columns_give_the_sorted_result() {
    use crate::matrix::CscView;
    let (_, s) = init_model();
    let (g, n, x, batch) = query();
    let (mut p, mut i, mut v) = (vec![0i32], Vec::new(), Vec::new());
    let (mut ir, mut vr) = (Vec::new(), Vec::new());
    for j in 0..n {
        let col: Vec<(i32, f64)> = (0..g)
            .filter(|&k| x[j * g + k] > 0.0)
            .map(|k| (k as i32, x[j * g + k]))
            .collect();
        i.extend(col.iter().map(|e| e.0));
        v.extend(col.iter().map(|e| e.1));
        ir.extend(col.iter().rev().map(|e| e.0));
        vr.extend(col.iter().rev().map(|e| e.1));
        p.push(i.len() as i32);
    }
    let sorted = CscView::new(g, n, &p, &i, &v).unwrap();
    let d1 = s.prepare(&ExprMatrix::Csc(sorted), &batch).unwrap();
    let Ok(rev) = CscView::new(g, n, &p, &ir, &vr) else {
        return; // the view itself refuses unsorted columns: nothing to order
    };
    let d2 = s.prepare(&ExprMatrix::Csc(rev), &batch).unwrap();
    let (l1, l2) = (s.latent(&d1, 1).unwrap(), s.latent(&d2, 1).unwrap());
    assert_eq!(l1.mean, l2.mean);
    let (r1, _) = s.loss_at_mean(&d1, 1).unwrap();
    let (r2, _) = s.loss_at_mean(&d2, 1).unwrap();
    for (a, b) in r1.iter().zip(&r2) {
        assert!((a - b).abs() <= 1e-9 * a.abs().max(1.0), "{a} vs {b}");
    }
}

/// The heads' logits of the AVX-512 kernel (where the CPU has it; else both are faer's) equal
/// a plain GEMM's, for row counts that leave partial register tiles (and, in the batch-norm
/// model, 2 x 100 outputs: a partial 32-output block).
#[test]
fn head_logits_equal_a_plain_gemm() {
    for (_, s) in [init_model(), bn_model()] {
        let hd = 16;
        for rows in [1usize, 5, 6, 7, 13, 64] {
            let h: Vec<f32> = (0..rows * hd)
                .map(|i| ((i * 7919 % 97) as f32 - 48.0) / 25.0)
                .collect();
            let (fast, plain) = s.head_logits_both(&h, rows);
            assert_eq!(fast.len(), plain.len());
            for (a, b) in fast.iter().zip(&plain) {
                assert!(
                    (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                    "rows {rows}: {a} vs {b}"
                );
            }
        }
    }
}

// ---- extra covariates: the `covs` reference (cond: categorical, score: continuous,
// encode_covariates, covariates deeply injected, batch norm), goldens in `surgery_covs/`;
// the query's cond relabels 'z' of cells 200-299 as the new level 'w' (x y z w)

fn covs_model() -> (ScviModelFile, SurgeryModel) {
    let m = read_scvi_model(&dir().join("surgery_covs/init")).unwrap();
    assert_eq!(m.extra_categorical[0].1, ["x", "y", "z", "w"]);
    let s = SurgeryModel::from_model_covs(&m, 0, &[0], 1).unwrap();
    (m, s)
}

/// (cond codes x y z w, score) of the query
pub(super) fn covs_query() -> (Vec<u32>, Vec<f64>) {
    let (h, rows) = csv("obs.csv");
    assert_eq!(h, ["cell", "batch", "cond", "score"]);
    let cond = rows
        .iter()
        .enumerate()
        .map(|(j, r)| match (r[2].as_str(), j >= 200) {
            ("x", _) => 0,
            ("y", _) => 1,
            ("z", false) => 2,
            ("z", true) => 3,
            (o, _) => panic!("cond {o}"),
        })
        .collect();
    let score = rows.iter().map(|r| r[3].parse().unwrap()).collect();
    (cond, score)
}

/// The latent of `vae.rs`'s encoder of model `m` on the covariate query (batch, `cond` as
/// its categorical codes, score).
pub(super) fn covs_encoder_latent(m: &ScviModelFile, cond: &[u32]) -> LatentOutput {
    let (g, n, x, batch) = query();
    let (_, score) = covs_query();
    let enc = ScviEncoder::from_model(m).unwrap();
    let cov = Covariates {
        batch: Some(&batch),
        categorical: vec![cond],
        continuous: vec![&score],
    };
    enc.latent(&ExprMatrix::Dense(DenseView::new(g, n, &x).unwrap()), &cov)
        .unwrap()
}

fn covs_prepared(s: &SurgeryModel) -> QueryData {
    let (g, n, x, batch) = query();
    let (cond, score) = covs_query();
    let view = DenseView::new(g, n, &x).unwrap();
    s.prepare_covs(&ExprMatrix::Dense(view), &batch, &[cond], &[score])
        .unwrap()
}

fn covs_split() -> (Vec<usize>, Vec<usize>) {
    fixture_split("surgery_covs")
}

#[test]
fn covs_without_the_covariates_is_refused() {
    let (m, s) = covs_model();
    assert!(SurgeryModel::from_model(&m, 0, 1).is_err());
    let (g, n, x, batch) = query();
    let view = DenseView::new(g, n, &x).unwrap();
    assert!(s.prepare(&ExprMatrix::Dense(view), &batch).is_err());
    let (cond, _) = covs_query();
    let view = DenseView::new(g, n, &x).unwrap();
    let bad: Vec<u32> = cond.iter().map(|&c| c + 1).collect();
    assert!(s
        .prepare_covs(&ExprMatrix::Dense(view), &batch, &[bad], &[vec![0.0; n]])
        .is_err());
}

/// The query model's encoder equals the reference encoder of `vae.rs` (covariates included)
#[test]
fn covs_latent_matches_the_encoder() {
    let (m, s) = covs_model();
    let data = covs_prepared(&s);
    let ours = s.latent(&data, 2).unwrap();
    let (cond, _) = covs_query();
    let r = covs_encoder_latent(&m, &cond);
    for (a, b) in ours.mean.iter().zip(&r.mean) {
        assert!((a - b).abs() < 2e-5, "{a} vs {b}");
    }
}

#[test]
fn covs_loss_at_the_mean_matches_scvi_tools() {
    let (_, s) = covs_model();
    let data = covs_prepared(&s);
    let (rec, kl) = s.loss_at_mean(&data, 2).unwrap();
    let (_, rows) = csv("surgery_covs/forward.csv");
    assert_eq!(rows.len(), rec.len());
    for (j, r) in rows.iter().enumerate() {
        let (gr, gk): (f64, f64) = (r[1].parse().unwrap(), r[2].parse().unwrap());
        assert!(
            (rec[j] - gr).abs() < 2e-5 * gr.abs(),
            "cell {j}: rec {} vs {gr}",
            rec[j]
        );
        assert!(
            (kl[j] - gk).abs() < 1e-4 * gk.abs().max(1.0),
            "cell {j}: kl {} vs {gk}",
            kl[j]
        );
    }
}

/// One minibatch's gradients against torch's after the scArches hooks: all one-hot columns
/// (batch and cond, old and new) of every layer train; the feature columns (continuous
/// covariate included) and biases are zeroed; the decoder BatchNorms' weight and bias train.
#[test]
fn covs_minibatch_gradients_match_torch() {
    let (_, s) = covs_model();
    let data = covs_prepared(&s);
    let cells: Vec<usize> = (0..64).collect();
    let (_, rows) = csv("surgery_covs/grad_eps.csv");
    let eps: Vec<f32> = rows
        .iter()
        .flat_map(|r| r[1..].iter().map(|v| v.parse::<f32>().unwrap()))
        .collect();
    let out = s.step(&data, &cells, &eps, 0.3, true);
    // 2 encoder layers, 2 decoder layers, then gamma / beta of the 2 decoder BatchNorms
    assert_eq!(out.grads.len(), 8);
    let loss = (out.reconstruction_sum + 0.3 * out.kl_sum) / 64.0;
    let (l0, grads) = torch_grads("surgery_covs");
    assert!((loss - l0).abs() < 1e-5 * l0, "{loss} vs {l0}");
    let mut checked = 0;
    for (name, shape, vals) in &grads {
        let scale = vals.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        let close = |ours: &[f32], theirs: &[f64], what: &str| {
            assert_close_to_torch(ours, theirs, scale, what)
        };
        let weight = |k: usize| {
            // 4 batch + 4 cond one-hot columns
            let theirs = covariate_columns(vals, shape, 8, name);
            assert!(theirs.iter().any(|&v| v != 0.0));
            close(&out.grads[k], &theirs, name);
        };
        match name.as_str() {
            k if k.ends_with(".0.bias") => {
                assert!(vals.iter().all(|&v| v == 0.0), "{k}");
            }
            "z_encoder.encoder.fc_layers.Layer 0.0.weight" => weight(0),
            "z_encoder.encoder.fc_layers.Layer 1.0.weight" => weight(1),
            "decoder.px_decoder.fc_layers.Layer 0.0.weight" => weight(2),
            "decoder.px_decoder.fc_layers.Layer 1.0.weight" => weight(3),
            "decoder.px_decoder.fc_layers.Layer 0.1.weight" => close(&out.grads[4], vals, name),
            "decoder.px_decoder.fc_layers.Layer 0.1.bias" => close(&out.grads[5], vals, name),
            "decoder.px_decoder.fc_layers.Layer 1.1.weight" => close(&out.grads[6], vals, name),
            "decoder.px_decoder.fc_layers.Layer 1.1.bias" => close(&out.grads[7], vals, name),
            other => panic!("unexpected gradient {other}"),
        }
        checked += 1;
    }
    assert_eq!(checked, 12);
}

/// Surgery on the reference itself: the new batch and cond columns are appended after all of
/// the reference's columns, as load_query_data pads them (positional, not per covariate).
#[test]
fn covs_new_levels_are_appended_after_all_reference_columns() {
    let r = read_scvi_model(&dir().join("covs")).unwrap();
    let (_, init) = covs_model();
    let s = SurgeryModel::from_model_covs(&r, 2, &[1], 5).unwrap();
    let (ours, theirs) = (s.covariate_weights(), init.covariate_weights());
    assert_eq!(ours.len(), 4);
    for (k, (a, b)) in ours.iter().zip(&theirs).enumerate() {
        assert_eq!(a.len(), b.len(), "layer {k}");
        let n_out = a.len() / 8;
        // reference: b0 b1 x y z (5 columns), then 3 fresh
        assert_eq!(a[..5 * n_out], b[..5 * n_out], "layer {k}");
        assert!(a[5 * n_out..].iter().any(|&v| v != 0.0));
    }
}

/// 60 epochs on scvi-tools' split: train and validation ELBO of the last 10 epochs within 1 %
/// of scvi-tools'; the latent (the encoder's covariate columns train) close to scvi-tools'.
#[test]
fn covs_surgery_training_reaches_scvi_tools_elbo() {
    let (_, mut s) = covs_model();
    let data = covs_prepared(&s);
    let (elbo_t, elbo_v) = fixture_elbo("surgery_covs");
    let before = s.latent(&data, 1).unwrap();
    let opts = TrainOptions {
        max_epochs: Some(elbo_v.len()),
        freeze_dropout: true,
        split: Some(covs_split()),
        seed: 3,
        n_threads: 2,
        ..Default::default()
    };
    let res = s.train(&data, &opts, &mut |_| {}, &|| false).unwrap();
    let (_, ours_v) = assert_elbo_within_1pct(&res, &elbo_t, &elbo_v);
    assert!((ours_v[0] - elbo_v[0]).abs() < 0.01 * elbo_v[0]);
    // latent after training: scvi-tools' moved from the start as ours did (different noise,
    // so compared by the distance to scvi-tools' against the distance travelled)
    let after = s.latent(&data, 1).unwrap();
    let (h, rows) = csv("surgery_covs/latent.csv");
    let (n, nl) = (rows.len(), h.len() - 1);
    let (mut d_ours, mut d_moved) = (0.0f64, 0.0f64);
    for (j, r) in rows.iter().enumerate() {
        for k in 0..nl {
            let t: f64 = r[k + 1].parse().unwrap();
            d_ours += (after.mean[k * n + j] - t).powi(2);
            d_moved += (before.mean[k * n + j] - t).powi(2);
        }
    }
    let (d_ours, d_moved) = (
        (d_ours / (n * nl) as f64).sqrt(),
        (d_moved / (n * nl) as f64).sqrt(),
    );
    eprintln!("latent rms vs scvi-tools: trained {d_ours:.4}, untrained {d_moved:.4}");
    assert!(d_ours < 0.5 * d_moved, "{d_ours} vs untrained {d_moved}");
}

/// The weights for saving keep torch's layout: feature columns, continuous covariate, then the
/// one-hot columns, equal to init/model.pt's.
#[test]
fn covs_layer_weights_keep_the_torch_layout() {
    let (m, s) = covs_model();
    for lw in s.layer_weights() {
        let t = m.tensor(&format!("{}.weight", lw.key)).unwrap();
        let w = t.to_f32().unwrap();
        let n_all = t.shape[1];
        assert_eq!(n_all, lw.n_in + lw.wc.len() / lw.n_out, "{}", lw.key);
        for o in 0..lw.n_out {
            for i in 0..lw.n_in {
                assert_eq!(lw.w[o * lw.n_in + i], w[o * n_all + i], "{}", lw.key);
            }
            for c in 0..n_all - lw.n_in {
                assert_eq!(
                    lw.wc[c * lw.n_out + o],
                    w[o * n_all + lw.n_in + c],
                    "{}",
                    lw.key
                );
            }
        }
    }
}
