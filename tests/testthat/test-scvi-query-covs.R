# scArches surgery of a reference with extra covariates against scvi-tools 1.4.2: the `covs`
# reference (categorical cond, continuous score, encode_covariates, batch norm), the 300
# fixture cells relabelled b1 / q_b / q_a and cond 'z' of cells 201-300 relabelled 'w' (a new
# level), load_query_data(freeze_dropout=True) + train(max_epochs=60)
# (tools/fixtures/scvi/make_surgery_fixture.py ... covs surgery_covs).
cv_dir <- test_path("fixtures", "scvi")
cv_counts <- scvi_fixture_counts
cv_obs <- function(x) {
  n <- ncol(x)
  obs <- utils::read.csv(file.path(cv_dir, "obs.csv"), row.names = 1)[colnames(x), ]
  cond <- obs$cond
  cond[seq_len(n) > 200 & cond == "z"] <- "w"
  data.frame(sample = ifelse(seq_len(n) <= 100, "b1", ifelse(seq_len(n) <= 200, "q_b", "q_a")),
             cond = cond, score = obs$score, row.names = colnames(x))
}
cv_rms <- function(a, b) sqrt(mean((a - b)^2))

test_that("query training with extra covariates reaches scvi-tools' ELBO and latent", {
  x <- cv_counts()
  obs <- cv_obs(x)
  hist <- utils::read.csv(file.path(cv_dir, "surgery_covs", "history.csv"))
  r <- scvi_map_query(x, file.path(cv_dir, "covs"), batch_key = "sample", obs = obs,
                      max_epochs = nrow(hist), early_stopping = FALSE, seed = 1,
                      n_threads = 2, progress = FALSE)
  expect_identical(r$batch_levels, c("b0", "b1", "q_a", "q_b"))
  expect_identical(dim(r$latent), c(300L, 4L))
  expect_identical(nrow(r$history), nrow(hist))
  # our own random split: train ELBO to 1 %, validation (30 other cells) roughly; the
  # same-split check is the Rust test covs_surgery_training_reaches_scvi_tools_elbo
  expect_history_elbo_close(r$history, hist)
})

test_that("from scvi-tools' own padded query model the latent follows scvi-tools'", {
  # the encoder's covariate columns train, so the latent moves. From the reference, the new
  # columns (appended after all reference columns: cond y, z, w are fresh) are drawn by
  # scannot's RNG, not torch's; starting from surgery_covs/init (torch's padded weights, no
  # new levels) the trained latent is close to scvi-tools' (different split and noise)
  x <- cv_counts()
  obs <- cv_obs(x)
  init <- load_scvi_model(file.path(cv_dir, "surgery_covs", "init"))
  r <- scvi_map_query(x, init, batch_key = "sample", obs = obs, max_epochs = 60,
                      early_stopping = FALSE, seed = 1, n_threads = 2, progress = FALSE)
  expect_identical(r$batch_levels, c("b0", "b1", "q_a", "q_b"))
  gold <- as.matrix(utils::read.csv(file.path(cv_dir, "surgery_covs", "latent.csv"),
                                    row.names = 1))
  z0 <- scvi_latent(x, init, batch_key = obs$sample, covariates = obs[c("cond", "score")],
                    n_threads = 1)
  expect_gt(cv_rms(z0, gold), 0.02)
  expect_lt(cv_rms(r$latent, gold), 0.5 * cv_rms(z0, gold))
})

test_that("covariate query training needs the covariates", {
  x <- cv_counts()
  obs <- cv_obs(x)
  expect_error(scvi_map_query(x, file.path(cv_dir, "covs"), batch_key = "sample",
                              obs = obs[c("sample", "cond")], max_epochs = 1, progress = FALSE),
               class = "scannot_error")
})

# scvi-tools 1.4.2 (SCVI.load) on a query model written here: check_r_query_model.py in a
# Python with scvi-tools (SCANNOT_SCVI_PYTHON, default the fixture venv); NULL when either is
# missing
cv_python <- function() {
  py <- Sys.getenv("SCANNOT_SCVI_PYTHON", "/tmp/scannot-scvi-venv/bin/python")
  script <- test_path("..", "..", "tools", "fixtures", "scvi", "check_r_query_model.py")
  if (!nzchar(py) || !file.exists(py) || !file.exists(script)) return(NULL)
  ok <- suppressWarnings(system2(py, c("-c", shQuote("import scvi")), stdout = FALSE,
                                 stderr = FALSE))
  if (!identical(ok, 0L)) return(NULL)
  list(python = py, script = normalizePath(script))
}

