//! Time scArches surgery epochs on the data folder written by bench/scvi_surgery.R (after its
//! peer has saved the reference to <dir>/ref): for profiling without R.
//!   cargo run --release -p scannot-core --example scvi_surgery_speed -- <dir> [threads] [epochs]
use scannot_core::matrix::{CscView, ExprMatrix};
use scannot_core::scvi::{read_scvi_model, SurgeryModel, TrainOptions};
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

/// CPU time of this process (user + system, all threads) in seconds, from /proc/self/stat
/// (0 where unavailable): robust to the load of other processes, unlike wall time.
fn cpu_seconds() -> f64 {
    let Ok(s) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // the fields after the command name (which is in parentheses)
    let rest = s.rsplit_once(')').map_or("", |r| r.1);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 (1-based), i.e. 11 and 12 after the name
    (ticks(11) + ticks(12)) / 100.0
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let d = std::path::PathBuf::from(&a[1]);
    let threads: usize = a.get(2).map_or(2, |s| s.parse().unwrap());
    let epochs: usize = a.get(3).map_or(3, |s| s.parse().unwrap());
    let m = read_scvi_model(&d.join("ref")).unwrap();
    let x: Vec<f64> = read_bin(&d.join("x.bin"));
    let i: Vec<i32> = read_bin(&d.join("i.bin"));
    let p: Vec<i32> = read_bin(&d.join("p.bin"));
    let sets = std::fs::read_to_string(d.join("set.txt")).unwrap();
    let is_q: Vec<bool> = sets.lines().map(|l| l == "query").collect();
    let ng = m.var_names.len();
    // query columns only
    let (mut qx, mut qi, mut qp) = (Vec::new(), Vec::new(), vec![0i32]);
    for (j, &q) in is_q.iter().enumerate() {
        if q {
            let r = p[j] as usize..p[j + 1] as usize;
            qx.extend_from_slice(&x[r.clone()]);
            qi.extend_from_slice(&i[r]);
            qp.push(qx.len() as i32);
        }
    }
    let nq = qp.len() - 1;
    let view = CscView::new(ng, nq, &qp, &qi, &qx).unwrap();
    let mut s = SurgeryModel::from_model(&m, 1, 0).unwrap();
    let batch = vec![(s.n_batch() - 1) as u32; nq];
    let data = s.prepare(&ExprMatrix::Csc(view), &batch).unwrap();
    let opts = TrainOptions {
        max_epochs: Some(epochs),
        freeze_dropout: true,
        n_threads: threads,
        ..Default::default()
    };
    let mut t0 = Instant::now();
    let mut c0 = cpu_seconds();
    let res = s
        .train(
            &data,
            &opts,
            &mut |e| {
                let c1 = cpu_seconds();
                println!(
                    "epoch {} {:.3} s (cpu {:.2} s) elbo_train {:.3} elbo_validation {:.3}",
                    e.epoch,
                    t0.elapsed().as_secs_f64(),
                    c1 - c0,
                    e.elbo_train,
                    e.elbo_validation
                );
                t0 = Instant::now();
                c0 = c1;
            },
            &|| false,
        )
        .unwrap();
    println!(
        "{} query cells x {ng} genes, {} epochs",
        nq,
        res.history.len()
    );
}
