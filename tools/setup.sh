#!/usr/bin/env bash
# Sets up a fresh Debian 12 machine for scannot and installs the package:
#  1. the Debian packages it needs (R, R packages, pandoc), only those missing;
#  2. builds the Rust workspace and installs the R package (R CMD INSTALL).
# Needs root (or sudo) for apt-get and cargo/rustc (rustup) on PATH or in ~/.cargo/bin.
set -euo pipefail
cd "$(dirname "$0")/.."

PKGS="r-base-dev r-cran-matrix r-cran-ggplot2 r-cran-rlang r-cran-testthat r-cran-jsonlite r-cran-igraph r-cran-irlba r-cran-processx
      r-cran-knitr r-cran-rmarkdown r-cran-roxygen2 r-cran-seuratobject
      r-bioc-singlecellexperiment r-cran-uwot r-cran-cli pandoc pkg-config libhdf5-dev
      r-bioc-biocparallel r-bioc-hdf5array"
missing=""
for p in $PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  echo "== setup: installing Debian packages:$missing"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
else
  echo "== setup: Debian packages present"
fi

export PATH="$PATH:$HOME/.cargo/bin"
command -v cargo >/dev/null || { echo "cargo not found: install Rust with rustup first" >&2; exit 1; }
# a persistent build cache makes re-installs take seconds
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/scannot-target}"
LIB="${SCANNOT_LIB:-$(Rscript -e 'cat(.libPaths()[1])')}"
echo "== setup: building and installing scannot into $LIB"
log=$(mktemp -t scannot-install.XXXXXX.log)
R CMD INSTALL --no-multiarch -l "$LIB" . >"$log" 2>&1 || { tail -50 "$log"; exit 1; }
rm -f "$log"
echo "== setup: done ($(Rscript -e 'cat(as.character(packageVersion("scannot")))'))"
