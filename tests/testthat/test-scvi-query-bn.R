# scArches surgery of a batch-norm model (scvi-tools defaults: BatchNorm in encoder and
# decoder, batch not encoded) against scvi-tools 1.4.2: the `default` reference, the 300
# fixture cells relabelled b1 / q_b / q_a, load_query_data(freeze_dropout=True) +
# train(max_epochs=60) (tools/fixtures/scvi/make_surgery_fixture.py ... default surgery_bn).
bn_dir <- test_path("fixtures", "scvi")
bn_counts <- scvi_fixture_counts
bn_obs <- scvi_query_obs

test_that("batch-norm query training reaches scvi-tools' ELBO; the latent is scvi-tools'", {
  x <- bn_counts()
  hist <- utils::read.csv(file.path(bn_dir, "surgery_bn", "history.csv"))
  save_dir <- file.path(tempdir(), "scvi-bn-query")
  r <- scvi_map_query(x, file.path(bn_dir, "default"), batch_key = "sample", obs = bn_obs(x),
                      max_epochs = nrow(hist), early_stopping = FALSE, seed = 1,
                      n_threads = 2, progress = FALSE, save_dir = save_dir, overwrite = TRUE)
  expect_identical(r$batch_levels, c("b0", "b1", "q_a", "q_b"))
  expect_identical(dim(r$latent), c(300L, 4L))
  expect_identical(nrow(r$history), nrow(hist))
  # our own random split: the train ELBO is comparable to 1 %, the validation ELBO (30
  # other cells) roughly; the same-split check is the Rust test
  # bn_surgery_training_reaches_scvi_tools_elbo
  expect_history_elbo_close(r$history, hist)
  # the encoder is frozen (batch not encoded, encoder batch norm frozen): the latent after
  # training is scvi-tools' to float precision
  gold <- as.matrix(utils::read.csv(file.path(bn_dir, "surgery_bn", "latent.csv"),
                                    row.names = 1))
  expect_lt(max(abs(r$latent - gold)), 1e-4)
  # the saved query model loads back; its batch norm still gives the same latent
  m <- load_scvi_model(save_dir)
  expect_identical(m$n_batch, 4L)
  z <- scvi_latent(x, m, batch_key = bn_obs(x)$sample, n_threads = 1)
  expect_lt(max(abs(z - r$latent)), 1e-5)
  unlink(save_dir, recursive = TRUE)
})

test_that("scvi-tools loads the batch-norm query model scannot saved and gets its latent", {
  # r_query_bn/model.pt: scvi_map_query(save_dir =) on the `default` reference
  # (tools/fixtures/scvi/write_r_query_model.R ... default r_query_bn); latent_py.csv:
  # scvi-tools 1.4.2 SCVI.load(r_query_bn, adata = query).get_latent_representation()
  # (check_r_query_model.py ... r_query_bn), which also trains it on and maps a further query
  x <- bn_counts()
  m <- load_scvi_model(file.path(bn_dir, "r_query_bn"))
  expect_identical(m$batch_levels, c("b0", "b1", "q_a", "q_b"))
  expect_identical(m$use_batch_norm, "both")
  z <- scvi_latent(x, m, batch_key = bn_obs(x)$sample, verbose = FALSE)
  gold <- as.matrix(utils::read.csv(file.path(bn_dir, "r_query_bn", "latent_py.csv"),
                                    row.names = 1))
  expect_identical(dim(z), dim(gold))
  expect_lt(max(abs(unname(z) - unname(gold))), 1e-5)
})
