# CellTypist: safe model loading, identical predictions, majority voting (spec section 4).

#' Load a CellTypist model file
#'
#' Reads a CellTypist `.pkl` model (as written by `celltypist.train()` /
#' `Model.write()`, or downloaded from celltypist.org) **without executing it**: the
#' pickle is decoded by scannot's own reader, which never imports or calls anything
#' named in the file (Python's `pickle.load`, which celltypist uses, can run arbitrary
#' code). Files from numpy 1.x and 2.x, pickle protocols 2 to 5, scikit-learn
#' `LogisticRegression` and `SGDClassifier`, and binary models are supported.
#'
#' The result is a plain R object (matrices and vectors), safe to `saveRDS()`.
#'
#' @param path Path to the `.pkl` file.
#' @return An object of class `scannot_celltypist_model`: a list with `cell_types`,
#'   `features`, `coef` (a matrix, one row per class, or one row for a binary model),
#'   `intercept`, `scaler` (`mean`, `scale`, `with_mean`), `classifier`,
#'   `description` (named list) and `sklearn_version`.
#' @seealso [annotate_celltypist()]
#' @export
#' @examples
#' \dontrun{
#' model <- load_celltypist_model("Immune_All_Low.pkl")
#' model
#' }
load_celltypist_model <- function(path) {
  call <- rlang::current_env()
  path <- check_string(path)
  if (!file.exists(path)) {
    abort_scannot(sprintf("Model file '%s' does not exist. Give the path to a CellTypist .pkl file.", path),
                  "input", call = call)
  }
  r <- rs_call(rs_celltypist_read(path.expand(path)), call = call)
  coef <- matrix(r$coef, nrow = r$n_rows,
                 dimnames = list(if (r$n_rows == 1L && length(r$classes) == 2L) r$classes[2] else r$classes,
                                 r$features))
  structure(list(
    cell_types = r$classes,
    features = r$features,
    coef = coef,
    intercept = stats::setNames(r$intercept, rownames(coef)),
    scaler = list(mean = r$scaler_mean, scale = r$scaler_scale, with_mean = r$with_mean),
    classifier = r$classifier,
    description = stats::setNames(as.list(r$description_values), r$description_keys),
    sklearn_version = r$sklearn_version
  ), class = "scannot_celltypist_model")
}

#' Print a CellTypist model
#' @param x A `scannot_celltypist_model`.
#' @param ... Ignored.
#' @return `x`, invisibly.
#' @method print scannot_celltypist_model
#' @export
print.scannot_celltypist_model <- function(x, ...) {
  ct <- x$cell_types
  cat(sprintf("CellTypist model (%s, scikit-learn %s): %d cell types, %d features%s\n",
              x$classifier, if (nzchar(x$sklearn_version)) x$sklearn_version else "?",
              length(ct), length(x$features),
              if (nrow(x$coef) == 1L) " (binary)" else ""))
  show <- if (length(ct) > 8) c(utils::head(ct, 8), "...") else ct
  cat("  cell types:", paste(show, collapse = ", "), "\n")
  fs <- if (length(x$features) > 6) c(utils::head(x$features, 6), "...") else x$features
  cat("  features:  ", paste(fs, collapse = ", "), "\n")
  d <- x$description
  for (k in intersect(c("details", "source", "version", "date"), names(d))) {
    if (nzchar(d[[k]])) cat(sprintf("  %s: %s\n", k, d[[k]]))
  }
  invisible(x)
}

check_celltypist_model <- function(model, call) {
  if (is.character(model) && length(model) == 1L) {
    return(load_celltypist_model(model))
  }
  if (!inherits(model, "scannot_celltypist_model")) {
    abort_scannot("`model` must be a model from load_celltypist_model() or the path to a CellTypist .pkl file.",
                  "input", call = call)
  }
  model
}

