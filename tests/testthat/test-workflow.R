# The whole-workflow runner: checkpoints, resume, outputs, inputs, report.

skip_if_no_workflow <- function() {
  skip_if_not(has_sce(), "SingleCellExperiment not installed")
  for (p in c("igraph", "uwot")) skip_if_not_installed(p)
}

wf <- function(dir, ...) {
  run_annotation_workflow(out_dir = dir, default_cells = 1200, umap_cells = 600, report = FALSE,
                          scvi_epochs = 3, n_threads = 1, quiet = TRUE, ...)
}

local_dir <- function(env = parent.frame()) {
  d <- tempfile("scannot-wf-")
  dir.create(d)
  do.call(on.exit, list(substitute(unlink(d, recursive = TRUE), list(d = d)), add = TRUE),
          envir = env)
  d
}

ck_md5 <- function(dir) tools::md5sum(list.files(file.path(dir, "checkpoints"), full.names = TRUE))

shared <- new.env()
shared_run <- function() {
  if (is.null(shared$res)) {
    shared$dir <- tempfile("scannot-wf-shared-")
    shared$res <- wf(shared$dir)
  }
  shared$res
}

copy_run <- function(env = parent.frame()) {
  d <- local_dir(env)
  file.copy(file.path(shared$dir, "checkpoints"), d, recursive = TRUE)
  d
}

test_that("a run killed after a step resumes from its checkpoints and gives the same result", {
  skip_if_no_workflow()
  dir <- local_dir()
  old <- options(scannot.workflow_fail_after = "wilcoxon")
  expect_error(wf(dir), class = "scannot_error_workflow_injected")
  options(old)
  done <- sort(basename(list.files(file.path(dir, "checkpoints"))))
  expect_equal(done, c("clustering.rds", "markers.rds", "wilcoxon.rds"))
  expect_false(file.exists(file.path(dir, "labels.csv")))
  before <- ck_md5(dir)
  mtimes <- file.mtime(names(before))
  Sys.sleep(1.1)

  res <- wf(dir)
  st <- res$steps
  expect_equal(st$status[match(c("clustering", "markers", "wilcoxon"), st$step)],
               rep("checkpoint", 3))
  expect_equal(st$status[match(c("celltypist", "transfer", "joint_umap"), st$step)],
               rep("computed", 3))
  # the earlier checkpoints were not rewritten
  expect_equal(ck_md5(dir)[names(before)], before)
  expect_equal(file.mtime(names(before)), mtimes)
  expect_true(all(file.exists(file.path(dir, "checkpoints",
                                        paste0(c("celltypist", "scvi", "transfer", "joint_umap"), ".rds")))))

  # the resumed run equals an uninterrupted run from scratch
  fresh <- shared_run()
  fresh_dir <- shared$dir
  expect_true(all(fresh$steps$status[1:7] %in% c("computed", "skipped")))
  expect_identical(utils::read.csv(file.path(dir, "labels.csv")),
                   utils::read.csv(file.path(fresh_dir, "labels.csv")))
  expect_identical(res$results$top_markers, fresh$results$top_markers)

  # a third run reuses everything
  again <- wf(dir)
  expect_true(all(again$steps$status[1:7] %in% c("checkpoint")))
  expect_identical(SummarizedExperiment::colData(again$object),
                   SummarizedExperiment::colData(res$object))
})

test_that("changing a setting recomputes that step and the later ones only", {
  skip_if_no_workflow()
  a <- shared_run()
  dir <- copy_run()
  b <- wf(dir, unknown_threshold = 0.9)
  st <- stats::setNames(b$steps$status, b$steps$step)
  expect_true(all(st[c("clustering", "markers", "wilcoxon", "celltypist", "scvi")] == "checkpoint"))
  expect_true(all(st[c("transfer", "joint_umap")] == "computed"))
  ua <- SummarizedExperiment::colData(a$object)$transfer_uncertainty
  ub <- SummarizedExperiment::colData(b$object)$transfer_uncertainty
  expect_equal(ua, ub)
  lb <- as.character(SummarizedExperiment::colData(b$object)$transfer_label)
  expect_equal(lb == "Unknown", 1 - ub < 0.9)
})

