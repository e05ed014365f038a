# CellTypist training and model files (spec sections 4.4 and 4.5).

#' Train a CellTypist model
#'
#' Trains a model the way `celltypist.train()` (celltypist 1.7) does, and returns the
#' same model object as [load_celltypist_model()], ready for [annotate_celltypist()]
#' or [write_celltypist_model()]:
#'
#' 1. genes with no expression in the training cells are dropped;
#' 2. each gene is standardised as scikit-learn's `StandardScaler` does (population
#'    variance; constant genes get scale 1; centring only with `with_mean = TRUE`), and
#'    scaled values are clipped at +10 (no lower clip);
#' 3. a one-vs-rest L2-regularised logistic regression is fitted for each cell type
#'    (a single row for two cell types), minimising `mean(log-loss) + |w|^2 / (2 C n)`
#'    with an unpenalised intercept, by L-BFGS with scikit-learn's stopping rule (largest
#'    gradient component `<= 1e-4`, or no relative progress, or `max_iter` iterations);
#'    or, with `use_SGD = TRUE`, by stochastic gradient descent as scikit-learn's
#'    `SGDClassifier(loss = "log_loss")` (learning rate `"optimal"`, L2 penalty `alpha`,
#'    tolerance `1e-3` over 5 epochs), optionally on `epochs` random mini-batch rounds of
#'    `batch_number` batches of `batch_size` cells (`mini_batch = TRUE`, with cell types
#'    sampled equally often when `balance_cell_type = TRUE`);
#' 4. with `feature_selection = TRUE`, a first SGD model picks, per cell type, the
#'    `top_genes` genes with the largest absolute coefficients, and the final model is
#'    refitted on their union (the scaler is subset, not refitted, as in CellTypist).
#'
#' The scaled matrix is never formed (CellTypist densifies the whole training set): the
#' products use the sparse data plus a rank-one correction, and all cell types are
#' fitted in one pass over the data per iteration. Random steps (SGD order, mini-batches)
#' use `seed`, so results are reproducible (CellTypist's are not seeded).
#'
#' @param object A Seurat object, a SingleCellExperiment, or a genes x cells `dgCMatrix`
#'   / numeric matrix with gene symbols as row names: log1p-normalised to 10,000 counts
#'   per cell, all genes (or raw counts with `normalize = TRUE`).
#' @param labels A cell metadata column name, or one cell-type label per cell.
#' @param ... Passed to methods (`assay`, `layer`).
#' @param genes Genes to train on (row names); `NULL` for all.
#' @param normalize Treat the input as raw counts and log1p-normalise it first.
#' @param check_expression Check, as CellTypist does, that the first cell's
#'   `sum(expm1(x))` is 10,000 (± 1); an error otherwise.
#' @param C Inverse L2 regularisation strength of the logistic regression.
#' @param max_iter Most L-BFGS iterations (or SGD epochs); `NULL` for CellTypist's rule
#'   (1000 below 50,000 cells, 500 below 500,000, else 200).
#' @param use_SGD Fit by stochastic gradient descent.
#' @param alpha L2 strength of SGD.
#' @param mini_batch,batch_number,batch_size,epochs Mini-batch SGD: `epochs` rounds, each
#'   of `batch_number` batches of `batch_size` cells drawn without replacement.
#' @param balance_cell_type Mini-batch sampling probability inversely proportional to the
#'   cell type's frequency.
#' @param feature_selection,top_genes Two-round training on the union of each cell type's
#'   `top_genes` genes.
#' @param with_mean Centre the genes before scaling.
#' @param details,url,source,version,date Description fields stored in the model
#'   (`date` defaults to now).
#' @param seed Seed of the random steps.
#' @param n_threads Number of threads (see [scannot_threads()]).
#' @param assay,layer Seurat: assay and layer (default `"data"`); SingleCellExperiment:
#'   assay (default `"logcounts"`).
#' @return A `scannot_celltypist_model` (see [load_celltypist_model()]) with, in addition,
#'   `scaler$var` and `fit` (`C`, `max_iter`, `n_iter`, `alpha`, `t`, `n_samples_seen`).
#' @seealso [annotate_celltypist()], [write_celltypist_model()]
#' @export
#' @examples
#' sim <- simulate_counts(n_cells = 300, n_genes = 200, n_types = 3, seed = 1, as = "list")
#' x <- normalize_counts(sim$counts)
#' model <- train_celltypist(x, sim$cells$cell_type, max_iter = 100)
#' model
#' table(annotate_celltypist(x, model)$predicted_labels, sim$cells$cell_type)
train_celltypist <- function(object, labels, ...) UseMethod("train_celltypist")

