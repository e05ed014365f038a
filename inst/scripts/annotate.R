# scannot's main job: the annotation workflow on the embedded default data (a seeded
# simulated PBMC-like dataset with real marker symbols and two batches), or on your own
# .rds (Seurat / SingleCellExperiment) file.
#
#   Rscript inst/scripts/annotate.R [out_dir] [input.rds group_by]
#
# Writes: dotplot.csv, dotplot.png, top_markers.csv, top_markers_dotplot.png, labels.csv,
# annotated.rds, and a line per step with its timing.
args <- commandArgs(trailingOnly = TRUE)
out <- if (length(args) >= 1) args[1] else "scannot-out"
dir.create(out, showWarnings = FALSE, recursive = TRUE)
suppressPackageStartupMessages(library(scannot))

step <- function(name, expr) {
  t0 <- proc.time()[["elapsed"]]
  val <- force(expr)
  cat(sprintf("[scannot] %-34s %7.2f s\n", name, proc.time()[["elapsed"]] - t0))
  invisible(val)
}

cell_metadata_of <- function(o) {
  if (inherits(o, "Seurat")) o[[]] else as.data.frame(SummarizedExperiment::colData(o))
}

if (length(args) >= 3) {
  obj <- step(paste("read", args[2]), readRDS(args[2]))
  group_by <- args[3]
} else {
  obj <- step("simulate default data (28.9k cells)",
              simulate_counts(n_cells = 28911, n_genes = 15674, n_types = 8, n_batches = 2,
                              seed = 2026))
  group_by <- "cell_type"
}
markers <- list(
  T = c("CD3D", "CD3E", "IL7R"), CD8 = c("CD8A", "CD8B"), NK = c("GNLY", "NKG7"),
  B = c("MS4A1", "CD79A"), Mono = c("CD14", "LYZ", "FCGR3A"), DC = c("FCER1A", "CST3"),
  Epithelial = c("EPCAM", "KRT18"), Endothelial = c("PECAM1", "VWF"),
  Fibroblast = c("COL1A2", "DCN"), Immune = "PTPRC"
)
markers <- step("markers_in_data", markers_in_data(markers, obj))
d <- step("dotplot_data", dotplot_data(obj, markers, group_by, standard_scale = "var"))
utils::write.csv(d, file.path(out, "dotplot.csv"), row.names = FALSE)
p <- step("plot_dotplot", plot_dotplot(d, title = "Marker genes"))
step("save dotplot.png", ggplot2::ggsave(file.path(out, "dotplot.png"), p, width = 10,
                                         height = 4.5, dpi = 100))
# Wilcoxon markers (scanpy flavour), filtered as scanpy's filter_rank_genes_groups
wx <- step("find_markers (Wilcoxon, all genes)", find_markers(obj, group_by))
top <- step("filter_markers + top_markers", top_markers(filter_markers(wx), n = 5))
utils::write.csv(top, file.path(out, "top_markers.csv"), row.names = FALSE)
step("save top_markers_dotplot.png", ggplot2::ggsave(
  file.path(out, "top_markers_dotplot.png"),
  plot_marker_dotplot(obj, filter_markers(wx), n = 5, group_by = group_by, standard_scale = "var"),
  width = 14, height = 4.5, dpi = 100))
# a data-driven cluster -> label map: each group takes the marker set it expresses most
top <- tapply(d$color, list(d$group, d$marker_set), mean)
mapping <- stats::setNames(colnames(top)[apply(top, 1, which.max)], rownames(top))
obj <- step("label_clusters", label_clusters(obj, group_by, mapping, new_col = "marker_label"))
labels <- data.frame(cell = colnames(obj), group = cell_metadata_of(obj)[[group_by]],
                     marker_label = cell_metadata_of(obj)$marker_label)
utils::write.csv(labels, file.path(out, "labels.csv"), row.names = FALSE)
step("save annotated.rds", {
  con <- gzfile(file.path(out, "annotated.rds"), "wb", compression = 1)
  saveRDS(obj, con)
  close(con)
})
print(mapping)
cat(sprintf("[scannot] done: results in %s\n", normalizePath(out)))
