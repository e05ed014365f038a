# Goldens from scvi-tools 1.4.2 (tools/fixtures/scvi/make_scvi_fixture.py): three small SCVI
# models trained and saved by scvi-tools (default; scArches settings; extra categorical and
# continuous covariates encoded) and the get_latent_representation() of their 300 cells.
sv_dir <- test_path("fixtures", "scvi")
sv_file <- function(...) file.path(sv_dir, ...)

sv_counts <- function() {
  counts <- utils::read.csv(sv_file("counts.csv"), row.names = 1, check.names = FALSE)
  x <- t(as.matrix(counts))
  storage.mode(x) <- "double"
  methods::as(x, "CsparseMatrix")
}
sv_obs <- function() utils::read.csv(sv_file("obs.csv"), row.names = 1)
sv_gold <- function(model, what = "latent") {
  g <- as.matrix(utils::read.csv(sv_file(model, paste0(what, ".csv")), row.names = 1))
  dimnames(g) <- NULL
  g
}
strip <- function(m) {
  m <- as.matrix(m)
  attributes(m) <- list(dim = dim(m))
  m
}
sv_models <- c("default", "scarches", "covs")

test_that("models saved by scvi-tools load with their architecture and setup", {
  d <- load_scvi_model(sv_file("default"))
  expect_s3_class(d, "scannot_scvi_model")
  expect_identical(d$genes, sprintf("g%03d", 0:99))
  expect_identical(c(d$n_genes, d$n_latent, d$n_hidden, d$n_layers), c(100L, 4L, 16L, 1L))
  expect_identical(d$batch_key, "batch")
  expect_identical(d$batch_levels, c("b0", "b1"))
  expect_identical(d$gene_likelihood, "zinb")
  expect_identical(d$dispersion, "gene")
  expect_false(d$encode_covariates)
  expect_false(d$encoder_uses_covariates)
  expect_identical(d$scvi_version, "1.4.2")
  out <- capture.output(print(d))
  expect_match(out[1], "SCVI model \\(scvi-tools 1.4.2\\): 100 genes, 4 latent dimensions")
  expect_true(any(grepl("1 layer\\(s\\) of 16 hidden units", out)))
  expect_true(any(grepl("likelihood: zinb, dispersion 'gene'", out)))
  expect_true(any(grepl("batch: 'batch', 2 categories: b0, b1", out)))

  s <- load_scvi_model(file.path(sv_file("scarches"), "model.pt")) # the file itself works too
  expect_identical(c(s$n_layers, s$use_layer_norm, s$use_batch_norm), c("2", "both", "none"))
  expect_true(s$encode_covariates)
  expect_identical(s$dropout_rate, 0.2)

  cv <- load_scvi_model(sv_file("covs"))
  expect_identical(cv$categorical_covariates, list(cond = c("x", "y", "z")))
  expect_identical(cv$continuous_covariates, "score")
  out <- capture.output(print(cv))
  expect_true(any(grepl("categorical covariate 'cond': x, y, z", out)))
  expect_true(any(grepl("continuous covariates: score", out)))
  expect_true(any(grepl("covariates in the encoder: yes", out)))
})

test_that("the latent equals scvi-tools' get_latent_representation for every model and input type", {
  x <- sv_counts()
  obs <- sv_obs()
  for (nm in sv_models) {
    model <- load_scvi_model(sv_file(nm))
    gold <- sv_gold(nm)
    # sparse, with the covariates given as a data frame
    z <- scvi_latent(x, model, batch_key = obs$batch, covariates = obs, n_threads = 2,
                     return_variance = TRUE)
    expect_identical(dim(z), c(300L, 4L))
    expect_identical(rownames(z), colnames(x))
    expect_identical(colnames(z), paste0("scVI_", 1:4))
    expect_lt(max(abs(strip(z) - gold)), 1e-4, label = nm)
    expect_lt(max(abs(attr(z, "variance") - sv_gold(nm, "latent_var")) / sv_gold(nm, "latent_var")),
              1e-4)
    # dense, one thread, odd block size: same numbers
    zd <- scvi_latent(as.matrix(x), model, batch_key = obs$batch, covariates = obs,
                      n_threads = 1, batch_size = 7)
    expect_equal(zd, z[, ], tolerance = 1e-12)
    # a model given by its folder
    zp <- scvi_latent(x, sv_file(nm), batch_key = obs$batch, covariates = obs, n_threads = 1)
    expect_equal(zp, z[, ], ignore_attr = TRUE, tolerance = 1e-12)
  }
})

