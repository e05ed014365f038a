//! Writes R/extendr-wrappers.R without rextendr: `gen-wrappers <pkg> <out-file>`.
fn main() {
    let a: Vec<String> = std::env::args().collect();
    if a.len() != 3 {
        eprintln!("usage: gen-wrappers <package> <output file>");
        std::process::exit(2);
    }
    if let Err(e) = std::fs::write(&a[2], scannot::r_wrappers(&a[1])) {
        eprintln!("could not write {}: {e}", a[2]);
        std::process::exit(1);
    }
}