#' Annotate cells with a CellTypist model
#'
#' Predicts cell types exactly as `celltypist.annotate()` does (celltypist 1.7):
#' query genes are matched to the model features by exact name (after making
#' duplicated names unique as anndata does), expression is scaled with the model's
#' scaler and clipped at +10 (no lower clip; model genes missing from the data act as
#' the training mean), decision scores are `X' coef^T + intercept` and probabilities
#' the logistic sigmoid of each score (they do not sum to 1). Sparse matrices are never
#' densified.
#'
#' The data must be log1p-normalised to 10,000 counts per cell, with all genes (Seurat's
#' default `NormalizeData()`, or [normalize_counts()]); as in CellTypist, the first 1000
#' cells must lie in `[0, 9.22]` (an error otherwise) and a warning is given when the
#' first cell's `sum(expm1(x))` is not 10,000 ± 1. With `normalize = TRUE` the input is
#' taken as raw counts and normalised first.
#'
#' **Majority voting** relabels each over-cluster by its most frequent predicted label
#' (ties go to the alphabetically first label, by code point as in Python; a cluster
#' whose top share is below `min_prop` becomes `"Heterogeneous"`). Give the
#' over-clustering with `over_clustering` (a metadata column name or one label per
#' cell), for example a high-resolution `Seurat::FindClusters()` result; with the same
#' over-clustering the vote is identical to CellTypist's. Without it, an over-clustering
#' is built as CellTypist does, with CellTypist's resolution rule (Leiden, modularity,
#' resolution 5 below 5,000 cells, 10 below 20,000, 15 below 40,000, 20 below 100,000, 25
#' below 200,000, else 30; seeded, so labels are reproducible) on the object's own
#' neighbour graph (a Seurat `Graphs()` entry, `<assay>_snn` first) or, when there is none,
#' on a 10-nearest-neighbour graph of 50 principal components (SingleCellExperiment
#' `reducedDim(, "PCA")`, else computed from the 2,500 most variable genes, scaled and
#' clipped at 10). This needs the igraph package. Python's pipeline (scanpy PCA, UMAP
#' connectivities, igraph Leiden) cannot be reproduced bit for bit, so these clusters are
#' similar to, not identical with, CellTypist's. With 50 cells or fewer no vote is done
#' (with a warning), as in CellTypist.
#'
#' @param object A Seurat object, a SingleCellExperiment, or a genes x cells
#'   `dgCMatrix` / numeric matrix with gene symbols as row names.
#' @param model A model from [load_celltypist_model()], or the path to a `.pkl` file.
#' @param ... Passed to methods (`assay`, `layer`).
#' @param mode `"best match"` (the class with the largest score) or `"prob match"`
#'   (every class with probability > `p_thres`, joined by `"|"`, or `"Unassigned"`).
#' @param p_thres Probability threshold for `"prob match"`.
#' @param majority_voting Whether to vote within over-clusters.
#' @param over_clustering Metadata column name, or a vector with one cluster label per
#'   cell; `NULL` builds one (see Details).
#' @param min_prop Minimum share of the dominant label in an over-cluster; below it
#'   (strictly) the cluster is `"Heterogeneous"`.
#' @param conf_by `"predicted_labels"`: `conf_score` is each cell's largest
#'   probability; `"majority_voting"`: the probability of the majority label (the
#'   largest probability when that label is not a class, e.g. `"Heterogeneous"`).
#' @param normalize Treat the input as raw counts and log1p-normalise it to 10,000
#'   counts per cell first.
#' @param return_probabilities Also return the probability and decision-score
#'   matrices (cells x cell types): attributes `"probability"` and `"decision"` of the
#'   data frame for matrices; `misc` (Seurat) or `metadata()` (SingleCellExperiment)
#'   entries `<prefix>probability` and `<prefix>decision`.
#' @param prefix Prefix of the added metadata columns.
#' @param n_threads Number of threads (see [scannot_threads()]).
#' @param BPPARAM `NULL` (default: in process) or a BiocParallel parameter object: cells
#'   are split into blocks predicted in worker processes, with the same result. An
#'   out-of-core `object` (a `DelayedMatrix`, [open_h5ad_matrix()]) is read in cell
#'   blocks either way (see [scannot_scale_out]).
#' @param assay,layer Seurat: assay and layer (default `"data"`); SingleCellExperiment:
#'   assay (default `"logcounts"`).
#' @return For a matrix, a data frame with one row per cell: `predicted_labels`,
#'   `conf_score` and, with voting, `over_clustering` and `majority_voting`. For Seurat
#'   and SingleCellExperiment objects, the object with these columns (prefixed) added
#'   to the cell metadata.
#' @seealso [load_celltypist_model()]
#' @export
#' @examples
#' \dontrun{
#' model <- load_celltypist_model("Immune_All_Low.pkl")
#' seu <- annotate_celltypist(seu, model, majority_voting = TRUE,
#'                            over_clustering = "seurat_clusters")
#' table(seu$celltypist_majority_voting)
#' }
annotate_celltypist <- function(object, model, ...) UseMethod("annotate_celltypist")

