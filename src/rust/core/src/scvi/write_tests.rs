//! Writing `model.pt` (model_write.rs): round trips of the scvi-tools 1.4.2 fixture models,
//! the torch archive layout, and the scArches query model against scvi-tools' own query model
//! (`surgery/init/model.pt`, saved right after `load_query_data`).

use super::train_tests::{covs_encoder_latent, covs_query, query};
use super::*;
use crate::matrix::{DenseView, ExprMatrix};
use crate::pickle::Value;
use std::io::Read;
use std::path::PathBuf;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../tests/testthat/fixtures/scvi")
}

fn model(name: &str) -> ScviModelFile {
    read_scvi_model(&dir().join(name)).unwrap()
}

fn assert_same_model(a: &ScviModelFile, b: &ScviModelFile) {
    assert_eq!(a.state_dict.len(), b.state_dict.len());
    for ((ka, ta), (kb, tb)) in a.state_dict.iter().zip(&b.state_dict) {
        assert_eq!(ka, kb);
        assert_eq!(ta, tb, "{ka}");
    }
    assert_eq!(a.extra_state, b.extra_state);
    assert_eq!(a.var_names, b.var_names);
    assert_eq!(a.init, b.init);
    assert_eq!(a.setup, b.setup);
    assert_eq!(a.scvi_version, b.scvi_version);
    assert_eq!(a.model_name, b.model_name);
    assert_eq!(a.batch_mapping, b.batch_mapping);
    assert_eq!(a.n_batch, b.n_batch);
    assert_eq!(a.labels_mapping, b.labels_mapping);
    assert_eq!(a.extra_categorical, b.extra_categorical);
    assert_eq!(a.extra_continuous, b.extra_continuous);
    assert!(a.attr_dict == b.attr_dict, "attr_dict differs");
}

#[test]
fn fixture_models_round_trip_exactly() {
    for name in ["default", "covs", "scarches", "surgery/init"] {
        let m = model(name);
        let bytes = scvi_model_bytes(&m).unwrap();
        let back = parse_scvi_model(&bytes).unwrap();
        assert_same_model(&m, &back);
        // writing is deterministic
        assert_eq!(bytes, scvi_model_bytes(&back).unwrap(), "{name}");
    }
}

#[test]
fn archive_is_laid_out_as_torch_writes_it() {
    let m = model("scarches");
    let bytes = scvi_model_bytes(&m).unwrap();
    let mut z = zip::ZipArchive::new(std::io::Cursor::new(&bytes)).unwrap();
    let names: Vec<String> = z.file_names().map(String::from).collect();
    let n = m.state_dict.len();
    let mut want = vec![
        "model/data.pkl".to_string(),
        "model/.format_version".into(),
        "model/.storage_alignment".into(),
        "model/byteorder".into(),
    ];
    want.extend((0..n).map(|k| format!("model/data/{k}")));
    want.push("model/version".into());
    want.push("model/.data/serialization_id".into());
    let mut got = names.clone();
    got.sort();
    want.sort();
    assert_eq!(got, want);
    for i in 0..z.len() {
        let mut f = z.by_index(i).unwrap();
        assert_eq!(
            f.compression(),
            zip::CompressionMethod::Stored,
            "{}",
            f.name()
        );
        assert_eq!(
            f.data_start().unwrap() % 64,
            0,
            "{} not 64-byte aligned",
            f.name()
        );
        let name = f.name().to_string();
        let mut buf = Vec::new();
        f.read_to_end(&mut buf).unwrap();
        match name.as_str() {
            "model/version" => assert_eq!(buf, b"3\n"),
            "model/byteorder" => assert_eq!(buf, b"little"),
            "model/.storage_alignment" => assert_eq!(buf, b"64"),
            "model/.format_version" => assert_eq!(buf, b"1"),
            "model/.data/serialization_id" => {
                assert_eq!(buf.len(), 40);
                assert!(buf.iter().all(u8::is_ascii_digit));
            }
            "model/data.pkl" => assert_eq!(&buf[..2], &[0x80, 2], "protocol 2"),
            _ => {}
        }
    }
    // the storage of the first tensor is px_r's float32 bytes
    let mut f = z.by_name("model/data/0").unwrap();
    let mut buf = Vec::new();
    f.read_to_end(&mut buf).unwrap();
    let px_r = m.tensor("px_r").unwrap().to_f32().unwrap();
    let want: Vec<u8> = px_r.iter().flat_map(|x| x.to_le_bytes()).collect();
    assert_eq!(buf, want);
}

