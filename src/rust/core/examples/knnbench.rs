//! Timing of the exact kNN + transfer at the seed's scale (simulated clustered latent):
//!   cargo run --release -p scannot-core --example knnbench -- [threads] [k] [within_sd]
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use scannot_core::knn::{transfer, Embedding, LabelColumn};
use std::time::Instant;

fn sim(n: usize, dim: usize, centres: &[Vec<f64>], sd: f64, seed: u64) -> (Vec<f64>, Vec<i32>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let nd = Normal::new(0.0, sd).unwrap();
    let mut x = vec![0.0; n * dim];
    let mut lab = vec![0; n];
    for i in 0..n {
        let c = rng.random_range(0..centres.len());
        lab[i] = c as i32;
        for d in 0..dim {
            x[d * n + i] = centres[c][d] + nd.sample(&mut rng);
        }
    }
    (x, lab)
}

fn cpu() -> f64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap();
    let f: Vec<&str> = s.rsplit(')').next().unwrap().split_whitespace().collect();
    (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / 100.0
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let threads: usize = a.get(1).and_then(|s| s.parse().ok()).unwrap_or(2);
    let k: usize = a.get(2).and_then(|s| s.parse().ok()).unwrap_or(15);
    let sd: f64 = a.get(3).and_then(|s| s.parse().ok()).unwrap_or(0.5);
    let nq: usize = a.get(4).and_then(|s| s.parse().ok()).unwrap_or(28_911);
    let (nr, dim) = (86_332, 10);
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let csd: f64 = a.get(5).and_then(|s| s.parse().ok()).unwrap_or(2.0);
    let cn = Normal::new(0.0, csd).unwrap();
    let centres: Vec<Vec<f64>> = (0..20)
        .map(|_| (0..dim).map(|_| cn.sample(&mut rng)).collect())
        .collect();
    let (r, lab) = sim(nr, dim, &centres, sd, 2);
    let (q, _) = sim(nq, dim, &centres, sd, 3);
    let re = Embedding::new(nr, dim, &r, "reference").unwrap();
    let qe = Embedding::new(nq, dim, &q, "query").unwrap();
    scannot_core::threads::with_threads(threads, || {
        for _ in 0..3 {
            let t = Instant::now();
            let c0 = cpu();
            let idx = scannot_core::knn::KnnIndex::build(&re);
            let tb = t.elapsed().as_secs_f64();
            let cb = cpu() - c0;
            let nb = idx.query(&qe, k).unwrap();
            let t1 = t.elapsed().as_secs_f64();
            let res = transfer(
                &nb,
                &[LabelColumn {
                    codes: &lab,
                    n_levels: 20,
                }],
            )
            .unwrap();
            let t2 = t.elapsed().as_secs_f64();
            println!(
                "build {tb:.3} s (cpu {cb:.2}), cpu seconds total {:.2}",
                cpu() - c0
            );
            println!(
                "threads {threads} k {k} sd {sd}: knn {t1:.3} s, total {t2:.3} s, mean unc {:.4}",
                res[0].uncertainty.iter().sum::<f64>() / nq as f64
            );
        }
    })
    .unwrap();
}