test_that("a damaged or foreign checkpoint is recomputed, and writes are atomic", {
  skip_if_no_workflow()
  shared_run()
  dir <- copy_run()
  f <- file.path(dir, "checkpoints", "markers.rds")
  writeBin(readBin(f, "raw", 20), f) # truncated
  res <- wf(dir)
  st <- stats::setNames(res$steps$status, res$steps$step)
  expect_equal(unname(st["clustering"]), "checkpoint")
  expect_equal(unname(st["markers"]), "computed")
  # later steps keep their checkpoints: the recomputed step has the same settings key
  expect_equal(unname(st["wilcoxon"]), "checkpoint")
  expect_length(list.files(file.path(dir, "checkpoints"), pattern = "^\\.", all.files = TRUE,
                           no.. = TRUE), 0)

  p <- file.path(local_dir(), "x.rds")
  scannot:::save_rds_atomic(list(a = 1), p)
  expect_equal(readRDS(p), list(a = 1))
  expect_equal(list.files(dirname(p), all.files = TRUE, no.. = TRUE), "x.rds")
  # uncompressed native serialisation (checkpoints, annotated.rds) reads back the same
  big <- list(m = Matrix::rsparsematrix(50, 40, 0.1), s = letters, f = factor(c("a", "b")))
  scannot:::save_rds_atomic(big, p, compress = FALSE)
  expect_identical(readRDS(p), big)
  # the forked writer: the file exists after the wait, no temporary file is left
  q <- file.path(dirname(p), "y.rds")
  wait <- scannot:::write_rds_async(big, q)
  wait()
  wait()
  expect_identical(readRDS(q), big)
  expect_setequal(list.files(dirname(p), all.files = TRUE, no.. = TRUE), c("x.rds", "y.rds"))
  # a write that fails is an error of the waiting call (at once where nothing forks)
  expect_error({
    bad <- scannot:::write_rds_async(big, file.path(dirname(p), "no-such-dir", "z.rds"))
    bad()
  }, class = "scannot_error")
})

test_that("the workflow's outputs: columns, tables, plots, labels that make sense", {
  skip_if_no_workflow()
  res <- shared_run()
  dir <- shared$dir
  md <- as.data.frame(SummarizedExperiment::colData(res$object))
  expect_true(all(c("leiden", "leiden_fine", "marker_label", "celltypist_predicted_labels",
                    "celltypist_majority_voting", "celltypist_conf_score", "transfer_label",
                    "transfer_uncertainty", "transfer_certain") %in% names(md)))
  expect_true(all(c("PCA", "UMAP") %in% SingleCellExperiment::reducedDimNames(res$object)))
  # finer over-clustering than clusters; every over-cluster votes one label
  expect_gt(length(unique(md$leiden_fine)), length(unique(md$leiden)))
  v <- tapply(as.character(md$celltypist_majority_voting), md$leiden_fine,
              function(x) length(unique(x)))
  expect_true(all(v == 1))
  # the simulated truth is recovered by the manual labels and the transfer
  truth <- as.character(md$cell_type)
  manual_ok <- c("CD4 T" = "T", "CD8 T" = "CD8", NK = "NK", B = "B", "CD14 Mono" = "Mono",
                 Epithelial = "Epithelial", Endothelial = "Endothelial", Fibroblast = "Fibroblast")
  # (1,200 cells: small clusters may merge, e.g. CD4 with CD8 T; 28.9k cells: 8 pure clusters)
  expect_gt(mean(as.character(md$marker_label) == manual_ok[truth]), 0.75)
  known <- truth != "Fibroblast"
  expect_gt(mean((as.character(md$celltypist_predicted_labels) == truth)[known]), 0.9)
  expect_gt(mean((as.character(md$transfer_label) == truth)[known]), 0.85)
  # the uncertainty is 1 - the kNN probability; Unknown below the threshold
  expect_true(all(md$transfer_uncertainty >= 0 & md$transfer_uncertainty <= 1))
  expect_equal(md$transfer_label == "Unknown", md$transfer_uncertainty > 0.5)
  # files
  for (f in c("labels.csv", "top_markers.csv", "dotplot.csv", "annotated.rds", "steps.csv",
              "results.rds")) {
    expect_true(file.exists(file.path(dir, f)), info = f)
  }
  expect_true(all(file.exists(unlist(res$plots))))
  expect_true(all(c("umap_markers", "marker_dotplot", "top_marker_dotplot", "umap_celltypist",
                    "umap_celltypist_conf", "joint_dataset", "joint_labels", "umap_transfer",
                    "uncertainty", "umap_unknown") %in% names(res$plots)))
  lab <- utils::read.csv(file.path(dir, "labels.csv"))
  expect_equal(nrow(lab), ncol(res$object))
  expect_equal(lab$cell, colnames(res$object))
  top <- utils::read.csv(file.path(dir, "top_markers.csv"))
  expect_true(all(table(top$group) <= 5))
  # the step table: every step once, with a status and a time
  expect_equal(res$steps$step, c("clustering", "markers", "wilcoxon", "celltypist", "scvi",
                                 "transfer", "joint_umap", "outputs", "total"))
  expect_true(all(res$steps$seconds >= 0))
})

test_that("the scVI step maps the query by scArches surgery into the reference's latent", {
  skip_if_no_workflow()
  res <- shared_run()
  sc <- res$steps[res$steps$step == "scvi", ]
  expect_equal(scannot:::scvi_capability(), "scvi_map_query")
  expect_match(sc$note, "scvi_map_query")
  # the epochs trained are reported (scvi_epochs = 3, no early stop that soon)
  expect_match(sc$note, "3 epochs")
  expect_equal(res$results$embedding, "scVI latent")
  expect_equal(scannot:::latent_of(list(latent = matrix(1, 2, 2))), matrix(1, 2, 2))
})