#[test]
fn written_archives_survive_corruption_checks() {
    let bytes = scvi_model_bytes(&model("default")).unwrap();
    for n in [0, 100, bytes.len() / 2, bytes.len() - 10] {
        assert!(parse_scvi_model(&bytes[..n]).is_err(), "truncated to {n}");
    }
    // a tensor whose data does not fill its shape is refused, not written
    let mut m = model("default");
    m.state_dict[0].1.shape = vec![7, 7];
    let e = scvi_model_bytes(&m).unwrap_err();
    assert!(e.to_string().contains("px_r"), "{e}");
}

fn query_model() -> (ScviModelFile, SurgeryModel, ScviModelFile) {
    let reference = model("scarches");
    let mut s = SurgeryModel::from_model(&reference, 2, 3).unwrap();
    // stand-in for training: distinct values in every covariate column
    for (l, wc) in s.covariate_weights_mut().into_iter().enumerate() {
        for (k, v) in wc.iter_mut().enumerate() {
            *v = ((k * 7 + l * 13) % 17) as f32 / 17.0 - 0.5;
        }
    }
    let info = QueryInfo {
        new_batch_levels: vec!["q_a".into(), "q_b".into()],
        new_cat_levels: vec![],
        n_obs: 300,
        train_indices: (0..270).collect(),
        validation_indices: (270..300).collect(),
        seed: 5,
        history: vec![
            ("elbo_train".into(), vec![200.5, 190.25]),
            ("elbo_validation".into(), vec![201.0, 195.0]),
        ],
    };
    let q = query_model_file(&reference, &s, &info).unwrap();
    (reference, s, q)
}

/// Key and shape of every tensor of a model, in order.
fn state_shapes(m: &ScviModelFile) -> Vec<(String, Vec<usize>)> {
    m.state_dict
        .iter()
        .map(|(k, t)| (k.clone(), t.shape.clone()))
        .collect()
}

