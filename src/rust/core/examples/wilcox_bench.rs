//! Seed-scale Wilcoxon benchmark: 28,911 cells x 15,674 genes, 8 cell types, log-normalised
//! simulated counts; one-vs-rest markers on 2 threads and on 1 thread.
//!
//! `cargo run --release --example wilcox_bench [n_cells n_genes]`

use scannot_core::matrix::{CscView, ExprMatrix};
use scannot_core::normalize::log_normalize_csc;
use scannot_core::simulate::{simulate, SimParams};
use scannot_core::threads::with_threads;
use scannot_core::wilcoxon::{wilcoxon, Flavor, Reference, WilcoxonOptions};
use std::time::Instant;

/// A field of /proc/self/status in MB (Linux only).
fn status_mb(field: &str) -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with(field))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Reset the peak RSS (Linux >= 4.0), so VmHWM afterwards is the peak of what follows.
fn reset_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let n_cells = a.get(1).and_then(|s| s.parse().ok()).unwrap_or(28911);
    let n_genes = a.get(2).and_then(|s| s.parse().ok()).unwrap_or(15674);
    let p = SimParams {
        n_cells,
        n_genes,
        n_types: 8,
        ..Default::default()
    };
    let t = Instant::now();
    let sim = simulate(&p).expect("simulate");
    let view = sim.counts.view();
    let x = log_normalize_csc(&view, 1e4).expect("normalise");
    let m = CscView::new(view.nrow(), view.ncol(), view.p(), view.i(), &x).expect("view");
    let groups: Vec<i32> = sim.cell_type.iter().map(|&t| t as i32).collect();
    let input_mb = (m.p().len() * 4 + m.nnz() * 12) as f64 / 1048576.0;
    println!(
        "data: {} cells x {} genes, {} non-zeros ({:.1}% dense), dgCMatrix {:.0} MB, made in {:.1?}",
        n_cells,
        n_genes,
        m.nnz(),
        100.0 * m.nnz() as f64 / (n_cells as f64 * n_genes as f64),
        input_mb,
        t.elapsed()
    );
    let em = ExprMatrix::Csc(m);

    // a fixed reference workload, to compare timings taken on a busy shared machine: as
    // many pseudo-random u64 as non-zeros, sorted in gene-sized pieces by the standard
    // library (a comparison sort per gene is what a naive implementation would do)
    let mut keys: Vec<u64> = (0..m.nnz() as u64)
        .map(|k| k.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(17))
        .collect();
    let t = Instant::now();
    let piece = (m.nnz() / n_genes.max(1)).max(1);
    for c in keys.chunks_mut(piece) {
        c.sort_unstable();
    }
    println!(
        "reference workload (1 thread, sort_unstable of {} random u64 in pieces of {piece}): {:.3} s",
        keys.len(),
        t.elapsed().as_secs_f64()
    );
    drop(keys);

    let cases = [
        ("scanpy rest", Flavor::Scanpy, Reference::Rest, false),
        (
            "scanpy rest, tie_correct",
            Flavor::Scanpy,
            Reference::Rest,
            true,
        ),
        (
            "scanpy vs group 0",
            Flavor::Scanpy,
            Reference::Group(0),
            true,
        ),
        ("presto", Flavor::Presto, Reference::Rest, true),
    ];
    for threads in [2usize, 1] {
        for (name, flavor, reference, tie_correct) in cases {
            let opt = WilcoxonOptions {
                flavor,
                reference,
                tie_correct,
                log_base: None,
            };
            // best of 3; extra memory = peak RSS during the call - RSS before it
            let mut best = f64::INFINITY;
            let mut rows = 0;
            let mut extra = f64::NAN;
            for _ in 0..3 {
                let before = status_mb("VmRSS:").unwrap_or(f64::NAN);
                let reset = reset_peak();
                let t = Instant::now();
                let r = with_threads(threads, || wilcoxon(&em, &groups, 8, None, &opt))
                    .expect("threads")
                    .expect("wilcoxon");
                best = best.min(t.elapsed().as_secs_f64());
                rows = r.score.len();
                if reset {
                    extra = extra.max(status_mb("VmHWM:").unwrap_or(f64::NAN) - before);
                }
            }
            println!(
                "{threads} thread(s)  {name:<26} {best:>7.3} s  ({rows} rows, peak extra memory {extra:.0} MB)"
            );
        }
    }
    println!("input dgCMatrix {input_mb:.0} MB");
}
