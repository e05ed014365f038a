//! Tests against models trained and saved by scvi-tools 1.4.2 (torch 2.15) with
//! `tools/fixtures/scvi/make_scvi_fixture.py`, and the latent representations it recorded.

use super::*;
use crate::error::ScError;
use crate::matrix::{CscOwned, DenseView, ExprMatrix};
use crate::pickle::Value;
use std::path::PathBuf;

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../tests/testthat/fixtures/scvi")
}

/// A CSV with a header and a first column of row names: (column names, row names, values by row).
fn read_csv(name: &str) -> (Vec<String>, Vec<String>, Vec<Vec<String>>) {
    let p = fixture_dir().join(name);
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let mut lines = text.lines();
    let header: Vec<String> = lines.next().unwrap().split(',').map(String::from).collect();
    let mut rows = Vec::new();
    let mut vals = Vec::new();
    for l in lines.filter(|l| !l.is_empty()) {
        let mut f = l.split(',').map(String::from);
        rows.push(f.next().unwrap());
        vals.push(f.collect());
    }
    (header[1..].to_vec(), rows, vals)
}

struct Data {
    genes: Vec<String>,
    /// genes x cells, column-major
    dense: Vec<f64>,
    n_cells: usize,
    batch: Vec<u32>,
    cond: Vec<u32>,
    score: Vec<f64>,
}

fn data() -> Data {
    let (genes, cells, vals) = read_csv("counts.csv");
    let n_cells = cells.len();
    let mut dense = vec![0.0; genes.len() * n_cells];
    for (j, row) in vals.iter().enumerate() {
        for (g, v) in row.iter().enumerate() {
            dense[j * genes.len() + g] = v.parse().unwrap();
        }
    }
    let (cols, obs_cells, obs) = read_csv("obs.csv");
    assert_eq!(cols, ["batch", "cond", "score"]);
    assert_eq!(obs_cells, cells);
    let code = |v: &str, levels: &[&str]| levels.iter().position(|l| *l == v).unwrap() as u32;
    Data {
        genes,
        dense,
        n_cells,
        batch: obs.iter().map(|r| code(&r[0], &["b0", "b1"])).collect(),
        cond: obs.iter().map(|r| code(&r[1], &["x", "y", "z"])).collect(),
        score: obs.iter().map(|r| r[2].parse().unwrap()).collect(),
    }
}

/// cells x latent, column-major
fn golden(model: &str, file: &str) -> (usize, Vec<f64>) {
    let (cols, cells, vals) = read_csv(&format!("{model}/{file}"));
    let n = cells.len();
    let mut out = vec![0.0; n * cols.len()];
    for (j, row) in vals.iter().enumerate() {
        for (l, v) in row.iter().enumerate() {
            out[l * n + j] = v.parse().unwrap();
        }
    }
    (cols.len(), out)
}

fn model(name: &str) -> ScviModelFile {
    read_scvi_model(&fixture_dir().join(name)).unwrap()
}

#[test]
fn reads_the_default_model() {
    let m = model("default");
    assert_eq!(m.var_names.len(), 100);
    assert_eq!(m.var_names[0], "g000");
    assert_eq!(m.var_names[99], "g099");
    assert_eq!(m.scvi_version.as_deref(), Some("1.4.2"));
    assert_eq!(m.model_name.as_deref(), Some("SCVI"));
    assert_eq!(m.batch_mapping, ["b0", "b1"]);
    assert_eq!(m.n_batch, 2);
    assert_eq!(m.labels_mapping, ["0"]);
    assert_eq!(m.setup.batch_key.as_deref(), Some("batch"));
    assert_eq!(m.setup.labels_key, None);
    assert!(m.extra_categorical.is_empty() && m.extra_continuous.is_empty());
    let p = &m.init;
    assert_eq!((p.n_hidden, p.n_latent, p.n_layers), (16, 4, 1));
    assert_eq!(p.dropout_rate, 0.1);
    assert_eq!(p.gene_likelihood, "zinb");
    assert_eq!(p.dispersion, "gene");
    assert_eq!(p.use_batch_norm, "both");
    assert_eq!(p.use_layer_norm, "none");
    assert!(!p.encode_covariates && p.deeply_inject_covariates && p.use_observed_lib_size);
    // state dict: spaces in keys, BN buffers, int64 counters, l_encoder and px_r_decoder present
    let w = m
        .tensor("z_encoder.encoder.fc_layers.Layer 0.0.weight")
        .unwrap();
    assert_eq!(w.shape, [16, 100]);
    assert_eq!(w.dtype_name(), "float32");
    let nbt = m
        .tensor("z_encoder.encoder.fc_layers.Layer 0.1.num_batches_tracked")
        .unwrap();
    assert_eq!(nbt.shape, Vec::<usize>::new());
    assert!(matches!(&nbt.data, TensorData::I64(v) if v.len() == 1 && v[0] > 0));
    assert_eq!(m.tensor("px_r").unwrap().shape, [100]);
    assert_eq!(
        m.tensor("decoder.px_decoder.fc_layers.Layer 0.0.weight")
            .unwrap()
            .shape,
        [16, 4 + 2]
    );
    assert!(m.tensor("l_encoder.mean_encoder.weight").is_some());
    assert!(m.tensor("decoder.px_r_decoder.weight").is_some());
    assert_eq!(m.state_dict[0].0, "px_r");
    // pyro_param_store (scvi-tools >= 1.3) is kept aside, not an error
    assert_eq!(m.extra_state.len(), 1);
    assert_eq!(m.extra_state[0].0, "pyro_param_store");
    // history_ holds pandas DataFrames: opaque objects
    let h = m.attr_dict.get("history_").unwrap();
    assert!(h.as_dict().unwrap().iter().any(|(_, v)| v
        .as_object()
        .and_then(|o| o.callable_name())
        .is_some_and(|(m, _)| m.starts_with("pandas"))));
}

