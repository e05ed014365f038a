# Weighted kNN label transfer: goldens from scArches 0.6.1 (tools/fixtures/knn), a plain-R
# reference implementation, object inputs, errors and plots.

fx <- function(f) test_path("fixtures", "knn", f)
read_f64 <- function(f, nc) matrix(readBin(fx(f), "double", n = 1e6), ncol = nc, byrow = TRUE)

knn_fixture <- function() {
  list(ref = read_f64("reference.bin", 10), qry = read_f64("query.bin", 10),
       lab = utils::read.csv(fx("reference_labels.csv"), stringsAsFactors = FALSE))
}

# scArches' algorithm written out in plain R (brute force, spec section 6).
naive_knn_transfer <- function(qry, ref, labels, k) {
  d2 <- outer(rowSums(qry^2), rowSums(ref^2), "+") - 2 * qry %*% t(ref)
  out <- lapply(labels, function(x) list(label = character(nrow(qry)), unc = numeric(nrow(qry))))
  for (i in seq_len(nrow(qry))) {
    dd <- sqrt(rowSums((ref - matrix(qry[i, ], nrow(ref), ncol(ref), byrow = TRUE))^2))
    nb <- order(dd, seq_along(dd))[seq_len(k)]
    d <- dd[nb]
    s <- sqrt(mean((d - mean(d))^2))
    w <- exp(-d / (2 / s)^2)
    w <- w / sum(w)
    for (j in seq_along(labels)) {
      l <- as.character(labels[[j]][nb])
      lev <- sort(unique(l), method = "radix")
      p <- vapply(lev, function(v) sum(w[l == v]), numeric(1))
      best <- which(p == max(p))[1]
      out[[j]]$label[i] <- lev[best]
      out[[j]]$unc[i] <- max(1 - p[best], 0)
    }
  }
  out
}

test_that("labels and uncertainties equal scArches 0.6.1 (k = 15, 50; with and without threshold)", {
  f <- knn_fixture()
  n_checked <- 0
  for (k in c(15, 50)) for (mode in c("plain", "t05", "t1")) {
    thr <- switch(mode, plain = NULL, t05 = 0.5, t1 = 1)
    res <- knn_transfer(f$qry, f$ref, "cell_type", k = k, reference_labels = f$lab,
                        prefix = TRUE, threshold = thr, n_threads = 2)
    # prefix = TRUE picks cell_type and cell_type_fine (not batch), as scArches does
    expect_named(res, c("cell_type_transfer", "cell_type_uncertainty",
                        if (!is.null(thr)) "cell_type_certain",
                        "cell_type_fine_transfer", "cell_type_fine_uncertainty",
                        if (!is.null(thr)) "cell_type_fine_certain"))
    gold <- utils::read.csv(fx(sprintf("k%d_%s_labels.csv", k, mode)), stringsAsFactors = FALSE)
    gunc <- read_f64(sprintf("k%d_%s_uncert.bin", k, mode), 2)
    for (j in 1:2) {
      col <- c("cell_type", "cell_type_fine")[j]
      ours <- res[[paste0(col, "_transfer")]]
      unc <- res[[paste0(col, "_uncertainty")]]
      expect_lt(max(abs(unc - gunc[, j])), 1e-9)
      differ <- ours != gold[[col]]
      if (mode == "t1") {
        # threshold 1 on unanimous cells is decided by the last bit of a sum of weights
        # (sklearn's BLAS distances vs ours): only such cells may differ
        expect_true(all(gunc[differ, j] < 1e-12 & unc[differ] < 1e-12))
        expect_lt(mean(differ), 0.1)
        n_checked <- n_checked + sum(!differ)
      } else {
        expect_identical(ours, gold[[col]])
        n_checked <- n_checked + length(ours)
      }
    }
  }
  expect_gt(n_checked, 2000)
  # the fixture exercises the rare label and the zero-spread (duplicate) cell
  gold <- utils::read.csv(fx("k15_plain_labels.csv"), stringsAsFactors = FALSE)
  expect_true(all(c("pDC", "Doublet") %in% gold$cell_type))
})

test_that("neighbours equal sklearn's KNeighborsTransformer", {
  f <- knn_fixture()
  for (k in c(15, 50)) {
    nb <- knn_neighbors(f$qry, f$ref, k = k, n_threads = 2)
    gi <- as.matrix(utils::read.csv(fx(sprintf("k%d_indices.csv", k)), header = FALSE)) + 1L
    gd <- read_f64(sprintf("k%d_distances.bin", k), k)
    expect_lt(max(abs(nb$distance - gd)), 1e-12)
    # same neighbour sets wherever the k-th distance is not tied with the next
    full <- knn_neighbors(f$qry, f$ref, k = k + 1, n_threads = 1)$distance
    untied <- full[, k + 1] - full[, k] > 1e-9
    expect_gt(sum(untied), 190)
    for (i in which(untied)) expect_setequal(nb$index[i, ], gi[i, ])
    expect_false(is.unsorted(t(nb$distance)[seq_len(k)]))
  }
})