#[test]
fn query_model_has_the_layout_of_scvi_tools_query_model() {
    let (reference, _, q) = query_model();
    let back = parse_scvi_model(&scvi_model_bytes(&q).unwrap()).unwrap();
    assert_same_model(&q, &back);
    // same keys, order and shapes as the model scvi-tools' load_query_data saved
    let scvi_q = model("surgery/init");
    assert_eq!(state_shapes(&back), state_shapes(&scvi_q));
    assert_eq!(back.extra_state, scvi_q.extra_state);
    assert_eq!(back.batch_mapping, ["b0", "b1", "q_a", "q_b"]);
    assert_eq!(back.n_batch, 4);
    assert_eq!(back.init, scvi_q.init);
    assert_eq!(back.setup, scvi_q.setup);
    // the registry has the query's batches and cell count, and the keys scvi-tools writes
    let reg = back.attr_dict.get("registry_").unwrap();
    let fr = reg.get("field_registries").unwrap();
    let n_obs = fr.get("X").and_then(|x| x.get("state_registry"));
    assert_eq!(n_obs.and_then(|s| s.get("n_obs")), Some(&Value::Int(300)));
    let keys = |v: &Value| -> Vec<String> {
        let mut k: Vec<String> = v
            .as_dict()
            .unwrap()
            .iter()
            .map(|(k, _)| k.as_str().unwrap().to_owned())
            .collect();
        k.sort();
        k
    };
    assert_eq!(keys(&back.attr_dict), keys(&scvi_q.attr_dict));
    assert_eq!(keys(reg), keys(scvi_q.attr_dict.get("registry_").unwrap()));
    assert_eq!(back.attr_dict.get("is_trained_"), Some(&Value::Bool(true)));
    let val = crate::pickle::numpy::ndarray(back.attr_dict.get("validation_indices_").unwrap())
        .unwrap()
        .to_i64()
        .unwrap();
    assert_eq!(val, (270..300).collect::<Vec<i64>>());
    // history_: {name: pandas.DataFrame({name: [...]}, pandas.Index(range, name='epoch'))}
    let h = back.attr_dict.get("history_").unwrap();
    assert_eq!(keys(h), ["elbo_train", "elbo_validation"]);
    let frame = h.get("elbo_train").unwrap().as_object().unwrap();
    assert_eq!(frame.callable_name(), Some(("pandas", "DataFrame")));
    let args = frame.arg_slice();
    assert_eq!(
        args[0].get("elbo_train"),
        Some(&Value::List(vec![
            Value::Float(200.5),
            Value::Float(190.25)
        ]))
    );
    assert!(args[1].is_call_of("pandas", "Index"));
    // frozen tensors are the reference's; enlarged ones keep the reference's columns
    for (k, t) in &back.state_dict {
        let r = reference.tensor(k).unwrap();
        if r.shape == t.shape {
            if k.starts_with("z_encoder.encoder.fc_layers")
                || k.starts_with("decoder.px_decoder.fc_layers")
            {
                continue; // (covariate columns of a layer that already had them: trained)
            }
            assert_eq!(r, t, "{k}");
            continue;
        }
        let (ro, ri) = (r.shape[0], r.shape[1]);
        let ti = t.shape[1];
        assert_eq!(t.shape[0], ro);
        let (rv, tv) = (r.to_f32().unwrap(), t.to_f32().unwrap());
        let n_feat = if k.contains("Layer 0") && !k.starts_with("decoder") {
            100
        } else if k.starts_with("decoder") && k.contains("Layer 0") {
            4
        } else {
            16
        };
        for o in 0..ro {
            assert_eq!(
                rv[o * ri..o * ri + n_feat],
                tv[o * ti..o * ti + n_feat],
                "{k}"
            );
            if k.starts_with("l_encoder") {
                // l_encoder keeps the reference's batch columns; new ones in torch's range
                assert_eq!(rv[o * ri..(o + 1) * ri], tv[o * ti..o * ti + ri], "{k}");
                let bound = 1.0 / (ti as f32).sqrt();
                assert!(tv[o * ti + ri..(o + 1) * ti]
                    .iter()
                    .all(|v| v.abs() <= bound));
            }
        }
    }
}

