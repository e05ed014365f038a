# scannot's main job: the whole annotation workflow (markers -> manual labels -> Wilcoxon
# markers -> CellTypist with majority voting -> scVI mapping -> kNN label transfer ->
# joint UMAP -> plots and an HTML report) on the embedded default data (a seeded
# simulated PBMC-like dataset with real marker symbols and two batches, with the small
# CellTypist and scVI reference models shipped in inst/extdata), or on your own data.
#
#   Rscript inst/scripts/annotate.R [out_dir] [input.rds|input.h5ad [group_by]]
#       [--celltypist=model.pkl] [--scvi=scvi_model_dir] [--reference-embedding=latent.csv]
#       [--reference=reference.rds] [--label=cell_type] [--cells=N] [--no-resume]
#
# Writes into out_dir: report.html, annotated.rds, labels.csv, top_markers.csv,
# dotplot.csv, plots/*.png, steps.csv and checkpoints/ (a rerun resumes after the last
# finished step); prints a line per step with its timing.
args <- commandArgs(trailingOnly = TRUE)
flags <- grepl("^--", args)
opt <- function(name, default = NULL) {
  hit <- grep(paste0("^--", name, "="), args[flags], value = TRUE)
  if (length(hit)) sub("^[^=]*=", "", hit[1]) else default
}
pos <- args[!flags]
out <- if (length(pos) >= 1) pos[1] else "scannot-out"
suppressPackageStartupMessages(library(scannot))
wf_args <- list(
  object = if (length(pos) >= 2) pos[2] else NULL,
  out_dir = out,
  group_by = if (length(pos) >= 3) pos[3] else NULL,
  resume = !"--no-resume" %in% args,
  reference = opt("reference"),
  reference_label = opt("label", "cell_type")
)
if (!is.null(opt("celltypist"))) wf_args$celltypist_model <- opt("celltypist")
if (!is.null(opt("scvi"))) wf_args$scvi_model <- opt("scvi")
if (!is.null(opt("reference-embedding"))) wf_args$reference_embedding <- opt("reference-embedding")
if (!is.null(opt("cells"))) wf_args$default_cells <- as.numeric(opt("cells"))
res <- do.call(run_annotation_workflow, wf_args)