#' @rdname annotate_celltypist
#' @export
annotate_celltypist.default <- function(object, model, ..., mode = c("best match", "prob match"),
                                        p_thres = 0.5, majority_voting = FALSE,
                                        over_clustering = NULL, min_prop = 0,
                                        conf_by = c("predicted_labels", "majority_voting"),
                                        normalize = FALSE, return_probabilities = FALSE,
                                        prefix = "", n_threads = NULL, BPPARAM = NULL) {
  call <- rlang::current_env()
  rlang::check_dots_empty(call = call)
  e <- get_expression(object, delayed = TRUE)
  res <- celltypist_run(e$matrix, e$cells, model, mode, p_thres, majority_voting,
                        over_clustering, min_prop, conf_by, normalize, n_threads, call,
                        BPPARAM = BPPARAM)
  out <- res$table
  names(out) <- paste0(check_prefix(prefix, call), names(out))
  if (isTRUE(return_probabilities)) {
    attr(out, "probability") <- res$probability
    attr(out, "decision") <- res$decision
  }
  out
}

#' @rdname annotate_celltypist
#' @export
annotate_celltypist.Seurat <- function(object, model, ..., assay = NULL, layer = "data",
                                       mode = c("best match", "prob match"), p_thres = 0.5,
                                       majority_voting = FALSE, over_clustering = NULL,
                                       min_prop = 0,
                                       conf_by = c("predicted_labels", "majority_voting"),
                                       normalize = FALSE, return_probabilities = FALSE,
                                       prefix = "celltypist_", n_threads = NULL,
                                       BPPARAM = NULL) {
  call <- rlang::current_env()
  rlang::check_dots_empty(call = call)
  e <- get_expression(object, assay = assay, layer = layer, delayed = TRUE)
  neighbors <- if (isTRUE(majority_voting) && is.null(over_clustering)) {
    list(graph = seurat_graph(object, assay))
  }
  res <- celltypist_run(e$matrix, e$cells, model, mode, p_thres, majority_voting,
                        over_clustering, min_prop, conf_by, normalize, n_threads, call,
                        neighbors = neighbors, BPPARAM = BPPARAM)
  celltypist_add(object, res, prefix, return_probabilities, call)
}

#' @rdname annotate_celltypist
#' @export
annotate_celltypist.SummarizedExperiment <- function(object, model, ..., assay = "logcounts",
                                                     mode = c("best match", "prob match"),
                                                     p_thres = 0.5, majority_voting = FALSE,
                                                     over_clustering = NULL, min_prop = 0,
                                                     conf_by = c("predicted_labels", "majority_voting"),
                                                     normalize = FALSE,
                                                     return_probabilities = FALSE,
                                                     prefix = "celltypist_", n_threads = NULL,
                                                     BPPARAM = NULL) {
  call <- rlang::current_env()
  rlang::check_dots_empty(call = call)
  e <- get_expression(object, assay = assay, delayed = TRUE)
  neighbors <- if (isTRUE(majority_voting) && is.null(over_clustering) &&
                   methods::is(object, "SingleCellExperiment") &&
                   "PCA" %in% SingleCellExperiment::reducedDimNames(object)) {
    list(pca = SingleCellExperiment::reducedDim(object, "PCA"))
  }
  res <- celltypist_run(e$matrix, e$cells, model, mode, p_thres, majority_voting,
                        over_clustering, min_prop, conf_by, normalize, n_threads, call,
                        neighbors = neighbors, BPPARAM = BPPARAM)
  celltypist_add(object, res, prefix, return_probabilities, call)
}

