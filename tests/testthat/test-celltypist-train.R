# train_celltypist / write_celltypist_model. Goldens from celltypist 1.7.1 + scikit-learn
# 1.6.1 (tools/fixtures/celltypist/train_fixtures.py): celltypist.train on the same data,
# and Python loading the model files scannot wrote.
ctt_sim <- function(n = 600, genes = 150, types = 4, seed = 3) {
  sim <- simulate_counts(n_cells = n, n_genes = genes, n_types = types, seed = seed, as = "list")
  list(x = normalize_counts(sim$counts), y = as.character(sim$cells$cell_type))
}

# Plain-R reference of the scaler: population variance, scale 1 for constant genes, clip 10.
naive_scaled <- function(x, with_mean = TRUE) {
  x <- t(as.matrix(x))
  mu <- colMeans(x)
  v <- colMeans(sweep(x, 2, mu)^2)
  s <- ifelse(v == 0, 1, sqrt(v))
  z <- sweep(sweep(x, 2, if (with_mean) mu else 0), 2, s, "/")
  z[z > 10] <- 10
  list(z = z, mean = mu, var = v, scale = s)
}

test_that("the scaler follows StandardScaler and unexpressed genes are dropped", {
  d <- ctt_sim()
  x <- d$x
  x[5, ] <- 0
  x <- Matrix::drop0(x)
  m <- train_celltypist(x, d$y, max_iter = 5, check_expression = FALSE)
  expect_false(rownames(x)[5] %in% m$features)
  expect_identical(m$features, rownames(x)[Matrix::rowSums(x) > 0])
  ref <- naive_scaled(x[m$features, ])
  expect_equal(m$scaler$mean, unname(ref$mean), tolerance = 1e-13)
  expect_equal(m$scaler$var, unname(ref$var), tolerance = 1e-12)
  expect_equal(m$scaler$scale, unname(ref$scale), tolerance = 1e-12)
  expect_s3_class(m, "scannot_celltypist_model")
  expect_identical(m$cell_types, sort(unique(d$y), method = "radix"))
  expect_identical(dim(m$coef), c(4L, length(m$features)))
  expect_identical(m$description$number_celltypes, "4")
})

test_that("the logistic regression reaches the optimum of its objective", {
  d <- ctt_sim(n = 300, genes = 60)
  m <- train_celltypist(d$x, d$y)
  ref <- naive_scaled(d$x[m$features, ])
  n <- ncol(d$x)
  # gradient of mean log-loss + |w|^2 / (2 C n) for each one-vs-rest problem
  for (k in seq_along(m$cell_types)) {
    yk <- as.numeric(d$y == m$cell_types[k])
    t <- drop(ref$z %*% m$coef[k, ]) + m$intercept[k]
    r <- stats::plogis(t) - yk
    g <- c(drop(crossprod(ref$z, r)) / n + m$coef[k, ] / n, sum(r) / n)
    expect_lt(max(abs(g)), 1e-4 * 1.0001)
  }
  expect_true(all(m$fit$n_iter > 1 & m$fit$n_iter < 1000))
})

test_that("training is deterministic, seeded and predicts held-out cells", {
  d <- ctt_sim(n = 800)
  tr <- 1:500
  a <- train_celltypist(d$x[, tr], d$y[tr], date = "x")
  b <- train_celltypist(d$x[, tr], d$y[tr], date = "x", n_threads = 1)
  expect_equal(a$coef, b$coef, tolerance = 1e-12)
  p <- annotate_celltypist(d$x[, -tr], a)
  expect_gt(mean(as.character(p$predicted_labels) == d$y[-tr]), 0.95)
  s1 <- train_celltypist(d$x[, tr], d$y[tr], use_SGD = TRUE, seed = 4)
  s2 <- train_celltypist(d$x[, tr], d$y[tr], use_SGD = TRUE, seed = 4)
  s3 <- train_celltypist(d$x[, tr], d$y[tr], use_SGD = TRUE, seed = 5)
  expect_identical(s1$coef, s2$coef)
  expect_false(identical(s1$coef, s3$coef))
  expect_identical(s1$classifier, "SGDClassifier")
  expect_gt(mean(as.character(annotate_celltypist(d$x[, -tr], s1)$predicted_labels) == d$y[-tr]), 0.9)
  mb <- train_celltypist(d$x[, tr], d$y[tr], use_SGD = TRUE, mini_batch = TRUE, batch_size = 50,
                         batch_number = 4, epochs = 3, balance_cell_type = TRUE)
  expect_identical(mb$fit$n_iter, 12L)
  expect_error(train_celltypist(d$x[, tr], d$y[tr], use_SGD = TRUE, mini_batch = TRUE,
                                batch_size = 1000), class = "scannot_error_input")
})