#[test]
fn reads_the_covariate_and_scarches_models() {
    let m = model("covs");
    assert!(m.init.encode_covariates);
    assert_eq!(m.init.n_layers, 2);
    assert_eq!(
        m.init.kwargs,
        vec![("encode_covariates".to_string(), Value::Bool(true))]
    );
    assert_eq!(m.setup.categorical_covariate_keys, ["cond"]);
    assert_eq!(m.setup.continuous_covariate_keys, ["score"]);
    assert_eq!(
        m.extra_categorical,
        vec![(
            "cond".to_string(),
            vec!["x".to_string(), "y".into(), "z".into()]
        )]
    );
    assert_eq!(m.extra_continuous, ["score"]);
    // genes + continuous + batch one-hot + cond one-hot
    assert_eq!(
        m.tensor("z_encoder.encoder.fc_layers.Layer 0.0.weight")
            .unwrap()
            .shape,
        [16, 100 + 1 + 2 + 3]
    );
    assert_eq!(
        m.tensor("z_encoder.encoder.fc_layers.Layer 1.0.weight")
            .unwrap()
            .shape,
        [16, 16 + 2 + 3]
    );

    let s = model("scarches");
    assert_eq!(s.init.use_layer_norm, "both");
    assert_eq!(s.init.use_batch_norm, "none");
    assert_eq!(s.init.dropout_rate, 0.2);
    assert!(s.init.encode_covariates);
    assert!(s
        .tensor("z_encoder.encoder.fc_layers.Layer 0.1.weight")
        .is_none());
}

fn check_latent(name: &str, tol: f64) {
    let d = data();
    let m = model(name);
    assert_eq!(m.var_names, d.genes);
    let enc = ScviEncoder::from_model(&m).unwrap();
    let cov = Covariates {
        batch: Some(&d.batch),
        categorical: vec![&d.cond],
        continuous: vec![&d.score],
    };
    let (nl, want_mean) = golden(name, "latent.csv");
    let (_, want_var) = golden(name, "latent_var.csv");
    assert_eq!(enc.n_latent(), nl);

    let dense = DenseView::new(d.genes.len(), d.n_cells, &d.dense).unwrap();
    let csc = CscOwned::from_dense(d.genes.len(), d.n_cells, &d.dense);
    for (what, x) in [
        ("dense", ExprMatrix::Dense(dense)),
        ("sparse", ExprMatrix::Csc(csc.view())),
    ] {
        let mut all = vec![enc.latent(&x, &cov).unwrap()];
        // the portable and AVX2 kernels too, where the CPU has better ones
        all.extend(enc.latent_every_kernel(&x, &cov));
        for got in all {
            assert_eq!((got.n_cells, got.n_latent), (d.n_cells, nl));
            let max_diff = got
                .mean
                .iter()
                .zip(&want_mean)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
            assert!(
                max_diff <= tol,
                "{name} {what}: latent mean differs from scvi-tools by {max_diff:e}"
            );
            let max_rel = got
                .var
                .iter()
                .zip(&want_var)
                .map(|(a, b)| ((a - b) / b).abs())
                .fold(0.0, f64::max);
            assert!(
                max_rel <= 1e-5,
                "{name} {what}: latent variance differs from scvi-tools by {max_rel:e} (relative)"
            );
        }
    }
}