check_prefix <- function(prefix, call) {
  if (!is.character(prefix) || length(prefix) != 1L || is.na(prefix)) {
    abort_scannot("`prefix` must be a single string (it may be empty).", "input", call = call)
  }
  prefix
}

# Prediction + optional vote; returns list(table, probability, decision).
celltypist_run <- function(m, cells, model, mode, p_thres, majority_voting, over_clustering,
                           min_prop, conf_by, normalize, n_threads, call, neighbors = NULL,
                           BPPARAM = NULL) {
  model <- check_celltypist_model(model, call)
  mode <- rlang::arg_match(mode, c("best match", "prob match"), error_call = call)
  conf_by <- rlang::arg_match(conf_by, c("predicted_labels", "majority_voting"), error_call = call)
  p_thres <- check_number(p_thres, call = call)
  min_prop <- check_number(min_prop, call = call)
  majority_voting <- check_flag(majority_voting, call = call)
  normalize <- check_flag(normalize, call = call)
  if (!is_block_matrix(m)) m <- as_expr_matrix(m, call = call)
  if (is.null(rownames(m))) {
    abort_scannot("The expression matrix needs gene symbols as row names to match the model's features.",
                  "input", call = call)
  }
  threads <- scannot_threads(n_threads)
  BPPARAM <- check_bpparam(BPPARAM, call)
  k <- length(model$cell_types)
  if (is.null(BPPARAM) && !is_block_matrix(m)) {
    r <- celltypist_predict_block(m, model, normalize, mode, p_thres, threads)
    prob <- matrix(r$probability, ncol = k)
    dec <- matrix(r$decision, ncol = k)
  } else {
    # cell blocks (each cell's prediction depends on that cell only), combined in order
    parts <- cell_block_apply(m, celltypist_predict_block, model = model,
                              normalize = normalize, mode = mode, p_thres = p_thres,
                              threads = threads, BPPARAM = BPPARAM, call = call)
    r <- list(first_cell_sum = parts[[1]]$first_cell_sum,
              best = unlist(lapply(parts, `[[`, "best"), use.names = FALSE),
              prob_labels = unlist(lapply(parts, `[[`, "prob_labels"), use.names = FALSE))
    prob <- rbind_vectors(parts, "probability", k)
    dec <- rbind_vectors(parts, "decision", k)
    rm(parts)
  }
  n <- ncol(m)
  if (n > 0L && abs(r$first_cell_sum - 1e4) > 1) {
    rlang::warn(sprintf(paste0(
      "The first cell's expm1 sum is %.6g, not 10,000: CellTypist expects ALL genes, ",
      "log1p-normalised to 10,000 counts per cell. Predictions may be inaccurate; ",
      "use normalize_counts() on the raw counts (or `normalize = TRUE`)."), r$first_cell_sum),
      class = "scannot_warning_celltypist_input")
  }
  classes <- model$cell_types
  cell_names <- colnames(m)
  dn <- list(cell_names, classes)
  dimnames(prob) <- dn
  dimnames(dec) <- dn
  labels <- if (mode == "best match") classes[r$best] else r$prob_labels
  tab <- data.frame(predicted_labels = py_factor(labels), row.names = cell_names)
  conf <- if (n > 0L) do.call(pmax, unname(as.data.frame(prob))) else numeric()
  if (majority_voting && n <= 50L) {
    rlang::warn(sprintf("Only %d cells: too few for over-clustering; no majority voting is done (as in CellTypist).", n),
                class = "scannot_warning_celltypist_voting")
    majority_voting <- FALSE
  }
  if (majority_voting) {
    oc <- if (is.null(over_clustering)) {
      if (is_block_matrix(m) && is.null(neighbors$graph) && is.null(neighbors$pca)) {
        abort_scannot("Majority voting on an out-of-core matrix needs `over_clustering` (a metadata column or one cluster label per cell), a Seurat graph or a SingleCellExperiment PCA: the automatic over-clustering would load the whole matrix.",
                      "over_clustering", call = call)
      }
      celltypist_over_cluster(m, neighbors, threads, call)
    } else {
      over_cluster_labels(over_clustering, cells, n, call)
    }
    lab_f <- tab$predicted_labels
    oc_f <- factor(oc)
    per_cluster <- rs_call(rs_celltypist_vote(as.integer(lab_f), levels(lab_f), as.integer(oc_f),
                                              nlevels(oc_f), min_prop), call = call)
    mv <- per_cluster[as.integer(oc_f)]
    tab$over_clustering <- oc
    tab$majority_voting <- py_factor(mv)
    if (conf_by == "majority_voting") {
      k <- match(mv, classes)
      hit <- !is.na(k)
      conf[hit] <- prob[cbind(which(hit), k[hit])]
    }
  } else if (conf_by == "majority_voting") {
    abort_scannot("`conf_by = \"majority_voting\"` needs `majority_voting = TRUE`.", "input", call = call)
  }
  tab$conf_score <- conf
  list(table = tab, probability = prob, decision = dec)
}