test_that("Seurat objects get a 'scvi' DimReduc and SCEs a 'X_scVI' reducedDim equal to the goldens", {
  skip_if_not(has_seurat() && has_sce())
  x <- sv_counts()
  obs <- sv_obs()
  seu <- SeuratObject::CreateSeuratObject(counts = x, meta.data = obs)
  sce <- SingleCellExperiment::SingleCellExperiment(assays = list(counts = x), colData = obs)
  for (nm in sv_models) {
    model <- load_scvi_model(sv_file(nm))
    gold <- sv_gold(nm)
    s2 <- scvi_latent(seu, model, n_threads = 2) # batch/covariates from the metadata
    expect_true("scvi" %in% SeuratObject::Reductions(s2))
    emb <- SeuratObject::Embeddings(s2, "scvi")
    expect_identical(SeuratObject::Key(s2[["scvi"]]), "scVI_")
    expect_identical(rownames(emb), colnames(seu))
    expect_lt(max(abs(strip(emb) - gold)), 1e-4)
    c2 <- scvi_latent(sce, model, n_threads = 2, return_variance = TRUE)
    rd <- SingleCellExperiment::reducedDim(c2, "X_scVI")
    expect_lt(max(abs(strip(rd) - gold)), 1e-4)
    expect_lt(max(abs(strip(S4Vectors::metadata(c2)$X_scVI_variance) - sv_gold(nm, "latent_var"))),
              1e-4)
  }
  # the default model's encoder ignores batch: no batch column is needed
  seu0 <- SeuratObject::CreateSeuratObject(counts = x)
  e0 <- SeuratObject::Embeddings(scvi_latent(seu0, load_scvi_model(sv_file("default"))), "scvi")
  expect_lt(max(abs(strip(e0) - sv_gold("default"))), 1e-4)
  # the scArches model needs it
  expect_error(scvi_latent(seu0, load_scvi_model(sv_file("scarches"))), class = "scannot_error_batch")
})

test_that("align_to_reference reorders, zero-pads and drops genes like prepare_query_anndata", {
  x <- sv_counts()
  model <- load_scvi_model(sv_file("default"))
  set.seed(3)
  keep <- sample(100, 80) # 20 model genes missing, order shuffled
  extra <- Matrix::rsparsematrix(5, 300, 0.3, rand.x = function(n) rpois(n, 4) + 1)
  rownames(extra) <- paste0("extra", 1:5)
  q <- rbind(x[keep, ], extra)
  expect_message(a <- align_to_reference(q, model), "80 found \\(80.0%\\), 20 padded with zeros, 5 query genes dropped, order changed")
  al <- attr(a, "alignment")
  expect_identical(al$n_found, 80L)
  expect_identical(sort(al$missing), sort(model$genes[-keep]))
  expect_identical(al$dropped, paste0("extra", 1:5))
  # reference: plain R indexing
  ref <- as.matrix(x)
  ref[-keep, ] <- 0
  expect_s4_class(a, "dgCMatrix")
  expect_identical(rownames(a), model$genes)
  expect_identical(unname(as.matrix(a)), unname(ref))
  # dense input gives the same
  ad <- align_to_reference(as.matrix(q), model, verbose = FALSE)
  expect_identical(strip(ad), strip(ref))
  # nothing to do: the same object comes back
  same <- align_to_reference(x, model, verbose = FALSE)
  expect_identical(unname(as.matrix(same)), unname(as.matrix(x)))
  expect_false(attr(same, "alignment")$reordered)
  # the latent of the messy query = the latent of the model-ordered counts with zeros
  z <- scvi_latent(q, model, n_threads = 1)
  zref <- scvi_latent(methods::as(ref, "CsparseMatrix"), model, n_threads = 1)
  expect_equal(z, zref, tolerance = 1e-12, ignore_attr = TRUE)
  # too few genes
  expect_error(align_to_reference(x[1:40, ], model), class = "scannot_error_genes")
  expect_error(align_to_reference(x[1:40, ], model, min_fraction = 0.5), "40 of the model's 100 genes")
  expect_message(align_to_reference(x[1:40, ], model, min_fraction = 0.3), "40 found")
  expect_error(scvi_latent(x[1:40, ], model), class = "scannot_error_genes")
  # a character vector of genes works as the reference
  a2 <- align_to_reference(q, model$genes, verbose = FALSE)
  expect_identical(a2, a)
})

