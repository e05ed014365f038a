# Goldens from celltypist 1.7.1 + scikit-learn 1.6.1 (tools/fixtures/celltypist): the models
# were trained and written by celltypist itself; the query has missing model genes, extra
# genes, a duplicated gene name and shuffled gene order.
ct_dir <- test_path("fixtures", "celltypist")
ct_file <- function(x) file.path(ct_dir, x)

ct_query <- function() {
  m <- methods::as(Matrix::readMM(ct_file("query.mtx.gz")), "CsparseMatrix")
  dimnames(m) <- list(readLines(ct_file("query_genes.txt")), readLines(ct_file("query_cells.txt")))
  m
}
ct_gold <- function(name, what) {
  utils::read.csv(ct_file(paste0(name, "_", what, ".csv")), check.names = FALSE, row.names = 1,
                  colClasses = if (what %in% c("best", "prob")) "character" else NA)
}
oc <- function() readLines(ct_file("over_clustering.txt"))

# Plain-R reference: CellTypist's formula written out.
naive_celltypist <- function(m, model) {
  g <- make.unique(rownames(m), sep = "-")
  keep <- g %in% model$features
  idx <- match(g[keep], model$features)
  x <- t(as.matrix(m[keep, , drop = FALSE]))
  mu <- if (model$scaler$with_mean) model$scaler$mean[idx] else 0
  z <- sweep(sweep(x, 2, mu), 2, model$scaler$scale[idx], "/")
  z[z > 10] <- 10
  d <- z %*% t(model$coef[, idx, drop = FALSE])
  d <- sweep(d, 2, model$intercept, "+")
  if (ncol(d) == 1L) d <- cbind(-d, d)
  d
}

test_that("models written by celltypist load identically from every pickle writer", {
  lr <- load_celltypist_model(ct_file("lr.pkl"))
  expect_s3_class(lr, "scannot_celltypist_model")
  expect_identical(lr$cell_types, c("B cell", "CD4 T", "CD8 T", "Mono", "NK"))
  expect_identical(dim(lr$coef), c(5L, 158L))
  expect_identical(lr$classifier, "LogisticRegression")
  expect_identical(lr$description$details, "scannot fixture")
  for (f in c("lr_p2.pkl", "lr_p5.pkl", "lr_np1_p2.pkl", "lr_np1_p4.pkl")) {
    m <- load_celltypist_model(ct_file(f))
    expect_identical(m$coef, lr$coef, info = f)
    expect_identical(m$intercept, lr$intercept, info = f)
    expect_identical(m$scaler, lr$scaler, info = f)
    expect_identical(m$features, lr$features, info = f)
  }
  expect_output(print(lr), "5 cell types, 158 features")
  b <- load_celltypist_model(ct_file("binary.pkl"))
  expect_identical(nrow(b$coef), 1L)
  expect_false(b$scaler$with_mean)
  expect_output(print(b), "binary")
  # saveRDS-safe: a plain R object
  f <- tempfile(fileext = ".rds")
  saveRDS(lr, f)
  expect_identical(readRDS(f), lr)
})

test_that("predictions equal celltypist.annotate (labels identical, scores within 1e-9)", {
  m <- ct_query()
  for (name in c("lr", "sgd", "binary")) {
    model <- load_celltypist_model(ct_file(paste0(name, ".pkl")))
    gold <- ct_gold(name, "best")
    dec <- as.matrix(ct_gold(name, "decision"))
    prob <- as.matrix(ct_gold(name, "probability"))
    for (x in list(m, as.matrix(m))) {
      r <- annotate_celltypist(x, model, majority_voting = TRUE, over_clustering = oc(),
                               return_probabilities = TRUE, n_threads = 2)
      expect_identical(as.character(r$predicted_labels), gold$predicted_labels, info = name)
      expect_identical(levels(r$predicted_labels), sort(unique(gold$predicted_labels), method = "radix"))
      expect_identical(r$over_clustering, gold$over_clustering)
      expect_identical(as.character(r$majority_voting), gold$majority_voting, info = name)
      expect_lt(max(abs(r$conf_score - as.numeric(gold$conf_score))), 1e-9)
      expect_identical(colnames(attr(r, "probability")), colnames(prob))
      expect_lt(max(abs(attr(r, "decision") - dec)), 1e-9)
      expect_lt(max(abs(attr(r, "probability") - prob)), 1e-9)
      expect_lt(max(abs(attr(r, "decision") - naive_celltypist(m, model))), 1e-9)
    }
    r <- annotate_celltypist(m, model, majority_voting = TRUE, over_clustering = oc(),
                             conf_by = "majority_voting", n_threads = 1)
    expect_lt(max(abs(r$conf_score - as.numeric(gold$majority_conf))), 1e-9)
    r <- annotate_celltypist(m, model, majority_voting = TRUE, over_clustering = oc(), min_prop = 0.6)
    expect_identical(as.character(r$majority_voting), gold$majority_minprop, info = name)
    # prob match: '|'-joined strings and 'Unassigned' identical, then voted as labels
    gp <- ct_gold(name, "prob")
    r <- annotate_celltypist(m, model, mode = "prob match", majority_voting = TRUE,
                             over_clustering = factor(oc()))
    expect_identical(as.character(r$predicted_labels), gp$predicted_labels, info = name)
    expect_identical(as.character(r$majority_voting), gp$majority_voting, info = name)
  }
  expect_true(any(grepl("|", ct_gold("lr", "prob")$predicted_labels, fixed = TRUE)))
  expect_true(any(ct_gold("lr", "best")$majority_minprop == "Heterogeneous"))
})