# The Rust prediction of the cells of `m` (in memory); vectors as the glue returns them.
celltypist_predict_block <- function(m, model, normalize, mode, p_thres, threads) {
  if (normalize) m <- normalize_counts(m, n_threads = threads)
  a <- matrix_args(m)
  rs_call(rs_celltypist_predict(
    a$p, a$i, a$x, a$nrow, a$ncol, a$dense, rownames(m), model$features, model$cell_types,
    nrow(model$coef), as.double(model$coef), as.double(model$intercept),
    as.double(model$scaler$mean), as.double(model$scaler$scale), isTRUE(model$scaler$with_mean),
    TRUE, mode == "prob match", p_thres, threads))
}

# A factor with levels in Python's sort order (code points), as pandas' categorical.
py_factor <- function(x) factor(x, levels = sort(unique(x), method = "radix"))

over_cluster_labels <- function(over_clustering, cells, n, call) {
  if (is.null(over_clustering)) {
    abort_scannot(paste0(
      "Majority voting needs an over-clustering: pass `over_clustering` as a metadata column ",
      "name or one cluster label per cell, e.g. a high-resolution Seurat::FindClusters() result ",
      "(CellTypist uses Leiden with resolution 5 below 5k cells, 10 below 20k, 15 below 40k, ",
      "20 below 100k, 25 below 200k, else 30). CellTypist's own scanpy pipeline cannot be ",
      "reproduced bit for bit outside Python, so scannot does not build one silently."),
      "over_clustering", call = call)
  }
  if (is.character(over_clustering) && length(over_clustering) == 1L && n != 1L) {
    if (is.null(cells) || !over_clustering %in% names(cells)) {
      abort_scannot(sprintf("`over_clustering` '%s' is not a cell metadata column%s.", over_clustering,
                            if (is.null(cells)) " (a matrix has no metadata: give one label per cell)" else ""),
                    "over_clustering", call = call)
    }
    over_clustering <- cells[[over_clustering]]
  }
  if (!(is.atomic(over_clustering) || is.factor(over_clustering)) || length(over_clustering) != n) {
    abort_scannot(sprintf("`over_clustering` must have one label per cell (%d); got %d.",
                          n, length(over_clustering)), "over_clustering", call = call)
  }
  if (anyNA(over_clustering)) {
    abort_scannot("`over_clustering` has NA labels; every cell needs a cluster.", "over_clustering",
                  call = call)
  }
  as.character(over_clustering)
}

# Prefixed result columns into the object's cell metadata; probability and decision
# matrices object-wide (Seurat misc / SCE metadata) when asked.
celltypist_add <- function(object, res, prefix, return_probabilities, call) {
  prefix <- check_prefix(prefix, call)
  tab <- res$table
  names(tab) <- paste0(prefix, names(tab))
  object <- add_cell_columns(object, tab)
  if (isTRUE(return_probabilities)) {
    object <- store_in_object(object, paste0(prefix, "probability"), res$probability)
    object <- store_in_object(object, paste0(prefix, "decision"), res$decision)
  }
  object
}
