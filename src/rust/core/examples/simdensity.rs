fn main() {
    let a: Vec<String> = std::env::args().collect();
    let p = scannot_core::simulate::SimParams {
        n_cells: a[1].parse().unwrap(),
        n_genes: a[2].parse().unwrap(),
        depth: a[3].parse().unwrap(),
        ..Default::default()
    };
    let t = std::time::Instant::now();
    let s = scannot_core::simulate::simulate(&p).unwrap();
    println!(
        "density {:.4} nnz {} in {:?}",
        s.counts.x.len() as f64 / (p.n_cells * p.n_genes) as f64,
        s.counts.x.len(),
        t.elapsed()
    );
}