test_that("numpy 1 / protocol 5 files predict the same as celltypist's own file", {
  m <- ct_query()
  gold <- ct_gold("lr", "best")
  for (f in c("lr_p5.pkl", "lr_np1_p2.pkl")) {
    r <- annotate_celltypist(m, ct_file(f))
    expect_identical(as.character(r$predicted_labels), gold$predicted_labels)
  }
})

test_that("Seurat and SingleCellExperiment get prefixed columns and the matrices", {
  m <- ct_query()
  model <- load_celltypist_model(ct_file("lr.pkl"))
  gold <- ct_gold("lr", "best")
  if (has_seurat()) {
    # Seurat renames duplicated genes itself: drop the duplicate (unmatched in CellTypist too)
    m1 <- m[!duplicated(rownames(m)), ]
    seu <- SeuratObject::CreateSeuratObject(counts = m1)
    seu <- SeuratObject::SetAssayData(seu, slot = "data", new.data = m1)
    seu$oc <- oc()
    # the first cell lost its duplicate gene, so its expm1 sum is no longer 1e4: a warning
    expect_warning(out <- annotate_celltypist(seu, model, majority_voting = TRUE,
                                              over_clustering = "oc", return_probabilities = TRUE),
                   class = "scannot_warning_celltypist_input")
    expect_identical(as.character(out$celltypist_predicted_labels), gold$predicted_labels)
    expect_identical(as.character(out$celltypist_majority_voting), gold$majority_voting)
    expect_equal(dim(out@misc$celltypist_probability), c(240L, 5L))
  }
  if (has_sce()) {
    sce <- SingleCellExperiment::SingleCellExperiment(list(logcounts = m))
    sce$oc <- oc()
    out <- annotate_celltypist(sce, model, majority_voting = TRUE, over_clustering = "oc",
                               prefix = "ct_", return_probabilities = TRUE)
    expect_identical(as.character(out$ct_predicted_labels), gold$predicted_labels)
    expect_equal(dim(S4Vectors::metadata(out)$ct_decision), c(240L, 5L))
  }
})

test_that("input checks follow CellTypist and say how to fix the data", {
  m <- ct_query()
  model <- load_celltypist_model(ct_file("lr.pkl"))
  counts <- m
  counts@x <- round(expm1(counts@x))
  expect_error(annotate_celltypist(counts, model), class = "scannot_error_value")
  expect_error(annotate_celltypist(counts, model), "normalize_counts")
  # normalize = TRUE takes counts
  r <- annotate_celltypist(counts, model, normalize = TRUE)
  expect_gt(mean(as.character(r$predicted_labels) == ct_gold("lr", "best")$predicted_labels), 0.9)
  # a subset of genes: the first-cell sum is not 1e4 -> warning only
  expect_warning(annotate_celltypist(m[1:100, ], model), class = "scannot_warning_celltypist_input")
  bad <- m
  rownames(bad) <- tolower(rownames(bad))
  expect_error(annotate_celltypist(bad, model), class = "scannot_error_input")
  expect_error(annotate_celltypist(m, model, majority_voting = TRUE, over_clustering = 1:3),
               class = "scannot_error_over_clustering")
  expect_warning(r <- annotate_celltypist(m[, 1:40], model, majority_voting = TRUE,
                                          over_clustering = oc()[1:40]),
                 class = "scannot_warning_celltypist_voting")
  expect_false("majority_voting" %in% names(r))
  expect_error(annotate_celltypist(m, "does-not-exist.pkl"), class = "scannot_error_input")
  expect_error(annotate_celltypist(m, list()), class = "scannot_error_input")
})

