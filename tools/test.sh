#!/usr/bin/env bash
# Runs every test: Rust formatting/lints/unit+property tests (incl. the stale-wrapper
# guard), R CMD check --no-manual --no-tests (fails on any ERROR or WARNING; builds and
# re-builds the vignette), and the testthat suite once, against the installed package
# (its summary line closes the output; running it inside R CMD check as well would double
# the ~15 min of workflow tests).
# Run tools/setup.sh first (the README's test command does).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:$HOME/.cargo/bin"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/scannot-target}"
export R_INCLUDE_DIR="${R_INCLUDE_DIR:-$(Rscript -e 'cat(R.home("include"))')}"

echo "== cargo fmt / clippy"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -q -- -D warnings
echo "== cargo test (core + glue; wrappers_up_to_date checks R/extendr-wrappers.R)"
cargo test --workspace 2>&1 | grep -E "^(test result|running|error|failures)|FAILED|panicked" || true
cargo test --workspace -q >/dev/null 2>&1 || { cargo test --workspace; exit 1; }
cmp Cargo.lock src/rust/Cargo.lock || { echo "src/rust/Cargo.lock differs from Cargo.lock: run tools/document.sh" >&2; exit 1; }

echo "== R CMD build + check"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$(pwd)
(cd "$work" && R CMD build --no-manual "$root" >build.log 2>&1) || { cat "$work/build.log"; exit 1; }
tarball=$(ls "$work"/scannot_*.tar.gz)
(cd "$work" && _R_CHECK_FORCE_SUGGESTS_=false R CMD check --no-manual --no-tests "$tarball" >check.log 2>&1) || true
grep -E "^\* checking .*\.\.\. (NOTE|WARNING|ERROR)|^Status:" "$work/check.log" || true
if grep -qE "^Status:.*(ERROR|WARNING)" "$work/check.log" || ! grep -q "^Status:" "$work/check.log"; then
  cat "$work/check.log"
  find "$work" -name "*.Rout.fail" -exec tail -40 {} \;
  exit 1
fi

echo "== testthat (installed package)"
Rscript tools/run-tests.R
