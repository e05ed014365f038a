# scArches surgery against scvi-tools 1.4.2 (tools/fixtures/scvi/make_surgery_fixture.py):
# the 300 fixture cells relabelled b1 / q_b / q_a, mapped onto the `scarches` reference with
# load_query_data(freeze_dropout=True) + train(max_epochs=60); scvi-tools' ELBO history.
sq_dir <- test_path("fixtures", "scvi")
sq_counts <- scvi_fixture_counts
sq_obs <- scvi_query_obs

test_that("query training reaches scvi-tools' validation ELBO and returns the latent", {
  x <- sq_counts()
  hist <- utils::read.csv(file.path(sq_dir, "surgery", "history.csv"))
  r <- scvi_map_query(x, file.path(sq_dir, "scarches"), batch_key = "sample", obs = sq_obs(x),
                      max_epochs = nrow(hist), early_stopping = FALSE, seed = 1,
                      n_threads = 2, progress = FALSE)
  expect_identical(r$batch_levels, c("b0", "b1", "q_a", "q_b"))
  expect_identical(dim(r$latent), c(300L, 4L))
  expect_identical(rownames(r$latent), colnames(x))
  expect_identical(nrow(r$history), nrow(hist))
  expect_false(r$stopped_early)
  expect_false(r$cancelled)
  expect_length(r$validation_cells, 30)
  # our own random split (30 other validation cells): the 270-cell train ELBO is comparable
  # to 1 %; the validation ELBO only roughly (the same-split comparison, within 1 %, is the
  # Rust test surgery_training_reaches_scvi_tools_elbo)
  expect_history_elbo_close(r$history, hist)
  expect_equal(r$history$kl_weight, (seq_len(nrow(hist)) - 1) / 400)
  # the latent moved from the reference encoder's (new batch columns trained) but stays close
  # to scvi-tools' trained latent
  gold <- as.matrix(utils::read.csv(file.path(sq_dir, "surgery", "latent.csv"), row.names = 1))
  expect_lt(stats::median(abs(r$latent - gold)), 0.1)
})

test_that("scvi_map_query stores the latent and history in SingleCellExperiment objects", {
  skip_if_not_installed("SingleCellExperiment")
  x <- sq_counts()
  sce <- SingleCellExperiment::SingleCellExperiment(list(counts = x), colData = sq_obs(x))
  out <- scvi_map_query(sce, load_scvi_model(file.path(sq_dir, "scarches")),
                        batch_key = "sample", max_epochs = 3, n_threads = 1,
                        progress = FALSE, save_dir = file.path(tempdir(), "scvi-sce-query"),
                        overwrite = TRUE)
  z <- SingleCellExperiment::reducedDim(out, "X_scVI")
  expect_identical(dim(z), c(300L, 4L))
  h <- S4Vectors::metadata(out)$X_scVI_training
  expect_identical(nrow(h$history), 3L)
  expect_true(all(is.finite(h$history$elbo_validation)))
  expect_identical(load_scvi_model(h$model_dir)$n_batch, 4L)
  unlink(h$model_dir, recursive = TRUE)
})

test_that("scvi_map_query saves the query model; it loads back with the same latent", {
  x <- sq_counts()
  obs <- sq_obs(x)
  tmp <- tempfile("scvi-save-")
  dir.create(tmp)
  on.exit(unlink(tmp, recursive = TRUE), add = TRUE)
  save <- file.path(tmp, "query")
  run <- function(...) {
    scvi_map_query(x, file.path(sq_dir, "scarches"), batch_key = "sample", obs = obs,
                   n_threads = 1, progress = FALSE, ...)
  }
  r <- run(max_epochs = 3, save_dir = save)
  expect_identical(r$model_dir, normalizePath(save))
  expect_identical(list.files(save, all.files = TRUE, no.. = TRUE), "model.pt")
  m <- load_scvi_model(save)
  expect_identical(m$batch_levels, c("b0", "b1", "q_a", "q_b"))
  expect_identical(m$n_batch, 4L)
  expect_identical(m$genes, load_scvi_model(file.path(sq_dir, "scarches"))$genes)
  z <- scvi_latent(x, m, batch_key = obs$sample, verbose = FALSE)
  expect_lt(max(abs(z - r$latent)), 1e-5)
  # an existing model.pt is refused before training unless overwrite = TRUE
  before <- file.info(file.path(save, "model.pt"))$mtime
  expect_error(run(max_epochs = 400, save_dir = save), class = "scannot_error_file")
  r2 <- run(max_epochs = 2, seed = 7, save_dir = save, overwrite = TRUE)
  z2 <- scvi_latent(x, load_scvi_model(save), batch_key = obs$sample, verbose = FALSE)
  expect_lt(max(abs(z2 - r2$latent)), 1e-5)
  expect_gt(max(abs(z2 - z)), 1e-4)
  # a file where the folder should be, a missing parent folder
  f <- file.path(tmp, "file")
  writeLines("x", f)
  expect_error(run(max_epochs = 1, save_dir = f), class = "scannot_error_file")
  expect_error(run(max_epochs = 1, save_dir = file.path(tmp, "no", "such")),
               class = "scannot_error_file")
  expect_error(run(max_epochs = 1, save_dir = save, overwrite = NA), class = "scannot_error_input")
  expect_null(run(max_epochs = 1)$model_dir)
})

test_that("scvi-tools loads the query model scannot saved and gets the same latent", {
  # r_query/model.pt: scvi_map_query(save_dir =) (tools/fixtures/scvi/write_r_query_model.R);
  # latent_py.csv: scvi-tools 1.4.2 SCVI.load(r_query, adata = query)
  # .get_latent_representation() (check_r_query_model.py)
  x <- sq_counts()
  m <- load_scvi_model(file.path(sq_dir, "r_query"))
  expect_identical(m$batch_levels, c("b0", "b1", "q_a", "q_b"))
  z <- scvi_latent(x, m, batch_key = sq_obs(x)$sample, verbose = FALSE)
  gold <- as.matrix(utils::read.csv(file.path(sq_dir, "r_query", "latent_py.csv"), row.names = 1))
  expect_identical(dim(z), dim(gold))
  expect_lt(max(abs(unname(z) - unname(gold))), 1e-5)
  # the trained batch columns matter: the reference's own encoder (new batches read as b1)
  # gives another latent
  ref <- scvi_latent(x, file.path(sq_dir, "scarches"), batch_key = rep("b1", ncol(x)),
                     verbose = FALSE)
  expect_gt(max(abs(unname(ref) - unname(gold))), 1e-3)
})

test_that("early stopping and unsupported models", {
  x <- sq_counts()
  r <- scvi_map_query(x, file.path(sq_dir, "scarches"), batch_key = "sample", obs = sq_obs(x),
                      max_epochs = 400, early_stopping = TRUE, early_stopping_patience = 2,
                      lr = 0.5, n_threads = 1, progress = FALSE)
  expect_true(r$stopped_early)
  expect_lt(nrow(r$history), 400)
  # (covariate references, their training and saved query models: test-scvi-query-covs.R)
  expect_error(scvi_map_query(x, file.path(sq_dir, "scarches"), batch_key = "sample",
                              obs = sq_obs(x), max_epochs = 0, progress = FALSE),
               class = "scannot_error_input")
})