test_that("user data: a Seurat object in an .rds file, with counts only, and an own group_by", {
  skip_if_no_workflow()
  skip_if_not(has_seurat(), "SeuratObject not installed")
  sim <- simulate_counts(n_cells = 900, n_genes = 800, seed = 11, as = "list", n_threads = 1)
  so <- SeuratObject::CreateSeuratObject(counts = sim$counts, meta.data = sim$cells)
  f <- file.path(local_dir(), "my.rds")
  saveRDS(so, f)
  dir <- local_dir()
  res <- run_annotation_workflow(f, out_dir = dir, group_by = "cell_type", report = FALSE,
                                 n_threads = 1, quiet = TRUE, umap_cells = 500)
  expect_s4_class(res$object, "Seurat")
  expect_true(all(c("UMAP", "PCA") %in% SeuratObject::Reductions(res$object)))
  md <- res$object[[]]
  expect_equal(sort(unique(as.character(res$results$dotplot$group))),
               sort(unique(as.character(sim$cells$cell_type))))
  expect_true("transfer_label" %in% names(md))
  expect_equal(res$results$input, "my.rds")
  back <- readRDS(file.path(dir, "annotated.rds"))
  expect_equal(back[[]]$marker_label, md$marker_label)
})

test_that("bad inputs give classed errors", {
  expect_error(run_annotation_workflow("no/such/file.rds", out_dir = tempfile(), quiet = TRUE),
               class = "scannot_error_input")
  expect_error(run_annotation_workflow(matrix(1, 2, 2), out_dir = tempfile(), quiet = TRUE),
               class = "scannot_error_input")
  expect_error(annotation_report(tempfile()), class = "scannot_error_input")
})

test_that("the shipped default models load and fit the default data", {
  m <- load_celltypist_model(scannot_example("celltypist"))
  expect_equal(sort(m$cell_types), sort(c("CD4 T", "CD8 T", "NK", "B", "CD14 Mono",
                                           "Epithelial", "Endothelial")))
  expect_true(all(m$features %in% scannot:::default_reference_genes()))
  expect_gt(length(m$features), 280)
  ref <- utils::read.csv(scannot_example("reference_embedding"))
  expect_equal(names(ref)[1:3], c("cell", "cell_type", "batch"))
  expect_equal(sum(grepl("^scVI_", names(ref))), 10)
  expect_true(file.exists(file.path(scannot_example("scvi"), "model.pt")))
  sz <- file.size(c(scannot_example("celltypist"), scannot_example("reference_embedding"),
                    file.path(scannot_example("scvi"), "model.pt"),
                    system.file("extdata", "reference_counts.rds", package = "scannot")))
  expect_true(all(sz < 1e6))
  # the shipped reference: the same cells as the latent, no fibroblasts
  rc <- readRDS(system.file("extdata", "reference_counts.rds", package = "scannot"))
  expect_equal(colnames(rc$counts), ref$cell)
  expect_equal(rc$cells$cell_type, ref$cell_type)
  expect_false("Fibroblast" %in% ref$cell_type)
})

test_that("the report renders to HTML with its plots", {
  skip_if_no_workflow()
  skip_if_not_installed("rmarkdown")
  skip_if_not(rmarkdown::pandoc_available(), "pandoc not available")
  res <- shared_run()
  html <- annotation_report(res)
  expect_true(file.exists(html))
  txt <- paste(readLines(html, warn = FALSE), collapse = "\n")
  expect_match(txt, "CellTypist")
  expect_match(txt, "Unknown")
  expect_gt(lengths(regmatches(txt, gregexpr("data:image/png;base64", txt))), 10)
})

test_that("the workflow's PCA equals prcomp on the scaled top variable genes", {
  set.seed(3)
  m <- Matrix::rsparsematrix(60, 400, 0.3)
  m@x <- abs(m@x)
  mu <- rowMeans(as.matrix(m))
  v <- apply(as.matrix(m), 1, var) * 399 / 400
  hvg <- order(-ifelse(mu > 0.0125, v / mu, -1), -v)[1:40]
  ref <- stats::prcomp(t(as.matrix(m[hvg, ])), center = TRUE, scale. = TRUE)
  # converged (many power iterations): the exact principal components, up to sign
  got <- scannot:::workflow_pca(m, n_hvg = 40, n_pcs = 5, seed = 1, n_iter = 60)
  expect_equal(dim(got), c(400L, 5L))
  for (k in 1:5) {
    expect_equal(abs(unname(got[, k])), abs(unname(ref$x[, k])), tolerance = 1e-5)
  }
  # the default (4 power iterations) captures the top components' variance
  fast <- scannot:::workflow_pca(m, n_hvg = 40, n_pcs = 5, seed = 1)
  expect_gt(sum(fast^2) / sum(ref$x[, 1:5]^2), 0.97)
  # deterministic for a seed
  expect_identical(fast, scannot:::workflow_pca(m, n_hvg = 40, n_pcs = 5, seed = 1))
})