test_that("feature selection refits on the union of top genes with the subset scaler", {
  d <- ctt_sim()
  full <- train_celltypist(d$x, d$y, max_iter = 5)
  fs <- train_celltypist(d$x, d$y, feature_selection = TRUE, top_genes = 10)
  expect_gte(length(fs$features), 10)
  expect_lte(length(fs$features), 40)
  idx <- match(fs$features, full$features)
  expect_false(anyNA(idx))
  expect_true(all(diff(idx) > 0))
  expect_identical(fs$scaler$scale, full$scaler$scale[idx])
  expect_error(train_celltypist(d$x, d$y, feature_selection = TRUE, top_genes = 1000),
               class = "scannot_error_input")
})

test_that("two cell types give a binary model; with_mean = FALSE does not centre", {
  d <- ctt_sim(types = 2)
  m <- train_celltypist(d$x, d$y, with_mean = FALSE)
  expect_identical(nrow(m$coef), 1L)
  expect_identical(rownames(m$coef), m$cell_types[2])
  expect_false(m$scaler$with_mean)
  p <- annotate_celltypist(d$x, m, return_probabilities = TRUE)
  expect_gt(mean(as.character(p$predicted_labels) == d$y), 0.95)
})

test_that("bad input gives scannot errors", {
  d <- ctt_sim(n = 100, genes = 40)
  expect_error(train_celltypist(d$x, d$y[-1]), class = "scannot_error_group_by")
  expect_error(train_celltypist(d$x, rep("a", 100)), class = "scannot_error_groups")
  expect_error(train_celltypist(d$x * 2, d$y), class = "scannot_error_input")
  expect_error(train_celltypist(d$x, d$y, C = -1), class = "scannot_error_input")
  expect_error(train_celltypist(d$x, d$y, genes = "nope"), class = "scannot_error_input")
  raw <- simulate_counts(n_cells = 100, n_genes = 40, n_types = 2, seed = 1, as = "list")
  m <- train_celltypist(raw$counts, raw$cells$cell_type, normalize = TRUE, max_iter = 10)
  expect_identical(m$fit$max_iter, 10L)
  g <- train_celltypist(d$x, d$y, genes = rownames(d$x)[1:10], max_iter = 10)
  expect_true(all(g$features %in% rownames(d$x)[1:10]))
})

test_that("written models read back identically, atomically", {
  d <- ctt_sim(n = 300, genes = 80)
  dir <- tempfile("scannot-ct-write-")
  dir.create(dir)
  on.exit(unlink(dir, recursive = TRUE), add = TRUE)
  for (args in list(list(), list(use_SGD = TRUE), list(with_mean = FALSE))) {
    m <- do.call(train_celltypist, c(list(d$x, d$y, details = "scannot é"), args))
    f <- file.path(dir, "m.pkl")
    expect_identical(write_celltypist_model(m, f), f)
    l <- load_celltypist_model(f)
    expect_identical(l$coef, m$coef)
    expect_identical(l$intercept, m$intercept)
    expect_identical(l$scaler[c("mean", "scale", "with_mean")], m$scaler[c("mean", "scale", "with_mean")])
    expect_identical(l$classifier, m$classifier)
    expect_identical(l$description, m$description)
    expect_identical(l$sklearn_version, "1.6.1")
    # loaded models can be written again (no scaler variance or fit settings)
    f2 <- file.path(dir, "again.pkl")
    write_celltypist_model(l, f2)
    expect_identical(load_celltypist_model(f2)$coef, m$coef)
  }
  expect_identical(sort(list.files(dir, all.files = TRUE, no.. = TRUE)), c("again.pkl", "m.pkl"))
  expect_error(write_celltypist_model(list(), f), class = "scannot_error_input")
  expect_error(write_celltypist_model(m, file.path(dir, "no", "m.pkl")), class = "scannot_error_input")
})