#' @rdname train_celltypist
#' @export
train_celltypist.default <- function(object, labels, ..., genes = NULL, normalize = FALSE,
                                     check_expression = TRUE, C = 1, max_iter = NULL,
                                     use_SGD = FALSE, alpha = 1e-4, mini_batch = FALSE,
                                     batch_number = 100, batch_size = 1000, epochs = 10,
                                     balance_cell_type = FALSE, feature_selection = FALSE,
                                     top_genes = 300, with_mean = TRUE, details = "", url = "",
                                     source = "", version = "", date = NULL, seed = 1,
                                     n_threads = NULL) {
  call <- rlang::current_env()
  rlang::check_dots_empty(call = call)
  celltypist_train_run(object, NULL, labels, genes, normalize, check_expression, C, max_iter,
                       use_SGD, alpha, mini_batch, batch_number, batch_size, epochs,
                       balance_cell_type, feature_selection, top_genes, with_mean,
                       list(date = date, details = details, url = url, source = source,
                            version = version), seed, n_threads, call)
}

#' @rdname train_celltypist
#' @export
train_celltypist.Seurat <- function(object, labels, ..., assay = NULL, layer = "data",
                                    genes = NULL, normalize = FALSE, check_expression = TRUE,
                                    C = 1, max_iter = NULL, use_SGD = FALSE, alpha = 1e-4,
                                    mini_batch = FALSE, batch_number = 100, batch_size = 1000,
                                    epochs = 10, balance_cell_type = FALSE,
                                    feature_selection = FALSE, top_genes = 300,
                                    with_mean = TRUE, details = "", url = "", source = "",
                                    version = "", date = NULL, seed = 1, n_threads = NULL) {
  call <- rlang::current_env()
  rlang::check_dots_empty(call = call)
  e <- get_expression(object, assay = assay, layer = layer)
  celltypist_train_run(e$matrix, e$cells, labels, genes, normalize, check_expression, C,
                       max_iter, use_SGD, alpha, mini_batch, batch_number, batch_size, epochs,
                       balance_cell_type, feature_selection, top_genes, with_mean,
                       list(date = date, details = details, url = url, source = source,
                            version = version), seed, n_threads, call)
}

#' @rdname train_celltypist
#' @export
train_celltypist.SummarizedExperiment <- function(object, labels, ..., assay = "logcounts",
                                                  genes = NULL, normalize = FALSE,
                                                  check_expression = TRUE, C = 1,
                                                  max_iter = NULL, use_SGD = FALSE,
                                                  alpha = 1e-4, mini_batch = FALSE,
                                                  batch_number = 100, batch_size = 1000,
                                                  epochs = 10, balance_cell_type = FALSE,
                                                  feature_selection = FALSE, top_genes = 300,
                                                  with_mean = TRUE, details = "", url = "",
                                                  source = "", version = "", date = NULL,
                                                  seed = 1, n_threads = NULL) {
  call <- rlang::current_env()
  rlang::check_dots_empty(call = call)
  e <- get_expression(object, assay = assay)
  celltypist_train_run(e$matrix, e$cells, labels, genes, normalize, check_expression, C,
                       max_iter, use_SGD, alpha, mini_batch, batch_number, batch_size, epochs,
                       balance_cell_type, feature_selection, top_genes, with_mean,
                       list(date = date, details = details, url = url, source = source,
                            version = version), seed, n_threads, call)
}