test_that("genes can be matched through a feature-metadata column (e.g. Ensembl IDs)", {
  skip_if_not(has_sce())
  x <- sv_counts()
  model <- load_scvi_model(sv_file("default"))
  rn <- paste0("SYM", 1:100)
  x2 <- x[100:1, ]
  ids <- rownames(x2)
  rownames(x2) <- rn
  sce <- SingleCellExperiment::SingleCellExperiment(assays = list(counts = x2))
  SummarizedExperiment::rowData(sce)$gene_id <- ids
  expect_error(align_to_reference(sce, model, verbose = FALSE), class = "scannot_error_genes")
  a <- align_to_reference(sce, model, by = "gene_id", verbose = FALSE)
  expect_identical(unname(as.matrix(a)), unname(as.matrix(x)))
  expect_error(align_to_reference(sce, model, by = "nope"), class = "scannot_error_genes")
  # matrix: one id per row
  a3 <- align_to_reference(x2, model, by = ids, verbose = FALSE)
  expect_identical(unname(as.matrix(a3)), unname(as.matrix(x)))
  c2 <- scvi_latent(sce, model, by = "gene_id")
  expect_lt(max(abs(strip(SingleCellExperiment::reducedDim(c2, "X_scVI")) - sv_gold("default"))), 1e-4)
})

test_that("scvi_prepare_query appends new batch levels sorted, as load_query_data", {
  x <- sv_counts()
  model <- load_scvi_model(sv_file("scarches"))
  b <- rep(c("q_z", "q_a", "b1"), length.out = 300)
  q <- scannot:::scvi_prepare_query(x, model, batch_key = b)
  expect_identical(q$batch_levels, c("b0", "b1", "q_a", "q_z"))
  expect_identical(q$new_levels, c("q_a", "q_z"))
  expect_identical(q$batch, rep(c(3L, 2L, 1L), length.out = 300))
  expect_identical(q$report$n_found, 100L)
  expect_s4_class(q$x, "dgCMatrix")
  expect_identical(dim(q$x), c(100L, 300L))
  # code-point order (Python), not the locale's: upper case sorts before lower case
  q2 <- scannot:::scvi_prepare_query(x, model, batch_key = rep(c("b", "B", "a", "b0"), 75))
  expect_identical(q2$new_levels, c("B", "a", "b"))
  expect_identical(q2$batch[1:4], c(4L, 2L, 3L, 0L))
  # factors: their values count, not unused levels
  f <- factor(rep("b1", 300), levels = c("zz", "b1"))
  expect_identical(scannot:::scvi_prepare_query(x, model, batch_key = f)$new_levels, character())
  # covariates of the covs model
  cv <- load_scvi_model(sv_file("covs"))
  obs <- sv_obs()
  obs$cond[1:2] <- c("w", "v")
  q3 <- scannot:::scvi_prepare_query(x, cv, batch_key = "batch", covariates = obs)
  expect_identical(q3$categorical$cond$levels, c("x", "y", "z", "v", "w"))
  expect_identical(q3$categorical$cond$codes[1:2], c(4L, 3L))
  expect_identical(q3$continuous$score, obs$score)
  expect_error(scannot:::scvi_prepare_query(x, model), class = "scannot_error_batch")
  expect_error(scannot:::scvi_prepare_query(x, model, batch_key = c(NA, b[-1])),
               class = "scannot_error_batch")
})

