//! Time the scVI encoder latent on the data folder kept by bench/scvi.R
//! (`SCANNOT_BENCH_KEEP=<dir> Rscript bench/scvi.R`): for profiling without R.
//!   cargo run --release -p scannot-core --example scvi_latent_speed -- <dir> [threads] [reps]
//! Prints the best wall time, the best CPU time of a repetition (all threads) and the max |difference| to scvi-tools'
//! latent (`<dir>/latent.bin`).
use scannot_core::matrix::{CscView, ExprMatrix};
use scannot_core::scvi::{read_scvi_model, Covariates, ScviEncoder};
use scannot_core::threads::with_threads;
use std::time::Instant;

fn read_bin<T: Copy>(path: &std::path::Path) -> Vec<T> {
    let b = std::fs::read(path).unwrap();
    let n = b.len() / std::mem::size_of::<T>();
    let mut v = Vec::with_capacity(n);
    // SAFETY: plain little-endian numbers written by R's writeBin
    unsafe {
        std::ptr::copy_nonoverlapping(b.as_ptr(), v.as_mut_ptr() as *mut u8, b.len());
        v.set_len(n);
    }
    v
}

/// CPU time of the whole process (all threads), in seconds.
fn cpu_seconds() -> f64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: plain syscall writing into `t`
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut t) };
    t.tv_sec as f64 + t.tv_nsec as f64 * 1e-9
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let d = std::path::PathBuf::from(&a[1]);
    let threads: usize = a.get(2).map_or(2, |s| s.parse().unwrap());
    let reps: usize = a.get(3).map_or(10, |s| s.parse().unwrap());
    let m = read_scvi_model(&d.join("model")).unwrap();
    let enc = ScviEncoder::from_model(&m).unwrap();
    let x: Vec<f64> = read_bin(&d.join("query_x.bin"));
    let i: Vec<i32> = read_bin(&d.join("query_i.bin"));
    let p: Vec<i32> = read_bin(&d.join("query_p.bin"));
    let codes: Vec<u32> = std::fs::read_to_string(d.join("query_codes.txt"))
        .unwrap()
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect();
    let ng = enc.n_genes();
    let nq = p.len() - 1;
    let view = CscView::new(ng, nq, &p, &i, &x).unwrap();
    let counts = ExprMatrix::Csc(view);
    let cov = Covariates {
        batch: if enc.uses_covariates() {
            Some(&codes)
        } else {
            None
        },
        ..Default::default()
    };
    let (mut best, mut best_cpu) = (f64::INFINITY, f64::INFINITY);
    let mut out = None;
    for _ in 0..reps {
        let (t0, c0) = (Instant::now(), cpu_seconds());
        let o = with_threads(threads, || enc.latent_blocked(&counts, &cov, 128))
            .unwrap()
            .unwrap();
        best = best.min(t0.elapsed().as_secs_f64());
        best_cpu = best_cpu.min(cpu_seconds() - c0);
        out = Some(o);
    }
    let o = out.unwrap();
    let gold: Vec<f64> = read_bin(&d.join("latent.bin"));
    let diff = o
        .mean
        .iter()
        .zip(&gold)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f64, f64::max);
    println!(
        "{nq} cells x {ng} genes, {threads} threads: best {best:.4} s, cpu {best_cpu:.4} s (best rep), \
         max |diff| to scvi-tools {diff:.2e}"
    );
}