#[test]
fn latent_matches_scvi_tools_default() {
    check_latent("default", 1e-6);
}

#[test]
fn latent_matches_scvi_tools_scarches_settings() {
    check_latent("scarches", 1e-6);
}

#[test]
fn latent_matches_scvi_tools_with_covariates() {
    check_latent("covs", 1e-6);
}

#[test]
fn default_latent_ignores_batch_and_covariates_are_checked() {
    let d = data();
    let dense = DenseView::new(d.genes.len(), d.n_cells, &d.dense).unwrap();
    let x = ExprMatrix::Dense(dense);
    let enc = ScviEncoder::from_model(&model("default")).unwrap();
    assert!(!enc.uses_covariates());
    let a = enc.latent(&x, &Covariates::default()).unwrap();
    let flipped: Vec<u32> = d.batch.iter().map(|b| 1 - b).collect();
    let b = enc
        .latent(
            &x,
            &Covariates {
                batch: Some(&flipped),
                ..Covariates::default()
            },
        )
        .unwrap();
    assert_eq!(a, b);

    let enc = ScviEncoder::from_model(&model("scarches")).unwrap();
    assert!(enc.uses_covariates());
    let e = enc.latent(&x, &Covariates::default()).unwrap_err();
    assert!(e.to_string().contains("batch"), "{e}");
    let bad = vec![2u32; d.n_cells];
    let e = enc
        .latent(
            &x,
            &Covariates {
                batch: Some(&bad),
                ..Covariates::default()
            },
        )
        .unwrap_err();
    assert!(e.to_string().contains("outside"), "{e}");
    let few = DenseView::new(10, 1, &[0.0; 10]).unwrap();
    let e = enc
        .latent(&ExprMatrix::Dense(few), &Covariates::default())
        .unwrap_err();
    assert_eq!(e.kind(), "dims");
}

fn model_bytes(name: &str) -> Vec<u8> {
    std::fs::read(fixture_dir().join(name).join("model.pt")).unwrap()
}

#[test]
fn archive_prefix_is_not_hard_coded() {
    // rename the members model/... -> archive/... by rewriting the zip with the zip crate
    let bytes = model_bytes("default");
    let mut src = zip::ZipArchive::new(std::io::Cursor::new(&bytes)).unwrap();
    let mut out = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for i in 0..src.len() {
        let mut f = src.by_index(i).unwrap();
        let name = f.name().replacen("model/", "archive/", 1);
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut f, &mut buf).unwrap();
        out.start_file(name, opts).unwrap();
        std::io::Write::write_all(&mut out, &buf).unwrap();
    }
    let renamed = out.finish().unwrap().into_inner();
    let m = parse_scvi_model(&renamed).unwrap();
    assert_eq!(m.var_names.len(), 100);
    assert_eq!(m.state_dict.len(), model("default").state_dict.len());
}

#[test]
fn corrupt_files_are_format_errors() {
    let bytes = model_bytes("default");
    // not a zip
    let e = parse_scvi_model(b"hello").unwrap_err();
    assert_eq!(e.kind(), "format");
    // truncations: a zip without its central directory, or a torn member
    for n in [0, 10, bytes.len() / 3, bytes.len() / 2, bytes.len() - 30] {
        match parse_scvi_model(&bytes[..n]) {
            Err(ScError::Format(_)) => {}
            other => panic!("truncated to {n}: {other:?}"),
        }
    }
    // byte flips anywhere: never a panic (CRC checks turn most into errors)
    let mut state = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..300 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let mut c = bytes.clone();
        let i = (state as usize) % c.len();
        c[i] ^= (state >> 32) as u8 | 1;
        let _ = parse_scvi_model(&c);
    }
}

#[test]
fn missing_folder_and_foreign_archives_are_explained() {
    let e = read_scvi_model(&fixture_dir().join("no-such-model")).unwrap_err();
    assert!(e.to_string().contains("no-such-model"), "{e}");
    // a zip that is not a torch archive
    let mut out = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    out.start_file(
        "readme.txt",
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored),
    )
    .unwrap();
    std::io::Write::write_all(&mut out, b"hi").unwrap();
    let z = out.finish().unwrap().into_inner();
    let e = parse_scvi_model(&z).unwrap_err();
    assert!(e.to_string().contains("data.pkl"), "{e}");
}