test_that("knn_transfer equals a plain-R reference on random data, any thread count", {
  set.seed(3)
  centres <- matrix(rnorm(5 * 4, sd = 1.5), 5)
  t_ref <- sample(5, 300, replace = TRUE)
  ref <- centres[t_ref, ] + matrix(rnorm(300 * 4), 300)
  qry <- centres[sample(5, 80, replace = TRUE), ] + matrix(rnorm(80 * 4), 80)
  labs <- data.frame(type = factor(letters[t_ref], levels = c("e", "d", "c", "b", "a")),
                     num = t_ref %% 3, chr = c("x", "Y", "z")[1 + t_ref %% 3],
                     stringsAsFactors = FALSE)
  for (k in c(1, 7, 30)) {
    naive <- naive_knn_transfer(qry, ref, labs, k)
    for (nt in c(1, 2)) {
      res <- knn_transfer(qry, ref, c("type", "num", "chr"), k = k, reference_labels = labs,
                          n_threads = nt)
      expect_s3_class(res$type_transfer, "factor")
      expect_identical(levels(res$type_transfer), c("e", "d", "c", "b", "a"))
      expect_identical(as.character(res$type_transfer), naive$type$label)
      expect_identical(res$num_transfer, naive$num$label)
      expect_identical(res$chr_transfer, naive$chr$label)
      expect_equal(res$type_uncertainty, naive$type$unc, tolerance = 1e-12)
      expect_equal(res$chr_uncertainty, naive$chr$unc, tolerance = 1e-12)
    }
  }
  # threshold: probability >= threshold keeps the label
  res <- knn_transfer(qry, ref, "chr", k = 10, reference_labels = labs, threshold = 0.7,
                      unknown_label = "?")
  plain <- knn_transfer(qry, ref, "chr", k = 10, reference_labels = labs)
  keep <- 1 - plain$chr_uncertainty >= 0.7
  expect_identical(res$chr_certain, keep)
  expect_identical(res$chr_transfer, ifelse(keep, plain$chr_transfer, "?"))
  expect_true(any(!keep) && any(keep))
})

test_that("Seurat and SingleCellExperiment objects get metadata columns", {
  f <- knn_fixture()
  mat <- knn_transfer(f$qry, f$ref, c("cell_type", "cell_type_fine"), k = 15,
                      reference_labels = f$lab, threshold = 0.5)
  rownames(f$ref) <- paste0("r", seq_len(nrow(f$ref)))
  rownames(f$qry) <- paste0("q", seq_len(nrow(f$qry)))
  colnames(f$ref) <- colnames(f$qry) <- paste0("scvi_", 1:10)
  if (has_seurat()) {
    mk <- function(emb, md) {
      counts <- Matrix::Matrix(0, 3, nrow(emb), sparse = TRUE,
                               dimnames = list(paste0("g", 1:3), rownames(emb)))
      s <- SeuratObject::CreateSeuratObject(counts, meta.data = md)
      s[["scvi"]] <- SeuratObject::CreateDimReducObject(embeddings = emb, key = "scvi_",
                                                       assay = "RNA")
      s
    }
    md <- f$lab; rownames(md) <- rownames(f$ref)
    sref <- mk(f$ref, md)
    sq <- mk(f$qry, NULL)
    out <- knn_transfer(sq, sref, c("cell_type", "cell_type_fine"), k = 15, threshold = 0.5)
    expect_s4_class(out, "Seurat")
    for (n in names(mat)) expect_identical(out[[n]][[1]], mat[[n]])
    expect_identical(rownames(out[[]]), rownames(f$qry))
    expect_error(knn_transfer(sq, sref, "cell_type", use_rep = "pca"),
                 class = "scannot_error_reduction")
  }
  if (has_sce()) {
    sce_ref <- SingleCellExperiment::SingleCellExperiment(
      colData = S4Vectors::DataFrame(f$lab, row.names = rownames(f$ref)),
      reducedDims = list(X_scVI = f$ref, PCA = f$ref[, 1:2]))
    sce_q <- SingleCellExperiment::SingleCellExperiment(
      colData = S4Vectors::DataFrame(row.names = rownames(f$qry)),
      reducedDims = list(X_scVI = f$qry))
    out <- knn_transfer(sce_q, sce_ref, c("cell_type", "cell_type_fine"), k = 15,
                        threshold = 0.5)
    cd <- SummarizedExperiment::colData(out)
    for (n in names(mat)) expect_identical(cd[[n]], mat[[n]])
    # two reductions, one named like scVI: picked; none matching: error
    sce_ref2 <- sce_ref
    SingleCellExperiment::reducedDims(sce_ref2) <- list(A = f$ref, B = f$ref)
    expect_error(knn_transfer(sce_q, sce_ref2, "cell_type", k = 5),
                 class = "scannot_error_reduction")
  }
})

