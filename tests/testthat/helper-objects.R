# Seeded mock objects shared by the tests.
sim_small <- function(n_cells = 400, n_genes = 300, seed = 1) {
  simulate_counts(n_cells = n_cells, n_genes = n_genes, seed = seed, as = "list", n_threads = 1)
}

has_seurat <- function() requireNamespace("SeuratObject", quietly = TRUE)
has_sce <- function() requireNamespace("SingleCellExperiment", quietly = TRUE)

# A plain-R reference dotplot (slow, obvious): scanpy's definitions, spec section 1.
naive_dotplot <- function(m, genes, groups, cutoff = 0, only = FALSE, scale = "none") {
  m <- as.matrix(m[genes, , drop = FALSE])
  g <- droplevels(groups)
  mean <- sapply(seq_along(genes), function(k) tapply(m[k, ], g, function(v) {
    if (only) { e <- v[v > cutoff]; if (length(e)) mean(e) else 0 } else mean(v)
  }))
  frac <- sapply(seq_along(genes), function(k) tapply(m[k, ], g, function(v) mean(v > cutoff)))
  col <- mean
  sc <- function(v) { v <- v - min(v); v <- v / max(v); v[is.nan(v)] <- 0; v }
  if (scale == "var") col <- apply(mean, 2, sc)
  if (scale == "group") col <- t(apply(mean, 1, sc))
  list(mean = as.vector(mean), fraction = as.vector(frac), color = as.vector(col))
}

# The Wilcoxon fixtures written by tools/fixtures/wilcoxon_fixtures.py (genes x cells
# matrix, labels as a factor in the fixture's level order, run metadata).
wx_dir <- test_path("fixtures", "wilcoxon")

read_wx <- function(ds) {
  f <- function(x) file.path(wx_dir, paste0(ds, x))
  m <- methods::as(Matrix::readMM(f("_matrix.mtx.gz")), "CsparseMatrix")
  obs <- utils::read.csv(f("_obs.csv"), colClasses = "character", check.names = FALSE,
                         na.strings = c("NA", ""))
  meta <- jsonlite::fromJSON(f("_meta.json"))
  dimnames(m) <- list(readLines(f("_genes.txt")), obs$cell)
  g <- factor(obs[[meta$groupby]], levels = readLines(f("_levels.txt")))
  list(m = m, g = g, meta = meta, f = f)
}