test_that("Seurat and SingleCellExperiment methods train from metadata labels", {
  d <- ctt_sim(n = 200, genes = 50)
  ref <- train_celltypist(d$x, d$y, date = "d")
  skip_if_not_installed("SingleCellExperiment")
  sce <- SingleCellExperiment::SingleCellExperiment(list(logcounts = d$x))
  sce$ct <- d$y
  expect_equal(train_celltypist(sce, "ct", date = "d")$coef, ref$coef, tolerance = 1e-12)
  skip_if_not_installed("SeuratObject")
  seu <- suppressWarnings(SeuratObject::CreateSeuratObject(d$x))
  seu <- SeuratObject::SetAssayData(seu, slot = "data", new.data = d$x)
  seu$ct <- d$y
  expect_equal(train_celltypist(seu, "ct", date = "d")$coef, ref$coef, tolerance = 1e-12)
})

ctt_file <- function(x) test_path("fixtures", "celltypist_train", x)
ctt_data <- function(name) {
  m <- methods::as(Matrix::readMM(ctt_file(paste0(name, ".mtx.gz"))), "CsparseMatrix")
  rownames(m) <- readLines(ctt_file("train_genes.txt"))
  normalize_counts(m)
}

test_that("training matches celltypist.train: scaler, predictions, held-out accuracy", {
  x <- ctt_data("train")
  y <- readLines(ctt_file("train_labels.txt"))
  m <- train_celltypist(x, y)
  sc <- utils::read.csv(ctt_file("ct_lr_scaler.csv"))
  expect_identical(m$features, sc$gene)
  expect_equal(m$scaler$mean, sc$mean, tolerance = 1e-12)
  expect_equal(m$scaler$var, sc$var, tolerance = 1e-12)
  expect_equal(m$scaler$scale, sc$scale, tolerance = 1e-12)
  test <- ctt_data("test")
  truth <- readLines(ctt_file("test_labels.txt"))
  ct <- utils::read.csv(ctt_file("ct_lr_pred.csv"))
  p <- annotate_celltypist(test, m)
  expect_gte(mean(as.character(p$predicted_labels) == ct$predicted_labels), 0.97)
  expect_lt(max(abs(p$conf_score - ct$conf_score)), 0.05)
  acc <- utils::read.table(ctt_file("ct_accuracy.txt"), row.names = 1)
  ours <- mean(as.character(p$predicted_labels) == truth)
  expect_lte(abs(ours - acc["lr", 1]), 0.01)
  # celltypist's SGD is unseeded: mean accuracies over a few runs
  ours_sgd <- mean(vapply(1:3, function(s) {
    sgd <- train_celltypist(x, y, use_SGD = TRUE, seed = s)
    mean(as.character(annotate_celltypist(test, sgd)$predicted_labels) == truth)
  }, numeric(1)))
  expect_lte(abs(ours_sgd - acc["sgd", 1]), 0.04)
})

test_that("model files written by scannot load in celltypist and predict identically", {
  test <- ctt_data("test")
  for (nm in c("lr", "sgd", "binary")) {
    model <- load_celltypist_model(ctt_file(paste0("r_", nm, ".pkl")))
    py <- utils::read.csv(ctt_file(paste0("r_", nm, "_py.csv")), check.names = FALSE)
    p <- annotate_celltypist(test, model, return_probabilities = TRUE)
    expect_identical(as.character(p$predicted_labels), py$predicted_labels)
    expect_identical(colnames(attr(p, "probability")), colnames(py)[-1])
    expect_equal(unname(attr(p, "probability")), unname(as.matrix(py[-1])), tolerance = 1e-12)
  }
  # the files are what train_celltypist() + write_celltypist_model() give
  x <- ctt_data("train")
  y <- readLines(ctt_file("train_labels.txt"))
  m <- train_celltypist(x, y, details = "scannot fixture", date = "2026-01-01 00:00:00")
  f <- tempfile(fileext = ".pkl")
  on.exit(unlink(f), add = TRUE)
  write_celltypist_model(m, f)
  a <- load_celltypist_model(f)
  b <- load_celltypist_model(ctt_file("r_lr.pkl"))
  expect_equal(a$coef, b$coef, tolerance = 1e-10)
  expect_identical(a$description, b$description)
})