test_that("bad inputs give classed errors", {
  f <- knn_fixture()
  expect_error(knn_transfer(f$qry[, 1:9], f$ref, "cell_type", reference_labels = f$lab),
               class = "scannot_error_dims")
  lab_na <- f$lab; lab_na$cell_type[3] <- NA
  expect_error(knn_transfer(f$qry, f$ref, "cell_type", reference_labels = lab_na),
               class = "scannot_error_labels")
  expect_error(knn_transfer(f$qry, f$ref, "cell_type", k = 601, reference_labels = f$lab),
               class = "scannot_error_input")
  expect_error(knn_neighbors(f$qry, f$ref, k = 601), class = "scannot_error_input")
  expect_error(knn_transfer(f$qry, f$ref, "celltype", reference_labels = f$lab),
               class = "scannot_error_labels")
  expect_error(knn_transfer(f$qry, f$ref, "cell_type"), class = "scannot_error_labels")
  expect_error(knn_transfer(f$qry, f$ref, "cell_type", reference_labels = f$lab[1:10, ]),
               class = "scannot_error_dims")
  bad <- f$qry; bad[2, 3] <- NaN
  expect_error(knn_transfer(bad, f$ref, "cell_type", reference_labels = f$lab),
               class = "scannot_error_value")
  expect_error(knn_transfer(f$qry, f$ref, "cell_type", reference_labels = f$lab,
                            threshold = 2), class = "scannot_error_input")
})

test_that("kernel underflow gives NA labels with uncertainty 1, as scArches' None", {
  set.seed(5)
  ref <- matrix(rnorm(40 * 3, sd = 300), 40)
  qry <- matrix(rnorm(5 * 3, sd = 300), 5)
  expect_warning(res <- knn_transfer(qry, ref, "l", k = 10,
                                     reference_labels = data.frame(l = rep(c("a", "b"), 20))),
                 "underflowed")
  expect_true(all(is.na(res$l_transfer)))
  expect_identical(res$l_uncertainty, rep(1, 5))
})

test_that("joint UMAP and plots", {
  skip_if_not_installed("uwot")
  f <- knn_fixture()
  res <- knn_transfer(f$qry, f$ref, "cell_type", k = 15, reference_labels = f$lab)
  u <- joint_umap(f$qry, f$ref, query_data = res, reference_data = f$lab, n_threads = 1,
                  seed = 1)
  expect_identical(nrow(u), nrow(f$qry) + nrow(f$ref))
  expect_identical(as.character(u$dataset), rep(c("reference", "query"), c(600, 200)))
  expect_true(all(c("UMAP_1", "UMAP_2", "cell_type", "cell_type_transfer",
                    "cell_type_uncertainty") %in% names(u)))
  expect_true(all(is.finite(u$UMAP_1)))
  for (cb in c("dataset", "cell_type", "cell_type_uncertainty")) {
    p <- plot_joint_umap(u, color_by = cb)
    expect_s3_class(p, "ggplot")
    b <- ggplot2::ggplot_build(p)
    expect_gt(nrow(b$data[[length(b$data)]]), 0)
  }
  # by label: query cells are coloured by their transferred label
  p <- plot_joint_umap(u, color_by = "cell_type")
  expect_false(anyNA(p$data$.colour))
  pu <- plot_uncertainty(res, "cell_type", threshold = 0.2)
  expect_s3_class(pu, "ggplot")
  med <- tapply(res$cell_type_uncertainty, res$cell_type_transfer, stats::median)
  expect_identical(levels(pu$data$label), names(sort(med)))
  expect_error(plot_uncertainty(res, "cell_type_fine"), class = "scannot_error_labels")
  expect_error(plot_joint_umap(u, color_by = "nope"), class = "scannot_error_input")
})

test_that("joint UMAP of bare matrices has no metadata columns", {
  skip_if_not_installed("uwot")
  set.seed(1)
  u <- joint_umap(matrix(rnorm(40 * 3), 40), matrix(rnorm(60 * 3), 60), n_threads = 1)
  expect_named(u, c("cell", "dataset", "UMAP_1", "UMAP_2"))
  expect_identical(nrow(u), 100L)
})
