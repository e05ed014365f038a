#' Simulate labelled single-cell counts
#'
#' Gamma-Poisson (negative binomial) counts for cell types whose marker genes
#' carry real symbols (PTPRC, CD3D, MS4A1, LYZ, EPCAM, PECAM1, COL1A2, ...), with
#' per-cell library sizes and a multiplicative per-batch gene effect. The same
#' `seed` gives the same data for any number of threads. Used by the tests,
#' benchmarks and the demo workflow.
#'
#' Cell types, in the order `n_types` takes them: CD4 T, CD8 T, NK, B, CD14 Mono,
#' Epithelial, Endothelial, Fibroblast, FCGR3A Mono, DC, Platelet, Plasma.
#'
#' @param n_cells,n_genes Size (genes: the markers first, then `GENE00001`-style
#'   fillers).
#' @param n_types Number of cell types (1 to 12).
#' @param n_batches Number of batches.
#' @param seed Random seed.
#' @param depth Mean total counts per cell.
#' @param marker_fold Fold change of a marker in its cell types.
#' @param batch_effect Standard deviation (natural log) of the per-batch gene effect.
#' @param genes_per_cell `NULL` (default) for the gamma-Poisson generator above, whose
#'   cost grows with cells x genes. A number switches to the sparse generator for large
#'   data (a million cells and more): each cell draws its library from its type's gene
#'   profile (multinomial, i.e. Poisson counts given the library size, no extra gene
#'   dispersion), with the library size tuned so that about `genes_per_cell` genes are
#'   detected per cell on average (`depth` is then ignored). Its cost is linear in the
#'   counts and the dgCMatrix slots are written once, in place. Cell types and batches
#'   are the same as the default generator's for the same `seed`. The non-zeros must stay
#'   below 2^31 (a dgCMatrix's limit).
#' @param as `"SingleCellExperiment"` (counts and logcounts assays), `"Seurat"`, or
#'   `"list"` (a `counts` dgCMatrix and a `cells` data frame).
#' @param n_threads Threads (default: option `scannot.threads`, else all cores).
#' @return The simulated data; cell metadata columns `cell_type` and `batch`.
#' @export
#' @examples
#' sim <- simulate_counts(n_cells = 200, n_genes = 100, as = "list")
#' table(sim$cells$cell_type)
#' # sparse generator: about 100 detected genes per cell
#' big <- simulate_counts(n_cells = 5000, n_genes = 3000, genes_per_cell = 100, as = "list")
#' mean(diff(big$counts@p))
simulate_counts <- function(n_cells = 2000, n_genes = 2000, n_types = 8, n_batches = 2,
                            seed = 42, depth = 3000, marker_fold = 30, batch_effect = 0.25,
                            as = c("SingleCellExperiment", "Seurat", "list"),
                            genes_per_cell = NULL, n_threads = NULL) {
  call <- rlang::current_env()
  as <- rlang::arg_match(as)
  n_threads <- scannot_threads(n_threads)
  r <- rs_call(rs_simulate(check_number(n_cells), check_number(n_genes),
                           as.integer(check_number(n_types)),
                           as.integer(check_number(n_batches)), check_number(seed),
                           check_number(depth), check_number(marker_fold),
                           check_number(batch_effect),
                           if (is.null(genes_per_cell)) NaN else check_number(genes_per_cell),
                           n_threads), call = call)
  cells <- sprintf("cell%06d", seq_len(r$ncol))
  # the SingleCellExperiment gets assays without dimnames (its constructor otherwise
  # strips them, copying and re-validating each matrix: most of the construction time)
  # and takes the names itself
  counts <- new("dgCMatrix", i = r$i, p = r$p, x = r$x, Dim = c(r$nrow, r$ncol),
                Dimnames = if (as == "SingleCellExperiment") list(NULL, NULL) else
                  list(r$genes, cells))
  meta <- data.frame(
    cell_type = factor(r$type_names[r$cell_type], levels = r$type_names),
    batch = factor(paste0("batch", r$batch), levels = paste0("batch", seq_len(n_batches))),
    row.names = cells
  )
  switch(as,
    list = list(counts = counts, cells = meta),
    SingleCellExperiment = {
      rlang::check_installed("SingleCellExperiment")
      sce <- SingleCellExperiment::SingleCellExperiment(
        assays = list(counts = counts, logcounts = normalize_counts(counts, n_threads = n_threads)),
        colData = S4Vectors::DataFrame(meta, check.names = FALSE))
      rownames(sce) <- r$genes
      sce
    },
    Seurat = {
      rlang::check_installed("SeuratObject")
      so <- SeuratObject::CreateSeuratObject(counts = counts, meta.data = meta)
      normalize_counts(so, n_threads = n_threads)
    })
}
