# Shared by the scVI query-training tests: the 300 fixture cells (genes x cells dgCMatrix)
# of tests/testthat/fixtures/scvi/counts.csv, and their relabelling into one reference batch
# (b1) and two new query batches (q_b, q_a) used by make_surgery_fixture.py.
scvi_fixture_counts <- function() {
  counts <- utils::read.csv(test_path("fixtures", "scvi", "counts.csv"), row.names = 1,
                            check.names = FALSE)
  x <- t(as.matrix(counts))
  storage.mode(x) <- "double"
  methods::as(x, "CsparseMatrix")
}
scvi_query_obs <- function(x) {
  n <- ncol(x)
  data.frame(sample = ifelse(seq_len(n) <= 100, "b1", ifelse(seq_len(n) <= 200, "q_b", "q_a")),
             row.names = colnames(x))
}

# A query run's ELBO against scvi-tools' history (history.csv of the fixture): the mean of
# the last 10 epochs, train ELBO within 1 %, validation ELBO within 10 % (30 other cells:
# the split is our own, so only roughly comparable).
expect_history_elbo_close <- function(history, hist) {
  last <- function(v) mean(utils::tail(v, 10))
  expect_lt(abs(last(history$elbo_train) / last(hist$elbo_train) - 1), 0.01)
  expect_lt(abs(last(history$elbo_validation) / last(hist$elbo_validation) - 1), 0.1)
}
