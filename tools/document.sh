#!/usr/bin/env bash
# Regenerate R/extendr-wrappers.R (without rextendr) and NAMESPACE / man/ (roxygen2).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:$HOME/.cargo/bin"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/scannot-target}"
cargo run -q -p scannot --bin gen-wrappers -- scannot R/extendr-wrappers.R
Rscript -e 'roxygen2::roxygenise(roclets = c("rd", "namespace"), load_code = roxygen2::load_source)'
cp Cargo.lock src/rust/Cargo.lock