check_count <- function(x, arg, min, call) {
  if (!is.numeric(x) || length(x) != 1L || is.na(x) || x < min || x != round(x) || x > .Machine$integer.max) {
    abort_scannot(sprintf("`%s` must be a whole number >= %d.", arg, min), "input", call = call)
  }
  as.integer(x)
}

celltypist_train_run <- function(m, cells, labels, genes, normalize, check_expression, C,
                                 max_iter, use_SGD, alpha, mini_batch, batch_number,
                                 batch_size, epochs, balance_cell_type, feature_selection,
                                 top_genes, with_mean, description, seed, n_threads, call) {
  normalize <- check_flag(normalize, call = call)
  check_expression <- check_flag(check_expression, call = call)
  use_SGD <- check_flag(use_SGD, call = call)
  mini_batch <- check_flag(mini_batch, call = call)
  balance_cell_type <- check_flag(balance_cell_type, call = call)
  feature_selection <- check_flag(feature_selection, call = call)
  with_mean <- check_flag(with_mean, call = call)
  C <- check_number(C, call = call)
  alpha <- check_number(alpha, call = call)
  if (!(C > 0)) abort_scannot("`C` must be positive.", "input", call = call)
  if (!(alpha > 0)) abort_scannot("`alpha` must be positive.", "input", call = call)
  seed <- check_number(seed, call = call)
  if (seed < 0 || seed != round(seed)) {
    abort_scannot("`seed` must be a whole number >= 0.", "input", call = call)
  }
  batch_number <- check_count(batch_number, "batch_number", 1L, call)
  batch_size <- check_count(batch_size, "batch_size", 1L, call)
  epochs <- check_count(epochs, "epochs", 1L, call)
  top_genes <- check_count(top_genes, "top_genes", 1L, call)
  m <- as_expr_matrix(m, call = call)
  if (is.null(rownames(m))) {
    abort_scannot("The expression matrix needs gene symbols as row names (they become the model's features).",
                  "input", call = call)
  }
  n <- ncol(m)
  g <- cell_groups(cells, labels, n, call = call)
  g <- factor(as.character(g), levels = sort(levels(g), method = "radix"))
  if (nlevels(g) < 2L) {
    abort_scannot("Training needs at least two cell types in `labels`.", "groups", call = call)
  }
  max_iter <- if (is.null(max_iter)) {
    if (n < 50000) 1000L else if (n < 500000) 500L else 200L
  } else {
    check_count(max_iter, "max_iter", 1L, call)
  }
  rows <- if (is.null(genes)) {
    seq_len(nrow(m))
  } else {
    if (!is.character(genes) || anyNA(genes)) {
      abort_scannot("`genes` must be a character vector of row names.", "input", call = call)
    }
    r <- match(unique(genes), rownames(m))
    if (anyNA(r)) {
      abort_scannot(sprintf("%d of `genes` are not row names of the data, e.g. '%s'.",
                            sum(is.na(r)), unique(genes)[is.na(r)][1]), "input", call = call)
    }
    r
  }
  threads <- scannot_threads(n_threads)
  if (normalize) m <- normalize_counts(m, n_threads = threads)
  if (check_expression && n > 0L) {
    s <- sum(expm1(m[, 1]))
    if (abs(s - 1e4) > 1) {
      abort_scannot(sprintf(paste0(
        "Invalid expression matrix: the first cell's expm1 sum is %.6g, not 10,000. ",
        "CellTypist trains on ALL genes log1p-normalised to 10,000 counts per cell: use ",
        "normalize_counts() on the raw counts, or `normalize = TRUE` (or ",
        "`check_expression = FALSE` if you know what you are doing)."), s),
        "input", call = call)
    }
  }
  a <- matrix_args(m)
  r <- rs_call(rs_celltypist_train(
    a$p, a$i, a$x, a$nrow, a$ncol, a$dense, as.integer(rows), as.integer(g), nlevels(g),
    with_mean, use_SGD, C, max_iter, alpha, mini_batch, batch_number, batch_size, epochs,
    balance_cell_type, feature_selection, top_genes, seed, threads), call = call)
  classes <- levels(g)
  features <- rownames(m)[r$genes]
  coef <- matrix(r$coef, nrow = r$n_rows,
                 dimnames = list(if (r$n_rows == 1L) classes[2] else classes, features))
  if (is.null(description$date)) description$date <- format(Sys.time(), "%Y-%m-%d %H:%M:%OS6")
  description <- lapply(description, function(v) {
    if (!is.character(v) || length(v) != 1L || is.na(v)) {
      abort_scannot("`details`, `url`, `source`, `version` and `date` must be single strings.",
                    "input", call = call)
    }
    v
  })
  description$number_celltypes <- as.character(length(classes))
  structure(list(
    cell_types = classes,
    features = features,
    coef = coef,
    intercept = stats::setNames(r$intercept, rownames(coef)),
    scaler = list(mean = r$mean, scale = r$scale, with_mean = with_mean, var = r$var),
    classifier = if (use_SGD) "SGDClassifier" else "LogisticRegression",
    description = description,
    sklearn_version = "1.6.1",
    fit = list(C = C, max_iter = max_iter, n_iter = r$n_iter, alpha = alpha, t = r$t,
               n_samples_seen = n)
  ), class = "scannot_celltypist_model")
}