test_that("unseen batches are refused unless the encoder ignores the batch and the user allows them", {
  x <- sv_counts()
  b <- rep(c("b0", "new1", "new2"), length.out = 300)
  d <- load_scvi_model(sv_file("default"))
  expect_error(scvi_latent(x, d, batch_key = b), class = "scannot_error_batch")
  expect_error(scvi_latent(x, d, batch_key = b), "scvi_map_query")
  z <- scvi_latent(x, d, batch_key = b, allow_new_batches = TRUE)
  expect_lt(max(abs(strip(z) - sv_gold("default"))), 1e-4)
  s <- load_scvi_model(sv_file("scarches"))
  expect_error(scvi_latent(x, s, batch_key = b, allow_new_batches = TRUE),
               class = "scannot_error_batch")
  expect_error(scvi_latent(x, s, batch_key = b, allow_new_batches = TRUE), "scvi_map_query")
  cv <- load_scvi_model(sv_file("covs"))
  obs <- sv_obs()
  obs$cond[1] <- "new"
  expect_error(scvi_latent(x, cv, batch_key = "batch", covariates = obs),
               class = "scannot_error_batch")
  obs <- sv_obs()
  obs$score <- NULL
  expect_error(scvi_latent(x, cv, batch_key = obs$batch, covariates = obs),
               class = "scannot_error_batch")
})

test_that("a model object survives saveRDS/readRDS by re-loading from its path", {
  x <- sv_counts()
  m <- load_scvi_model(sv_file("default"))
  f <- tempfile(fileext = ".rds")
  saveRDS(m, f)
  m2 <- readRDS(f)
  expect_false(scannot:::rs_scvi_loaded(m2$handle$ptr))
  z <- scvi_latent(x, m2)
  expect_lt(max(abs(strip(z) - sv_gold("default"))), 1e-4)
  expect_true(scannot:::rs_scvi_loaded(m2$handle$ptr)) # re-loaded once, kept
  # a restored object whose folder is gone
  m3 <- readRDS(f)
  m3$path <- file.path(tempdir(), "no-such-model")
  expect_error(scvi_latent(x, m3), class = "scannot_error_input")
  expect_error(scvi_latent(x, list()), class = "scannot_error_input")
})

test_that("give_mean = FALSE samples N(mean, var) with R's RNG; bad arguments are classed errors", {
  x <- sv_counts()
  m <- load_scvi_model(sv_file("default"))
  set.seed(1)
  s1 <- scvi_latent(x, m, give_mean = FALSE)
  set.seed(1)
  s2 <- scvi_latent(x, m, give_mean = FALSE)
  expect_identical(s1, s2)
  zz <- (strip(s1) - sv_gold("default")) / sqrt(sv_gold("default", "latent_var"))
  expect_lt(abs(mean(zz)), 0.1)
  expect_lt(abs(stats::sd(as.vector(zz)) - 1), 0.1)
  expect_error(scvi_latent(x, m, batch_size = 0), class = "scannot_error_input")
  expect_error(scvi_latent(x, m, give_mean = NA), class = "scannot_error_input")
  expect_error(scvi_latent(x, m, n_threads = -1), class = "scannot_error_input")
  expect_error(scvi_latent(x, m, unknown = 1))
  neg <- x
  neg@x[1] <- -1
  expect_error(scvi_latent(neg, m), class = "scannot_error_value")
  frac <- x
  frac@x[1] <- 0.5
  expect_warning(scvi_latent(frac, m), class = "scannot_warning_counts")
  noname <- x
  rownames(noname) <- NULL
  expect_error(scvi_latent(noname, m), class = "scannot_error_genes")
})

