//! Seed-scale Wilcoxon benchmark: 28,911 cells x 15,674 genes, 8 cell types, log-normalised
//! simulated counts; one-vs-rest markers on 2 threads and on 1 thread.
//!
//! `cargo run --release --example wilcox_bench [n_cells n_genes]`
//!
//! Environment (all optional):
//! * `WILCOX_BENCH_CACHE=<file>`: keep the normalised matrix there (written on the first
//!   run, read afterwards), so repeated runs (profilers) skip the minute of simulation;
//! * `WILCOX_BENCH_CASES=0,3`: run only these cases (0 scanpy rest, 1 tie_correct,
//!   2 vs group 0, 3 presto);
//! * `WILCOX_BENCH_THREADS=2,1`: thread counts; `WILCOX_BENCH_REPS=3`: best of how many;
//! * `WILCOX_BENCH_NO_REF=1`: skip the reference workload;
//! * `WILCOX_BENCH_FLOOR=1`: also time the memory floor, one sequential pass over the
//!   stored values and row indices (summed) on each thread count, best of the reps: no
//!   method that reads every non-zero runs faster than this.

use scannot_core::matrix::{CscView, ExprMatrix};
use scannot_core::normalize::log_normalize_csc;
use scannot_core::simulate::{simulate, SimParams};
use scannot_core::threads::with_threads;
use scannot_core::wilcoxon::{wilcoxon, Flavor, Reference, WilcoxonOptions};
use std::io::{Read, Write};
use std::time::Instant;

fn env_list(name: &str, default: &[usize]) -> Vec<usize> {
    std::env::var(name)
        .ok()
        .map(|v| v.split(',').filter_map(|t| t.trim().parse().ok()).collect())
        .unwrap_or_else(|| default.to_vec())
}

fn write_u32s(f: &mut std::fs::File, v: impl Iterator<Item = u32>) {
    let b: Vec<u8> = v.flat_map(|x| x.to_le_bytes()).collect();
    f.write_all(&(b.len() as u64).to_le_bytes()).expect("write");
    f.write_all(&b).expect("write");
}

fn read_block(f: &mut std::fs::File) -> Vec<u8> {
    let mut n = [0u8; 8];
    f.read_exact(&mut n).expect("read");
    let mut b = vec![0u8; u64::from_le_bytes(n) as usize];
    f.read_exact(&mut b).expect("read");
    b
}

/// (nrow, ncol, p, i, x, groups): simulated + log-normalised, or read from the cache.
type Data = (usize, usize, Vec<i32>, Vec<i32>, Vec<f64>, Vec<i32>);

fn make_data(n_cells: usize, n_genes: usize) -> Data {
    let cache = std::env::var("WILCOX_BENCH_CACHE").ok();
    if let Some(path) = &cache {
        if let Ok(mut f) = std::fs::File::open(path) {
            let dims = read_block(&mut f);
            let d: Vec<usize> = dims
                .chunks(4)
                .map(|c| u32::from_le_bytes(c.try_into().unwrap()) as usize)
                .collect();
            if d == [n_genes, n_cells] {
                let i32s = |b: Vec<u8>| -> Vec<i32> {
                    b.chunks(4)
                        .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
                        .collect()
                };
                let p = i32s(read_block(&mut f));
                let i = i32s(read_block(&mut f));
                let x: Vec<f64> = read_block(&mut f)
                    .chunks(8)
                    .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                    .collect();
                let g = i32s(read_block(&mut f));
                return (n_genes, n_cells, p, i, x, g);
            }
        }
    }
    let p = SimParams {
        n_cells,
        n_genes,
        n_types: 8,
        ..Default::default()
    };
    let sim = simulate(&p).expect("simulate");
    let view = sim.counts.view();
    let x = log_normalize_csc(&view, 1e4).expect("normalise");
    let groups: Vec<i32> = sim.cell_type.iter().map(|&t| t as i32).collect();
    let d = (
        view.nrow(),
        view.ncol(),
        view.p().to_vec(),
        view.i().to_vec(),
        x,
        groups,
    );
    if let Some(path) = &cache {
        let mut f = std::fs::File::create(path).expect("cache file");
        write_u32s(&mut f, [d.0 as u32, d.1 as u32].into_iter());
        write_u32s(&mut f, d.2.iter().map(|&v| v as u32));
        write_u32s(&mut f, d.3.iter().map(|&v| v as u32));
        let b: Vec<u8> = d.4.iter().flat_map(|v| v.to_le_bytes()).collect();
        f.write_all(&(b.len() as u64).to_le_bytes()).expect("write");
        f.write_all(&b).expect("write");
        write_u32s(&mut f, d.5.iter().map(|&v| v as u32));
    }
    d
}

/// A field of /proc/self/status in MB (Linux only).
fn status_mb(field: &str) -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with(field))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// CPU seconds (user + system) of the whole process so far, from /proc/self/stat.
fn cpu_s() -> f64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let rest = s.rsplit(')').next().unwrap_or("");
    let f: Vec<f64> = rest
        .split_whitespace()
        .map(|t| t.parse().unwrap_or(0.0))
        .collect();
    // fields 14, 15 (utime, stime) are at 11, 12 after the command name
    (f.get(11).unwrap_or(&0.0) + f.get(12).unwrap_or(&0.0)) / 100.0
}