#' Write a CellTypist model file
#'
#' Writes `model` as a CellTypist `.pkl` that Python's celltypist (1.7, scikit-learn 1.6)
#' loads with `celltypist.models.Model.load()` and predicts with exactly as
#' [annotate_celltypist()] does: a pickle (protocol 4) of `{'Model': LogisticRegression
#' or SGDClassifier, 'Scaler_': StandardScaler, 'description': dict}` with numpy arrays
#' pickled as numpy does. The file is written to a temporary file first and then renamed,
#' so an existing file is never left half-written.
#'
#' @param model A model from [train_celltypist()] or [load_celltypist_model()].
#' @param path Path of the `.pkl` file to write.
#' @return `path`, invisibly.
#' @seealso [train_celltypist()], [load_celltypist_model()]
#' @export
#' @examples
#' sim <- simulate_counts(n_cells = 200, n_genes = 100, n_types = 2, seed = 1, as = "list")
#' model <- train_celltypist(normalize_counts(sim$counts), sim$cells$cell_type, max_iter = 50)
#' f <- tempfile(fileext = ".pkl")
#' write_celltypist_model(model, f)
#' identical(load_celltypist_model(f)$coef, model$coef)
write_celltypist_model <- function(model, path) {
  call <- rlang::current_env()
  if (!inherits(model, "scannot_celltypist_model")) {
    abort_scannot("`model` must be a model from train_celltypist() or load_celltypist_model().",
                  "input", call = call)
  }
  path <- check_string(path, call = call)
  dir <- dirname(path.expand(path))
  if (!dir.exists(dir)) {
    abort_scannot(sprintf("The folder '%s' does not exist.", dir), "input", call = call)
  }
  fit <- model$fit
  num <- function(v, default) if (is.null(v) || length(v) == 0L || anyNA(v)) default else v
  d <- model$description
  if (is.null(d)) d <- list()
  d <- d[!vapply(d, is.null, logical(1))]
  d_vals <- vapply(d, function(v) as.character(v)[1], character(1))
  var <- model$scaler$var
  rs_call(rs_celltypist_write(
    path.expand(path), model$classifier, as.character(model$cell_types),
    as.character(model$features), nrow(model$coef), as.double(model$coef),
    as.double(model$intercept), as.double(model$scaler$mean), as.double(model$scaler$scale),
    if (is.null(var)) double() else as.double(var), isTRUE(model$scaler$with_mean),
    as.double(num(fit$n_samples_seen, 0)), as.double(num(fit$C, 1)),
    as.integer(num(fit$max_iter, 1000L)), as.integer(num(fit$n_iter, 0L)),
    as.double(num(fit$alpha, 1e-4)), as.double(num(fit$t, 1)),
    if (is.null(names(d_vals))) character() else names(d_vals), unname(d_vals)), call = call)
  invisible(path)
}