test_that("the query model of a covariate reference saves and loads back with its latent", {
  x <- cv_counts()
  obs <- cv_obs(x)
  tmp <- tempfile("scvi-covs-query")
  on.exit(unlink(tmp, recursive = TRUE), add = TRUE)
  save_dir <- file.path(tmp, "r_query_covs")
  dir.create(tmp)
  # 30 epochs: the history check_r_query_model.py expects
  r <- scvi_map_query(x, file.path(cv_dir, "covs"), batch_key = "sample", obs = obs,
                      max_epochs = 30, early_stopping = FALSE, seed = 1, n_threads = 2,
                      progress = FALSE, save_dir = save_dir)
  expect_identical(r$model_dir, normalizePath(save_dir))
  expect_identical(list.files(save_dir, all.files = TRUE, no.. = TRUE), "model.pt")
  m <- load_scvi_model(save_dir)
  ref <- load_scvi_model(file.path(cv_dir, "covs"))
  expect_identical(m$batch_levels, c("b0", "b1", "q_a", "q_b"))
  expect_identical(m$categorical_covariates, list(cond = c("x", "y", "z", "w")))
  expect_identical(m$continuous_covariates, "score")
  expect_identical(m$genes, ref$genes)
  expect_true(m$encoder_uses_covariates)
  z <- scvi_latent(x, m, batch_key = obs$sample, covariates = obs[c("cond", "score")],
                   n_threads = 1)
  expect_identical(dim(z), dim(r$latent))
  expect_lt(max(abs(unname(z) - unname(r$latent))), 1e-5)
  # the trained columns of the new level are in the file: read as 'z', the cells of 'w' move
  as_z <- obs[c("cond", "score")]
  as_z$cond[as_z$cond == "w"] <- "z"
  zz <- scvi_latent(x, m, batch_key = obs$sample, covariates = as_z, n_threads = 1)
  w <- obs$cond == "w"
  expect_gt(max(abs(zz[w, ] - z[w, ])), 1e-4)
  expect_lt(max(abs(zz[!w, ] - z[!w, ])), 1e-12)
  # the saved query model is a reference again: a further query with one more cond level
  obs2 <- obs
  obs2$cond[151:300] <- "v"
  r2 <- scvi_map_query(x, m, batch_key = "sample", obs = obs2, max_epochs = 2,
                       early_stopping = FALSE, seed = 2, n_threads = 2, progress = FALSE,
                       save_dir = file.path(tmp, "again"))
  m2 <- load_scvi_model(r2$model_dir)
  expect_identical(m2$categorical_covariates, list(cond = c("x", "y", "z", "w", "v")))
  expect_identical(m2$batch_levels, m$batch_levels)
  z2 <- scvi_latent(x, m2, batch_key = obs2$sample, covariates = obs2[c("cond", "score")],
                    n_threads = 1)
  expect_lt(max(abs(unname(z2) - unname(r2$latent))), 1e-5)

  # scvi-tools loads the model just written and gets the same latent (Python part)
  py <- cv_python()
  skip_if(is.null(py), "no Python with scvi-tools (SCANNOT_SCVI_PYTHON) or no checker script")
  file.copy(file.path(cv_dir, c("counts.csv", "obs.csv")), tmp)
  out <- suppressWarnings(system2(py$python, shQuote(c(py$script, tmp, "r_query_covs")),
                                  stdout = TRUE, stderr = TRUE))
  expect_null(attr(out, "status"), info = paste(utils::tail(out, 20), collapse = "\n"))
  gold <- as.matrix(utils::read.csv(file.path(save_dir, "latent_py.csv"), row.names = 1))
  expect_identical(dim(gold), dim(z))
  expect_lt(max(abs(unname(z) - unname(gold))), 1e-5)
})

test_that("scvi-tools loads the covariate query model scannot saved and gets its latent", {
  # r_query_covs/model.pt: scvi_map_query(save_dir =) on the `covs` reference
  # (tools/fixtures/scvi/write_r_query_model.R ... covs r_query_covs); latent_py.csv:
  # scvi-tools 1.4.2 SCVI.load(r_query_covs, adata = query).get_latent_representation()
  # (check_r_query_model.py ... r_query_covs), which also trains it on and maps a further
  # query with a new batch and a new cond level
  x <- cv_counts()
  obs <- cv_obs(x)
  m <- load_scvi_model(file.path(cv_dir, "r_query_covs"))
  expect_identical(m$batch_levels, c("b0", "b1", "q_a", "q_b"))
  expect_identical(m$categorical_covariates, list(cond = c("x", "y", "z", "w")))
  z <- scvi_latent(x, m, batch_key = obs$sample, covariates = obs[c("cond", "score")],
                   verbose = FALSE)
  gold <- as.matrix(utils::read.csv(file.path(cv_dir, "r_query_covs", "latent_py.csv"),
                                    row.names = 1))
  expect_identical(dim(z), dim(gold))
  expect_lt(max(abs(unname(z) - unname(gold))), 1e-5)
  # the trained covariate columns matter: the reference's encoder gives another latent
  ref <- scvi_latent(x, file.path(cv_dir, "covs"), batch_key = rep("b1", ncol(x)),
                     covariates = data.frame(cond = sub("w", "z", obs$cond), score = obs$score),
                     verbose = FALSE)
  expect_gt(max(abs(unname(ref) - unname(gold))), 1e-3)
})