/// A 64-bit FNV-1a digest of every field of a result, bit for bit (old vs new builds
/// compare it to check that a change keeps every statistic identical).
fn digest(r: &scannot_core::wilcoxon::WilcoxonResult) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |w: u64| {
        for b in w.to_le_bytes() {
            h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
    };
    eat(r.n_genes as u64);
    r.tested
        .iter()
        .chain(&r.group)
        .chain(&r.gene)
        .for_each(|&v| eat(v as u64));
    r.n_in.iter().chain(&r.n_out).for_each(|&v| eat(v));
    for v in r.stat_columns() {
        v.iter().for_each(|x| eat(x.to_bits()));
    }
    h
}

fn em_x<'a>(m: &'a ExprMatrix) -> &'a [f64] {
    match m {
        ExprMatrix::Csc(c) => c.x(),
        ExprMatrix::Dense(_) => &[],
    }
}

fn em_i<'a>(m: &'a ExprMatrix) -> &'a [i32] {
    match m {
        ExprMatrix::Csc(c) => c.i(),
        ExprMatrix::Dense(_) => &[],
    }
}

/// Reset the peak RSS (Linux >= 4.0), so VmHWM afterwards is the peak of what follows.
fn reset_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let n_cells = a.get(1).and_then(|s| s.parse().ok()).unwrap_or(28911);
    let n_genes = a.get(2).and_then(|s| s.parse().ok()).unwrap_or(15674);
    let t = Instant::now();
    let (nrow, ncol, pp, ii, x, groups) = make_data(n_cells, n_genes);
    let m = CscView::new(nrow, ncol, &pp, &ii, &x).expect("view");
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
    let no_ref = std::env::var("WILCOX_BENCH_NO_REF").is_ok();
    let mut keys: Vec<u64> = (0..m.nnz() as u64)
        .map(|k| k.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(17))
        .collect();
    let t = Instant::now();
    let piece = (m.nnz() / n_genes.max(1)).max(1);
    if no_ref {
        keys.clear();
    }
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
    let which = env_list("WILCOX_BENCH_CASES", &[0, 1, 2, 3]);
    let reps = env_list("WILCOX_BENCH_REPS", &[3])[0].max(1);
    for threads in env_list("WILCOX_BENCH_THREADS", &[2, 1]) {
        if std::env::var_os("WILCOX_BENCH_FLOOR").is_some() {
            let f = read_floor(em_x(&em), em_i(&em), threads, reps);
            println!("{threads} thread(s)  read floor (one pass over x and i) {f:>7.3} s");
        }
        for (ci, &(name, flavor, reference, tie_correct)) in cases.iter().enumerate() {
            if !which.contains(&ci) {
                continue;
            }
            let opt = WilcoxonOptions {
                flavor,
                reference,
                tie_correct,
                log_base: None,
            };
            // best of 3; extra memory = peak RSS during the call - RSS before it
            let mut best = f64::INFINITY;
            let mut best_cpu = f64::INFINITY;
            let mut rows = 0;
            let mut dig = 0;
            let mut extra = f64::NAN;
            for _ in 0..reps {
                let before = status_mb("VmRSS:").unwrap_or(f64::NAN);
                let reset = reset_peak();
                let t = Instant::now();
                let c0 = cpu_s();
                let r = with_threads(threads, || wilcoxon(&em, &groups, 8, None, &opt))
                    .expect("threads")
                    .expect("wilcoxon");
                best = best.min(t.elapsed().as_secs_f64());
                best_cpu = best_cpu.min(cpu_s() - c0);
                rows = r.score.len();
                dig = digest(&r);
                if reset {
                    extra = extra.max(status_mb("VmHWM:").unwrap_or(f64::NAN) - before);
                }
            }
            println!(
                "{threads} thread(s)  {name:<26} {best:>7.3} s  (CPU {best_cpu:.2} s; {rows} rows, peak extra memory {extra:.0} MB; digest {dig:016x})"
            );
        }
    }
    println!("input dgCMatrix {input_mb:.0} MB");
}

/// One sequential pass over `x` and `i` (sums), cut into 8 pieces run in parallel: the
/// time any method needs just to read every stored value once.
fn read_floor(x: &[f64], i: &[i32], threads: usize, reps: usize) -> f64 {
    use rayon::prelude::*;
    let mut best = f64::INFINITY;
    for _ in 0..reps {
        let t = Instant::now();
        let s: f64 = with_threads(threads, || {
            (0..8usize)
                .into_par_iter()
                .map(|k| {
                    let (a, b) = (k * x.len() / 8, (k + 1) * x.len() / 8);
                    let sx: f64 = x[a..b].iter().sum();
                    let si: i64 = i[a..b].iter().map(|&r| r as i64).sum();
                    sx + si as f64
                })
                .sum()
        })
        .expect("threads");
        std::hint::black_box(s);
        best = best.min(t.elapsed().as_secs_f64());
    }
    best
}