test_that("malformed, truncated and foreign pickles give scannot errors", {
  raw <- readBin(ct_file("lr.pkl"), "raw", file.size(ct_file("lr.pkl")))
  f <- tempfile(fileext = ".pkl")
  writeBin(raw[1:5000], f)
  expect_error(load_celltypist_model(f), class = "scannot_error_format")
  writeBin(charToRaw("not a pickle"), f)
  expect_error(load_celltypist_model(f), class = "scannot_error_format")
  # a pickle that would call os.system under pickle.load: decoded, never run, not a model
  writeBin(as.raw(c(0x80, 0x02, 0x63, charToRaw("os\nsystem\n"), 0x58, 0x04, 0, 0, 0,
                    charToRaw("true"), 0x85, 0x52, 0x2e)), f)
  expect_error(load_celltypist_model(f), class = "scannot_error_format")
})

test_that("majority voting without over_clustering builds a seeded clustering", {
  skip_if_not_installed("igraph")
  m <- ct_query()
  model <- load_celltypist_model(ct_file("lr.pkl"))
  set.seed(99)
  before <- stats::runif(1)
  set.seed(99)
  a <- annotate_celltypist(m, model, majority_voting = TRUE)
  expect_identical(stats::runif(1), before)  # the caller's RNG stream is left alone
  b <- annotate_celltypist(m, model, majority_voting = TRUE, n_threads = 1)
  expect_identical(a, b)
  expect_true(all(c("over_clustering", "majority_voting") %in% names(a)))
  k <- length(unique(a$over_clustering))
  expect_gt(k, 5)
  expect_lt(k, ncol(m) / 2)
  # the vote is CellTypist's vote on that clustering
  v <- annotate_celltypist(m, model, majority_voting = TRUE, over_clustering = a$over_clustering)
  expect_identical(v$majority_voting, a$majority_voting)
  # clusters follow the cell types: the vote agrees with most per-cell predictions
  expect_gt(mean(as.character(a$majority_voting) == as.character(a$predicted_labels)), 0.7)
  # the given column still gives CellTypist's golden vote
  g <- annotate_celltypist(m, model, majority_voting = TRUE, over_clustering = oc())
  expect_identical(as.character(g$majority_voting), ct_gold("lr", "best")$majority_voting)
  expect_identical(celltypist_resolution(c(4999)), 5)
  expect_identical(vapply(c(5000, 19999, 20000, 39999, 99999, 100000, 199999, 200000),
                          celltypist_resolution, numeric(1)), c(10, 10, 15, 15, 20, 25, 25, 30))
})

test_that("automatic over-clustering uses a Seurat object's own neighbour graph", {
  skip_if_not_installed("igraph")
  skip_if_not_installed("SeuratObject")
  m <- ct_query()
  m <- m[!duplicated(rownames(m)), ]
  model <- load_celltypist_model(ct_file("lr.pkl"))
  seu <- SeuratObject::CreateSeuratObject(counts = m)
  seu <- SeuratObject::SetAssayData(seu, slot = "data", new.data = m)
  # a graph with two disconnected halves: clusters never mix them
  n <- ncol(m)
  half <- rep(1:2, length.out = n)
  i <- unlist(lapply(seq_len(n), function(c) {
    same <- which(half == half[c])
    same[(match(c, same) + 0:4) %% length(same) + 1L]
  }))
  adj <- Matrix::sparseMatrix(i = rep(seq_len(n), each = 5), j = i, x = 1, dims = c(n, n),
                              dimnames = list(colnames(m), colnames(m)))
  adj <- methods::as(adj + Matrix::t(adj), "CsparseMatrix")
  gr <- SeuratObject::as.Graph(adj)
  SeuratObject::DefaultAssay(gr) <- "RNA"
  seu[["RNA_snn"]] <- gr
  r <- suppressWarnings(annotate_celltypist(seu, model, majority_voting = TRUE))
  tab <- table(r$celltypist_over_clustering, half)
  expect_true(all(rowSums(tab > 0) == 1))
})