test_that("corrupt, foreign and legacy model files give classed errors, never a crash", {
  good <- readBin(sv_file("default", "model.pt"), "raw", file.size(sv_file("default", "model.pt")))
  dir <- tempfile("scvi-bad")
  dir.create(dir)
  write_model <- function(bytes, name) {
    d <- file.path(dir, name)
    dir.create(d)
    writeBin(bytes, file.path(d, "model.pt"))
    d
  }
  # truncated zip (no central directory), at several lengths
  for (n in c(10L, 1000L, length(good) %/% 2L, length(good) - 30L)) {
    expect_error(load_scvi_model(write_model(good[seq_len(n)], paste0("trunc", n))),
                 class = "scannot_error_format")
  }
  # a valid zip without data.pkl: rename the member in place (same length, offsets intact)
  nopkl <- good
  pat <- charToRaw("data.pkl")
  for (i in seq_len(length(good) - 7L)) {
    if (identical(good[i:(i + 7L)], pat)) nopkl[i + 7L] <- charToRaw("x")
  }
  expect_error(load_scvi_model(write_model(nopkl, "nopkl")), "no \\*/data.pkl",
               class = "scannot_error_format")
  # random bytes
  set.seed(7)
  expect_error(load_scvi_model(write_model(as.raw(sample(0:255, 5000, TRUE)), "random")),
               class = "scannot_error_format")
  # an empty file
  expect_error(load_scvi_model(write_model(raw(0), "empty")), class = "scannot_error_format")
  # flipped bytes inside the stored tensors or pickle: an error or a model, never a crash
  for (k in 1:20) {
    bad <- good
    pos <- sample(length(good), 8)
    bad[pos] <- as.raw(sample(0:255, 8, TRUE))
    res <- tryCatch(load_scvi_model(write_model(bad, paste0("flip", k))), scannot_error = function(e) e)
    expect_true(inherits(res, "scannot_scvi_model") || inherits(res, "scannot_error"))
    expect_false(inherits(res, "scannot_error_internal"))
  }
  # legacy (scvi-tools < 0.15) layout
  leg <- file.path(dir, "legacy")
  dir.create(leg)
  file.create(file.path(leg, c("model_params.pt", "attr.pkl", "var_names.csv")))
  expect_error(load_scvi_model(leg), "scvi-tools < 0.15", class = "scannot_error_format")
  # no model at all
  expect_error(load_scvi_model(file.path(dir, "nothing-here")), class = "scannot_error_input")
  empty <- file.path(dir, "emptydir")
  dir.create(empty)
  expect_error(load_scvi_model(empty), "no model.pt", class = "scannot_error_input")
})

test_that("knn_transfer picks the scVI latent as stored by scvi_latent (Seurat 'scvi', SCE 'X_scVI')", {
  skip_if_not(has_seurat() && has_sce())
  x <- sv_counts()
  obs <- sv_obs()
  model <- load_scvi_model(sv_file("scarches"))
  ref_cells <- 1:200
  qry_cells <- 201:300
  # matrices: the reference answer
  zr <- scvi_latent(x[, ref_cells], model, batch_key = obs$batch[ref_cells])
  zq <- scvi_latent(x[, qry_cells], model, batch_key = obs$batch[qry_cells])
  lab <- data.frame(cond = obs$cond[ref_cells])
  want <- knn_transfer(zq, zr, "cond", k = 15, reference_labels = lab)
  # objects that also hold a second reduction, so the latent must be found by name
  other <- matrix(stats::rnorm(300 * 3), 300, 3, dimnames = list(colnames(x), paste0("PC_", 1:3)))
  seu <- SeuratObject::CreateSeuratObject(counts = x, meta.data = obs)
  seu[["pca"]] <- SeuratObject::CreateDimReducObject(embeddings = other, key = "PC_", assay = "RNA")
  seu <- scvi_latent(seu, model)
  got <- knn_transfer(seu[, qry_cells], seu[, ref_cells], "cond", k = 15)
  expect_identical(unname(got$cond_transfer), want$cond_transfer)
  expect_equal(unname(got$cond_uncertainty), want$cond_uncertainty, tolerance = 1e-12)
  sce <- SingleCellExperiment::SingleCellExperiment(assays = list(counts = x), colData = obs,
                                                    reducedDims = list(PCA = other))
  sce <- scvi_latent(sce, model)
  got2 <- knn_transfer(sce[, qry_cells], sce[, ref_cells], "cond", k = 15)
  expect_identical(got2$cond_transfer, want$cond_transfer)
  expect_equal(got2$cond_uncertainty, want$cond_uncertainty, tolerance = 1e-12)
  # named explicitly too
  got3 <- knn_transfer(sce[, qry_cells], sce[, ref_cells], "cond", k = 15, use_rep = "X_scVI")
  expect_identical(got3$cond_transfer, want$cond_transfer)
})
