# Benchmark: Seurat's FindAllMarkers(test.use = "wilcox") vs scannot's find_all_markers()
# on the seed-scale case, one run, same Seurat object (counts -> Seurat::NormalizeData,
# so both take Seurat's LogNormalize fold change). Seurat runs as a user runs it: its
# defaults, one process (future's sequential plan), limma's rank-sum test when limma is
# installed (Debian r-bioc-limma), else one wilcox.test() per gene and cluster (much
# slower). The tables are compared row for row.
#   Rscript bench/seurat_markers.R [--genes N]   (N: only the first N genes, for a quick run)
source(file.path("bench", "common.R"))
args <- commandArgs(trailingOnly = TRUE)
if (!requireNamespace("Seurat", quietly = TRUE)) {
  cat("Seurat skipped: the Seurat package is not installed (Debian r-cran-seurat)\n")
  quit(save = "no")
}
suppressPackageStartupMessages(library(Seurat))
sim <- simulate_counts(n_cells = 28911, n_genes = 15674, n_types = 8, seed = 2026,
                       as = "list", n_threads = bench_threads)
counts <- sim$counts
k <- match("--genes", args)
if (!is.na(k)) counts <- counts[seq_len(as.integer(args[k + 1L])), ]
obj <- suppressWarnings(CreateSeuratObject(counts = counts))
obj <- NormalizeData(obj, verbose = FALSE)
Idents(obj) <- factor(sim$cells$cell_type)
cat(sprintf("data: %d genes x %d cells, %d clusters; Seurat %s, %s\n", nrow(obj), ncol(obj),
            nlevels(Idents(obj)), as.character(packageVersion("Seurat")),
            if (requireNamespace("limma", quietly = TRUE)) "limma's rank-sum test" else
              "wilcox.test() per gene (limma not installed)"))

invisible(find_all_markers(obj[1:200, ], n_threads = bench_threads))  # warm-up
t_ours <- min(sapply(1:3, function(i) system.time(
  find_all_markers(obj, n_threads = bench_threads))[["elapsed"]]))
ours <- find_all_markers(obj, n_threads = bench_threads)
cat(sprintf("scannot find_all_markers: %.3f s on %d threads (best of 3), %d rows\n", t_ours,
            bench_threads, nrow(ours)))
t_seurat <- system.time(ref <- suppressWarnings(suppressMessages(
  FindAllMarkers(obj, verbose = FALSE))))[["elapsed"]]
cat(sprintf("Seurat FindAllMarkers: %.1f s, %d rows\n", t_seurat, nrow(ref)))
same <- identical(rownames(ours), rownames(ref)) && identical(ours$gene, ref$gene)
rel <- max(abs(ours$p_val - ref$p_val) / pmax(ref$p_val, 1e-300))
cat(sprintf("tables: same rows in the same order: %s; p_val max relative difference %.2g; avg_log2FC max difference %.2g\n",
            same, rel, max(abs(ours$avg_log2FC - ref$avg_log2FC))))
ratio_line(sprintf("FindAllMarkers (%d threads)", bench_threads), "Seurat (1 process)",
           t_seurat, t_ours)