#[test]
fn saved_query_model_gives_the_trained_latent() {
    let (_, s, q) = query_model();
    let (g, n, x, batch) = query();
    let data = s
        .prepare(
            &ExprMatrix::Dense(DenseView::new(g, n, &x).unwrap()),
            &batch,
        )
        .unwrap();
    let ours = s.latent(&data, 2).unwrap();
    let tmp = std::env::temp_dir().join(format!("scannot-write-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let path = write_scvi_model(&q, &tmp.join("query")).unwrap();
    assert_eq!(path, tmp.join("query").join("model.pt"));
    let left: Vec<_> = std::fs::read_dir(tmp.join("query"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(left, ["model.pt"], "no temporary file is left");
    let loaded = read_scvi_model(&tmp.join("query")).unwrap();
    let enc = ScviEncoder::from_model(&loaded).unwrap();
    let cov = Covariates {
        batch: Some(&batch),
        ..Default::default()
    };
    let r = enc
        .latent(&ExprMatrix::Dense(DenseView::new(g, n, &x).unwrap()), &cov)
        .unwrap();
    assert_eq!(r.mean.len(), ours.mean.len());
    for (a, b) in ours.mean.iter().zip(&r.mean) {
        assert!((a - b).abs() < 2e-5, "{a} vs {b}");
    }
    // and the model trains on from the saved file with the same covariate columns
    let again = SurgeryModel::from_model(&loaded, 0, 9).unwrap();
    assert_eq!(again.layer_weights(), s.layer_weights());
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn mismatched_query_models_are_refused() {
    let reference = model("scarches");
    let s = SurgeryModel::from_model(&reference, 1, 0).unwrap();
    let info = QueryInfo {
        new_batch_levels: vec!["q_a".into(), "q_b".into()],
        n_obs: 10,
        ..Default::default()
    };
    let e = query_model_file(&reference, &s, &info).unwrap_err();
    assert_eq!(e.kind(), "input");
    // no new batch: the reference's layout, the batch categories untouched
    let s = SurgeryModel::from_model(&reference, 0, 0).unwrap();
    let q = query_model_file(
        &reference,
        &s,
        &QueryInfo {
            n_obs: 10,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(q.batch_mapping, reference.batch_mapping);
    for ((ka, ta), (kb, tb)) in q.state_dict.iter().zip(&reference.state_dict) {
        assert_eq!((ka, &ta.shape), (kb, &tb.shape));
    }
}

/// A batch-norm (default) reference: the saved query model has the layout scvi-tools' own
/// query model has (`surgery_bn/init`), the trained decoder BatchNorm weight and bias, and the
/// reference's running statistics and `num_batches_tracked` (scvi-tools trains in eval mode).
#[test]
fn batch_norm_query_model_keeps_the_trained_affine_and_the_running_stats() {
    let reference = model("default");
    let mut s = SurgeryModel::from_model(&reference, 2, 3).unwrap();
    let (g, n, x, batch) = query();
    let data = s
        .prepare(
            &crate::matrix::ExprMatrix::Dense(crate::matrix::DenseView::new(g, n, &x).unwrap()),
            &batch,
        )
        .unwrap();
    let opts = TrainOptions {
        max_epochs: Some(2),
        freeze_dropout: true,
        n_threads: 1,
        ..Default::default()
    };
    s.train(&data, &opts, &mut |_| {}, &|| false).unwrap();
    let info = QueryInfo {
        new_batch_levels: vec!["q_a".into(), "q_b".into()],
        n_obs: 300,
        ..Default::default()
    };
    let q = query_model_file(&reference, &s, &info).unwrap();
    let back = parse_scvi_model(&scvi_model_bytes(&q).unwrap()).unwrap();
    assert_eq!(state_shapes(&back), state_shapes(&model("surgery_bn/init")));
    let bn = s.batch_norm_affine();
    assert_eq!(bn.len(), 1);
    let (base, gamma, beta) = &bn[0];
    let get = |k: &str| back.tensor(k).unwrap().to_f32().unwrap();
    assert_eq!(&get(&format!("{base}.weight")), gamma);
    assert_eq!(&get(&format!("{base}.bias")), beta);
    assert_ne!(
        get(&format!("{base}.weight")),
        reference
            .tensor(&format!("{base}.weight"))
            .unwrap()
            .to_f32()
            .unwrap()
    );
    for k in ["running_mean", "running_var", "num_batches_tracked"] {
        for b in [base.as_str(), "z_encoder.encoder.fc_layers.Layer 0.1"] {
            let key = format!("{b}.{k}");
            assert_eq!(back.tensor(&key), reference.tensor(&key), "{key}");
        }
    }
    // the encoder BatchNorm is frozen
    for k in ["weight", "bias"] {
        let key = format!("z_encoder.encoder.fc_layers.Layer 0.1.{k}");
        assert_eq!(back.tensor(&key), reference.tensor(&key), "{key}");
    }
}

// ------------------------------------------------------- a query model with extra covariates

fn covs_info() -> QueryInfo {
    QueryInfo {
        new_batch_levels: vec!["q_a".into(), "q_b".into()],
        new_cat_levels: vec![vec!["w".into()]],
        n_obs: 300,
        train_indices: (0..270).collect(),
        validation_indices: (270..300).collect(),
        seed: 5,
        history: vec![("elbo_train".into(), vec![300.5, 290.25])],
    }
}

/// The `covs` reference (categorical cond x y z, continuous score, encode_covariates, two
/// layers with deeply injected covariates, batch norm) trained 3 epochs on the query with two
/// new batches and the new cond level 'w', and its query model.
fn covs_query_model() -> (ScviModelFile, SurgeryModel, QueryData, ScviModelFile) {
    let reference = model("covs");
    assert_eq!(reference.extra_categorical[0].1, ["x", "y", "z"]);
    assert_eq!(reference.extra_continuous, ["score"]);
    let mut s = SurgeryModel::from_model_covs(&reference, 2, &[1], 3).unwrap();
    let (g, n, x, batch) = query();
    let (cond, score) = covs_query();
    let data = s
        .prepare_covs(
            &ExprMatrix::Dense(DenseView::new(g, n, &x).unwrap()),
            &batch,
            &[cond],
            &[score],
        )
        .unwrap();
    let opts = TrainOptions {
        max_epochs: Some(3),
        freeze_dropout: true,
        n_threads: 1,
        ..Default::default()
    };
    s.train(&data, &opts, &mut |_| {}, &|| false).unwrap();
    let q = query_model_file(&reference, &s, &covs_info()).unwrap();
    (reference, s, data, q)
}

/// scvi-tools' own query model of the same reference and query (`surgery_covs/init`, saved
/// right after `load_query_data`): same tensors and shapes, the same registry (batch, cond
/// x y z w with n_cats_per_key [4], score, 300 cells) and setup / init parameters.
#[test]
fn covariate_query_model_has_the_layout_of_scvi_tools_query_model() {
    let (reference, s, _, q) = covs_query_model();
    let back = parse_scvi_model(&scvi_model_bytes(&q).unwrap()).unwrap();
    assert_same_model(&q, &back);
    let scvi_q = model("surgery_covs/init");
    assert_eq!(state_shapes(&back), state_shapes(&scvi_q));
    assert_eq!(
        back.tensor("l_encoder.encoder.fc_layers.Layer 0.0.weight")
            .unwrap()
            .shape,
        [16, 109]
    );
    assert_eq!(back.batch_mapping, ["b0", "b1", "q_a", "q_b"]);
    assert_eq!(back.extra_categorical, scvi_q.extra_categorical);
    assert_eq!(back.extra_categorical[0].1, ["x", "y", "z", "w"]);
    assert_eq!(back.extra_continuous, ["score"]);
    assert_eq!(back.init, scvi_q.init);
    assert_eq!(back.setup, scvi_q.setup);
    // the whole field registry is the one scvi-tools wrote for this query (mappings,
    // n_cats_per_key, field_keys, continuous columns, summary stats, n_obs); numpy arrays
    // are pickled through numpy.core (numpy 1 and 2 read it), numpy 2 writes numpy._core
    let fr = |m: &ScviModelFile| {
        m.attr_dict
            .get("registry_")
            .and_then(|r| r.get("field_registries"))
            .cloned()
            .unwrap()
    };
    let text = |v: &Value| format!("{v:?}").replace("numpy._core.", "numpy.core.");
    assert_eq!(text(&fr(&back)), text(&fr(&scvi_q)));
    assert!(fr(&back) != fr(&reference));
    let cc = fr(&back);
    let st = cc
        .get("extra_categorical_covs")
        .and_then(|c| c.get("state_registry"))
        .unwrap();
    assert_eq!(
        st.get("n_cats_per_key"),
        Some(&Value::List(vec![Value::Int(4)]))
    );
    // the trained layers: feature (and continuous) columns, then all one-hot columns
    for lw in s.layer_weights() {
        let t = back.tensor(&format!("{}.weight", lw.key)).unwrap();
        let n_cov = lw.wc.len() / lw.n_out;
        assert_eq!(t.shape, [lw.n_out, lw.n_in + n_cov], "{}", lw.key);
        let v = t.to_f32().unwrap();
        for o in 0..lw.n_out {
            let row = &v[o * (lw.n_in + n_cov)..(o + 1) * (lw.n_in + n_cov)];
            assert_eq!(&row[..lw.n_in], &lw.w[o * lw.n_in..(o + 1) * lw.n_in]);
            for c in 0..n_cov {
                assert_eq!(row[lw.n_in + c], lw.wc[c * lw.n_out + o]);
            }
        }
    }
    // one-hot widths 2 + 3 -> 4 + 4 (layer 0 of the encoder: 100 genes + score first)
    let r0 = reference
        .tensor("z_encoder.encoder.fc_layers.Layer 0.0.weight")
        .unwrap();
    assert_eq!(r0.shape, [16, 106]);
    // l_encoder: the reference's 106 columns kept, 3 new ones in torch's init range
    let key = "l_encoder.encoder.fc_layers.Layer 0.0.weight";
    let (rl, tl) = (
        reference.tensor(key).unwrap().to_f32().unwrap(),
        back.tensor(key).unwrap().to_f32().unwrap(),
    );
    let bound = 1.0 / (109f32).sqrt();
    for o in 0..16 {
        assert_eq!(rl[o * 106..(o + 1) * 106], tl[o * 109..o * 109 + 106]);
        assert!(tl[o * 109 + 106..(o + 1) * 109]
            .iter()
            .all(|v| v.abs() <= bound && *v != 0.0));
    }
    // frozen tensors are the reference's
    for (k, t) in &back.state_dict {
        let frozen = !(k.starts_with("z_encoder.encoder.fc_layers")
            || k.starts_with("decoder.px_decoder.fc_layers")
            || k.starts_with("l_encoder.encoder.fc_layers.Layer 0.0.weight"));
        if frozen {
            assert_eq!(reference.tensor(k), Some(t), "{k}");
        }
    }
}

/// write -> read back: the saved covariate query model gives the trained model's latent
/// (scannot's encoder with batch, cond and score), and trains on with the same columns.
#[test]
fn saved_covariate_query_model_gives_the_trained_latent() {
    let (_, s, data, q) = covs_query_model();
    let ours = s.latent(&data, 1).unwrap();
    let tmp = std::env::temp_dir().join(format!("scannot-write-covs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    write_scvi_model(&q, &tmp).unwrap();
    let loaded = read_scvi_model(&tmp).unwrap();
    std::fs::remove_dir_all(&tmp).unwrap();
    assert_eq!(loaded.extra_categorical[0].1, ["x", "y", "z", "w"]);
    let (cond, _) = covs_query();
    let r = covs_encoder_latent(&loaded, &cond);
    assert_eq!(r.mean.len(), ours.mean.len());
    let mut max = 0.0f64;
    for (a, b) in ours.mean.iter().zip(&r.mean) {
        max = max.max((a - b).abs());
    }
    assert!(max < 2e-5, "max |latent difference| {max}");
    // the new level's columns matter: reading cells of 'w' as 'z' moves their latent
    let as_z: Vec<u32> = cond.iter().map(|&c| c.min(2)).collect();
    let rz = covs_encoder_latent(&loaded, &as_z);
    let moved = (0..cond.len())
        .filter(|&j| cond[j] == 3)
        .any(|j| (rz.mean[j] - r.mean[j]).abs() > 1e-4);
    assert!(moved);
    // the saved model is a reference again: no new levels, the same trained columns
    let again = SurgeryModel::from_model_covs(&loaded, 0, &[0], 9).unwrap();
    assert_eq!(again.layer_weights(), s.layer_weights());
    assert_eq!(again.cat_levels(), [4]);
}

#[test]
fn mismatched_covariate_query_models_are_refused() {
    let reference = model("covs");
    let s = SurgeryModel::from_model_covs(&reference, 2, &[1], 0).unwrap();
    let bad = |info: QueryInfo| query_model_file(&reference, &s, &info).unwrap_err();
    // the model has 4 cond levels: no new level given, or two
    for new in [vec![], vec![vec![]], vec![vec!["w".into(), "v".into()]]] {
        let e = bad(QueryInfo {
            new_cat_levels: new,
            ..covs_info()
        });
        assert_eq!(e.kind(), "input", "{e}");
    }
    // a new level that is already one
    let e = bad(QueryInfo {
        new_cat_levels: vec![vec!["z".into()]],
        ..covs_info()
    });
    assert!(e.to_string().contains("'z'"), "{e}");
    let e = bad(QueryInfo {
        new_batch_levels: vec!["q_a".into(), "b1".into()],
        ..covs_info()
    });
    assert!(e.to_string().contains("'b1'"), "{e}");
    // covariates given for a model without them
    let plain = model("scarches");
    let sp = SurgeryModel::from_model(&plain, 2, 0).unwrap();
    let e = query_model_file(&plain, &sp, &covs_info()).unwrap_err();
    assert_eq!(e.kind(), "input");
    // no new level at all: the reference's registry for cond
    let s0 = SurgeryModel::from_model_covs(&reference, 2, &[0], 0).unwrap();
    let q = query_model_file(
        &reference,
        &s0,
        &QueryInfo {
            new_cat_levels: vec![],
            ..covs_info()
        },
    )
    .unwrap();
    assert_eq!(q.extra_categorical, reference.extra_categorical);
    assert_eq!(
        q.tensor("z_encoder.encoder.fc_layers.Layer 0.0.weight")
            .unwrap()
            .shape,
        [16, 108]
    );
}

/// The query models scannot saved (fixtures r_query, r_query_bn, r_query_covs, written by
/// write_r_query_model.R): scvi-tools 1.4.2 loads each and computes, in eval mode at
/// z = qz.loc, every cell's reconstruction loss and KL (check_r_query_model.py ->
/// forward_py.csv). scannot's forward of the same file agrees, so the decoder's batch,
/// categorical and continuous columns are where scvi-tools reads them, not only the
/// encoder's (which the latent checks).
#[test]
fn scvi_tools_forward_of_saved_query_models_is_scannots() {
    let (g, n, x, batch) = query();
    let (cond, score) = covs_query();
    for sub in ["r_query", "r_query_bn", "r_query_covs"] {
        let m = model(sub);
        let covs = !m.extra_categorical.is_empty();
        assert_eq!(covs, sub == "r_query_covs");
        let new_cats = vec![0; m.extra_categorical.len()];
        let s = SurgeryModel::from_model_covs(&m, 0, &new_cats, 0).unwrap();
        let view = ExprMatrix::Dense(DenseView::new(g, n, &x).unwrap());
        let data = if covs {
            s.prepare_covs(
                &view,
                &batch,
                std::slice::from_ref(&cond),
                std::slice::from_ref(&score),
            )
        } else {
            s.prepare(&view, &batch)
        }
        .unwrap();
        let (rec, kl) = s.loss_at_mean(&data, 1).unwrap();
        let text = std::fs::read_to_string(dir().join(sub).join("forward_py.csv")).unwrap();
        let mut lines = text.lines();
        assert_eq!(lines.next(), Some("cell,reconstruction,kl"));
        let rows: Vec<Vec<f64>> = lines
            .filter(|l| !l.is_empty())
            .map(|l| l.split(',').skip(1).map(|v| v.parse().unwrap()).collect())
            .collect();
        assert_eq!(rows.len(), n, "{sub}");
        for (j, r) in rows.iter().enumerate() {
            assert!(
                (rec[j] - r[0]).abs() < 2e-5 * r[0].abs(),
                "{sub} cell {j}: rec {} vs {}",
                rec[j],
                r[0]
            );
            assert!(
                (kl[j] - r[1]).abs() < 1e-4 * r[1].abs().max(1.0),
                "{sub} cell {j}: kl {} vs {}",
                kl[j],
                r[1]
            );
        }
    }
}
