#' Weighted kNN label transfer from a reference to a query (scArches)
#'
#' Transfers cell labels from reference cells to query cells that share a latent
#' space (e.g. an scVI/scArches embedding), exactly as scArches'
#' `weighted_knn_trainer()` + `weighted_knn_transfer()` do: for each query cell the
#' `k` nearest reference cells (exact Euclidean distances, no self exclusion) are
#' weighted by `exp(-d / (2 / s)^2)` with `s` the population standard deviation of
#' the cell's `k` distances (linear in the distance, not squared); the weights are
#' normalised to sum 1, the probability of a label is the summed weight of the
#' neighbours carrying it, the best label wins (ties go to the first label in sorted
#' order) and the uncertainty is `max(1 - p, 0)`.
#'
#' With a `threshold` (scArches' `pred_unknown = TRUE`), a cell keeps its label only
#' when the probability of its best label, `p`, is at least `threshold`; otherwise
#' it gets `unknown_label`. Note that scArches compares the *probability* (not the
#' uncertainty) with `>=`. Its default `threshold = 1` keeps only cells whose
#' neighbours all agree *and* whose weights happen to sum to at least 1.0 after
#' rounding: for a unanimous cell the sum is 1 within 2e-16, and whether it lands
#' just below or at 1 depends on the last bits of the distances, which sklearn
#' computes as `|a|^2 - 2 a.b + |b|^2` with BLAS. scannot computes distances directly,
#' so with `threshold = 1` a few percent of unanimous cells can land on the other
#' side of 1.0 than in scArches; every cell whose decision does not hinge on that
#' rounding agrees. Use e.g. `threshold = 1 - 1e-9` to keep all unanimous cells.
#'
#' The neighbour search runs in Rust (a bucketed space partition with exact
#' pruning, parallel over query cells). Distance ties are broken by reference cell
#' order, so results are deterministic (sklearn's brute-force search breaks exact ties
#' arbitrarily). Label sums use numpy's summation order, so probabilities and
#' uncertainties agree with scArches' to the last bits, apart from the ~1e-16
#' rounding of the distances themselves.
#'
#' @param query The query cells: a Seurat object, a SingleCellExperiment, or a
#'   numeric matrix of embeddings (cells in rows, latent dimensions in columns).
#' @param reference The reference cells, of any of the same kinds.
#' @param label_cols Names of the reference's cell-metadata columns to transfer
#'   (several at once). With `prefix = TRUE`, every column whose name *starts with*
#'   one of them is used, as scArches does (so `"cell_type"` also picks
#'   `"cell_type_fine"`). Default: every column of `reference_labels`.
#' @param k Number of neighbours (scArches' `n_neighbors`, default 50).
#' @param use_rep Name of the embedding: a Seurat reduction or a
#'   SingleCellExperiment `reducedDim`. `NULL` uses the object's only reduction, or
#'   the one whose name contains "scvi" (any case). Ignored for matrices.
#' @param reference_rep The reference's embedding name, if it differs from `use_rep`.
#' @param reference_labels A data frame of reference labels, one row per reference
#'   cell: needed when `reference` is a matrix, optional otherwise (it replaces the
#'   object's metadata).
#' @param threshold `NULL` (keep every best label) or a probability in 0..1: cells
#'   whose best label has a smaller probability get `unknown_label`, and a logical
#'   `<col>_certain` column is added.
#' @param unknown_label Label given to cells below `threshold`.
#' @param prefix Select label columns by name prefix (scArches' behaviour) instead of
#'   exact names.
#' @param n_threads Threads (default: option `scannot.threads`, else all cores).
#' @param BPPARAM `NULL` (default: in process) or a BiocParallel parameter object: the
#'   query cells are split into blocks searched in worker processes (each builds the
#'   reference index), with the same result (see [scannot_scale_out]).
#' @return The query with new cell-metadata columns per label column `<col>`:
#'   `<col>_transfer` (the transferred label: a factor with the reference's levels
#'   when the reference column is a factor, otherwise character; `NA` only when every
#'   kernel weight underflowed to 0, see Details), `<col>_uncertainty` and, with a
#'   `threshold`, `<col>_certain`. For a matrix query, a data frame with these
#'   columns (row names = the query's row names).
#'
#' @details If the embedding's scale is very large (distances and their spread in
#'   the hundreds), every kernel value `exp(-d s^2 / 4)` underflows to 0; scArches
#'   then returns no label (`None`) with uncertainty 1 and so does this function
#'   (`NA`, with a warning). Rescale the embedding in that case.
#' @seealso [knn_neighbors()], [joint_umap()], [plot_joint_umap()], [plot_uncertainty()]
#' @export
#' @examples
#' set.seed(1)
#' centres <- matrix(rnorm(4 * 10, sd = 3), 4)
#' type <- sample(4, 500, replace = TRUE)
#' ref <- centres[type, ] + matrix(rnorm(500 * 10), 500)
#' qry <- centres[sample(4, 100, replace = TRUE), ] + matrix(rnorm(100 * 10), 100)
#' labels <- data.frame(cell_type = c("B", "NK", "T", "Mono")[type])
#' res <- knn_transfer(qry, ref, "cell_type", k = 15, reference_labels = labels,
#'                     threshold = 0.8)
#' head(res)
knn_transfer <- function(query, reference, label_cols = NULL, k = 50, use_rep = NULL,
                         reference_rep = use_rep, reference_labels = NULL,
                         threshold = NULL, unknown_label = "Unknown", prefix = FALSE,
                         n_threads = NULL, BPPARAM = NULL) {
  call <- rlang::current_env()
  BPPARAM <- check_bpparam(BPPARAM, call)
  check_flag(prefix)
  unknown_label <- check_string(unknown_label)
  k <- check_number(k)
  if (k < 1 || k != round(k)) {
    abort_scannot("`k` must be a whole number >= 1.", "input", call = call)
  }
  if (!is.null(threshold)) {
    threshold <- check_number(threshold)
    if (threshold < 0 || threshold > 1) {
      abort_scannot("`threshold` is a probability and must lie in 0..1 (or be NULL).",
                    "input", call = call)
    }
  }
  n_threads <- scannot_threads(n_threads)
  q <- knn_embedding(query, use_rep, "query", call)
  r <- knn_embedding(reference, reference_rep, "reference", call)
  check_knn_shapes(q, r, k, call)
  labs <- knn_labels(reference, label_cols, reference_labels, prefix, nrow(r), call)
  coded <- lapply(names(labs), function(n) label_codes(labs[[n]], n, call))
  codes <- unlist(lapply(coded, `[[`, "codes"), use.names = FALSE)
  n_levels <- vapply(coded, function(cd) length(cd$levels), integer(1))
  res <- if (is.null(BPPARAM)) {
    rs_call(rs_knn_transfer(r, nrow(r), ncol(r), q, nrow(q), ncol(q), as.integer(k),
                            codes, n_levels, n_threads), call = call)
  } else {
    knn_transfer_blocks(r, q, as.integer(k), codes, n_levels, n_threads, BPPARAM, call)
  }
  nq <- nrow(q)
  cols <- list()
  for (j in seq_along(coded)) {
    cd <- coded[[j]]
    name <- names(labs)[j]
    pos <- (j - 1L) * nq + seq_len(nq)
    code <- res$label[pos]
    prob <- res$prob[pos]
    label <- cd$levels[ifelse(code < 0L, NA_integer_, code + 1L)]
    if (any(code < 0L)) {
      warning(sprintf("%d query cell(s) got no '%s' label: every kernel weight underflowed to 0 (the embedding's distances are very large; rescale it).",
                      sum(code < 0L), name), call. = FALSE)
    }
    out_levels <- cd$factor_levels
    if (!is.null(threshold)) {
      certain <- prob >= threshold
      if (unknown_label %in% cd$levels) {
        warning(sprintf("`unknown_label` '%s' is also a reference label of '%s'.",
                        unknown_label, name), call. = FALSE)
      }
      label[!certain] <- unknown_label
      if (!is.null(out_levels)) out_levels <- union(out_levels, unknown_label)
    }
    cols[[paste0(name, "_transfer")]] <-
      if (is.null(out_levels)) label else factor(label, levels = out_levels)
    cols[[paste0(name, "_uncertainty")]] <- res$uncertainty[pos]
    if (!is.null(threshold)) cols[[paste0(name, "_certain")]] <- certain
  }
  if (is_seurat(query) || is_se(query)) {
    return(add_cell_columns(query, cols))
  }
  out <- as.data.frame(cols, stringsAsFactors = FALSE, optional = TRUE)
  rownames(out) <- rownames(q)
  out
}

#' Exact k nearest reference cells of each query cell
#'
#' The neighbour search behind [knn_transfer()]: exact Euclidean distances (not
#' squared), ascending, ties broken by reference cell order, no self exclusion
#' (sklearn's `KNeighborsTransformer(mode = "distance").kneighbors()`).
#'
#' @inheritParams knn_transfer
#' @return A list with `index` (query cells x `k` integer matrix of 1-based reference
#'   rows) and `distance` (the matching distances).
#' @export
#' @examples
#' set.seed(1)
#' ref <- matrix(rnorm(200 * 5), 200)
#' qry <- matrix(rnorm(10 * 5), 10)
#' nb <- knn_neighbors(qry, ref, k = 3)
#' nb$index[1, ]
knn_neighbors <- function(query, reference, k = 50, use_rep = NULL, reference_rep = use_rep,
                          n_threads = NULL) {
  call <- rlang::current_env()
  k <- check_number(k)
  if (k < 1 || k != round(k)) {
    abort_scannot("`k` must be a whole number >= 1.", "input", call = call)
  }
  n_threads <- scannot_threads(n_threads)
  q <- knn_embedding(query, use_rep, "query", call)
  r <- knn_embedding(reference, reference_rep, "reference", call)
  check_knn_shapes(q, r, k, call)
  res <- rs_call(rs_knn_transfer(r, nrow(r), ncol(r), q, nrow(q), ncol(q), as.integer(k),
                                 integer(), integer(), n_threads), call = call)
  index <- matrix(res$index, nrow(q), k, byrow = TRUE, dimnames = list(rownames(q), NULL))
  distance <- matrix(res$distance, nrow(q), k, byrow = TRUE, dimnames = list(rownames(q), NULL))
  list(index = index, distance = distance)
}

check_knn_shapes <- function(q, r, k, call) {
  if (ncol(q) != ncol(r)) {
    abort_scannot(sprintf("The query embedding has %d dimensions but the reference embedding has %d; both must be the same latent space (map the query with the reference model first).",
                          ncol(q), ncol(r)), "dims", call = call)
  }
  if (k > nrow(r)) {
    abort_scannot(sprintf("`k` = %d is larger than the number of reference cells (%d); use k <= %d.",
                          k, nrow(r), nrow(r)), "input", call = call)
  }
}

# The cells x dims double matrix of an embedding.
knn_embedding <- function(object, rep, what, call) {
  if (is_seurat(object)) {
    rlang::check_installed("SeuratObject", "to read Seurat objects")
    have <- SeuratObject::Reductions(object)
    rep <- pick_reduction(rep, have, what, call)
    m <- SeuratObject::Embeddings(object[[rep]])
  } else if (methods::is(object, "SingleCellExperiment")) {
    have <- SingleCellExperiment::reducedDimNames(object)
    rep <- pick_reduction(rep, have, what, call)
    m <- SingleCellExperiment::reducedDim(object, rep, withDimnames = TRUE)
  } else if (is_se(object)) {
    abort_scannot(sprintf("The %s is a SummarizedExperiment without reduced dimensions; use a SingleCellExperiment with the embedding in reducedDims, or pass the embedding matrix.",
                          what), "reduction", call = call)
  } else {
    m <- object
    if (is.data.frame(m) && all(vapply(m, is.numeric, logical(1)))) m <- as.matrix(m)
    if (!is.matrix(m) || !is.numeric(m)) {
      abort_scannot(sprintf("The %s must be a Seurat object, a SingleCellExperiment or a numeric matrix of embeddings (cells in rows); got '%s'.",
                            what, paste(class(object), collapse = "/")), "input", call = call)
    }
  }
  m <- as.matrix(m)
  storage.mode(m) <- "double"
  if (nrow(m) == 0L || ncol(m) == 0L) {
    abort_scannot(sprintf("The %s embedding is empty (%d cells x %d dimensions).", what,
                          nrow(m), ncol(m)), "dims", call = call)
  }
  if (anyNA(m) || any(!is.finite(m))) {
    abort_scannot(sprintf("The %s embedding has %d missing or infinite value(s); remove or fix those cells first.",
                          what, sum(!is.finite(m))), "value", call = call)
  }
  m
}

pick_reduction <- function(rep, have, what, call) {
  if (is.null(rep)) {
    scvi <- have[grepl("scvi", have, ignore.case = TRUE)]
    if (length(have) == 1L) return(have)
    if (length(scvi) == 1L) return(scvi)
    abort_scannot(sprintf("Name the %s embedding with `%s`: the object has %s.", what,
                          if (what == "query") "use_rep" else "reference_rep",
                          if (length(have)) paste0("reductions ", paste(have, collapse = ", "))
                          else "no reductions"), "reduction", call = call)
  }
  if (!is.character(rep) || length(rep) != 1L || !rep %in% have) {
    abort_scannot(sprintf("Reduction '%s' is not in the %s; it has: %s. Store the latent embedding there first (e.g. Seurat CreateDimReducObject / reducedDim<-).",
                          paste(rep, collapse = ", "), what,
                          if (length(have)) paste(have, collapse = ", ") else "no reductions"),
                  "reduction", call = call)
  }
  rep
}

# The reference label columns (a data frame, one column per transferred label).
knn_labels <- function(reference, label_cols, reference_labels, prefix, n_ref, call) {
  md <- reference_labels
  if (is.null(md)) {
    if (!(is_seurat(reference) || is_se(reference))) {
      abort_scannot("For a matrix reference, give the labels as `reference_labels`, a data frame with one row per reference cell.",
                    "labels", call = call)
    }
    md <- cell_metadata(reference, call = call)
  }
  if (is.atomic(md) && !is.null(md)) md <- data.frame(label = md, stringsAsFactors = FALSE)
  md <- as.data.frame(md, stringsAsFactors = FALSE, optional = TRUE)
  if (nrow(md) != n_ref) {
    abort_scannot(sprintf("`reference_labels` has %d rows but the reference embedding has %d cells.",
                          nrow(md), n_ref), "dims", call = call)
  }
  if (is.null(label_cols)) {
    if (is.null(reference_labels)) {
      abort_scannot("Name the reference label columns to transfer in `label_cols`.", "labels",
                    call = call)
    }
    label_cols <- names(md)
  }
  if (!is.character(label_cols) || !length(label_cols) || anyNA(label_cols)) {
    abort_scannot("`label_cols` must be a character vector of column names.", "labels",
                  call = call)
  }
  if (prefix) {
    keep <- Reduce(`|`, lapply(label_cols, function(p) startsWith(names(md), p)))
    cols <- names(md)[keep]
  } else {
    cols <- unique(label_cols)
  }
  miss <- setdiff(if (prefix) character() else cols, names(md))
  if (length(miss) || !length(cols)) {
    abort_scannot(sprintf("Label column(s) %s not in the reference metadata. Available columns: %s.",
                          paste0("'", if (length(miss)) miss else label_cols, "'", collapse = ", "),
                          paste(utils::head(names(md), 30), collapse = ", ")),
                  "labels", call = call)
  }
  md[cols]
}

# 0-based codes in np.unique order (strings by code point, numbers numerically).
label_codes <- function(x, name, call) {
  if (!(is.atomic(x) || is.factor(x)) || is.list(x)) {
    abort_scannot(sprintf("Reference label column '%s' must be a vector of labels.", name),
                  "labels", call = call)
  }
  if (anyNA(x)) {
    abort_scannot(sprintf("Reference label column '%s' has %d missing (NA) label(s); label those cells or remove them from the reference.",
                          name, sum(is.na(x))), "labels", call = call)
  }
  factor_levels <- if (is.factor(x)) levels(x) else NULL
  v <- if (is.factor(x)) as.character(x) else x
  lev <- if (is.character(v)) sort(unique(v), method = "radix") else sort(unique(v))
  list(codes = match(v, lev) - 1L, levels = if (is.character(lev)) lev else as.character(lev),
       factor_levels = factor_levels)
}

#' Joint UMAP of reference and query cells
#'
#' Stacks the reference and query embeddings (the shared latent space) and runs
#' [uwot::umap()] on them, so that mapped query cells can be inspected next to the
#' reference. Cell metadata of both objects is carried along (columns missing on one
#' side are `NA`), so the result can be coloured by dataset, by label (reference
#' labels and transferred query labels together) or by uncertainty with
#' [plot_joint_umap()].
#'
#' @inheritParams knn_transfer
#' @param query_data,reference_data Optional data frames of cell metadata (one row
#'   per cell), needed to carry labels when `query` / `reference` are matrices.
#' @param n_neighbors,min_dist,metric Passed to [uwot::umap()].
#' @param seed Random seed (the layout is reproducible for a given seed and
#'   `n_threads = 1`; uwot's multi-threaded optimisation is not).
#' @param ... Further arguments to [uwot::umap()].
#' @return A data frame with `cell`, `dataset` (factor: reference, query), `UMAP_1`,
#'   `UMAP_2` and the metadata columns of both inputs.
#' @export
#' @examples
#' if (requireNamespace("uwot", quietly = TRUE)) {
#'   set.seed(1)
#'   ref <- matrix(rnorm(300 * 5), 300)
#'   qry <- matrix(rnorm(100 * 5), 100)
#'   u <- joint_umap(qry, ref, n_threads = 1)
#'   head(u)
#' }
joint_umap <- function(query, reference, use_rep = NULL, reference_rep = use_rep,
                       query_data = NULL, reference_data = NULL, n_neighbors = 15,
                       min_dist = 0.3, metric = "euclidean", seed = 0, n_threads = NULL,
                       ...) {
  call <- rlang::current_env()
  rlang::check_installed("uwot", "to compute a joint UMAP")
  n_threads <- scannot_threads(n_threads)
  q <- knn_embedding(query, use_rep, "query", call)
  r <- knn_embedding(reference, reference_rep, "reference", call)
  if (ncol(q) != ncol(r)) {
    abort_scannot(sprintf("The query embedding has %d dimensions but the reference embedding has %d; both must be the same latent space.",
                          ncol(q), ncol(r)), "dims", call = call)
  }
  meta <- function(obj, data, n, what) {
    if (!is.null(data)) {
      data <- as.data.frame(data, stringsAsFactors = FALSE, optional = TRUE)
      if (nrow(data) != n) {
        abort_scannot(sprintf("`%s_data` has %d rows but the %s has %d cells.", what,
                              nrow(data), what, n), "dims", call = call)
      }
      return(data)
    }
    if (is_seurat(obj) || is_se(obj)) return(cell_metadata(obj, call = call))
    data.frame(row.names = seq_len(n))
  }
  mr <- meta(reference, reference_data, nrow(r), "reference")
  mq <- meta(query, query_data, nrow(q), "query")
  for (n in setdiff(names(mq), names(mr))) mr[[n]] <- rep(NA, nrow(mr))
  for (n in setdiff(names(mr), names(mq))) mq[[n]] <- rep(NA, nrow(mq))
  for (n in names(mr)) {
    if (is.factor(mr[[n]]) || is.factor(mq[[n]])) {
      lev <- union(levels(factor(mr[[n]])), levels(factor(mq[[n]])))
      mr[[n]] <- factor(as.character(mr[[n]]), levels = lev)
      mq[[n]] <- factor(as.character(mq[[n]]), levels = lev)
    }
  }
  md <- rbind(mr, mq[names(mr)])
  cells <- c(rownames(r) %||% paste0("reference_", seq_len(nrow(r))),
             rownames(q) %||% paste0("query_", seq_len(nrow(q))))
  x <- rbind(unname(r), unname(q))
  n_neighbors <- min(n_neighbors, nrow(x) - 1L)
  emb <- withr_seed(seed, uwot::umap(x, n_neighbors = n_neighbors, min_dist = min_dist,
                                     metric = metric, n_threads = n_threads,
                                     n_sgd_threads = if (n_threads == 1L) 0 else n_threads,
                                     ...))
  out <- data.frame(cell = cells,
                    dataset = factor(rep(c("reference", "query"), c(nrow(r), nrow(q))),
                                     levels = c("reference", "query")),
                    UMAP_1 = emb[, 1], UMAP_2 = emb[, 2], stringsAsFactors = FALSE)
  md <- md[setdiff(names(md), names(out))]
  if (!ncol(md)) return(out)
  rownames(md) <- NULL
  cbind(out, md)
}

# Evaluate `expr` with a fixed RNG seed, restoring the caller's RNG state.
withr_seed <- function(seed, expr) {
  old <- if (exists(".Random.seed", envir = globalenv(), inherits = FALSE))
    get(".Random.seed", envir = globalenv(), inherits = FALSE) else NULL
  on.exit({
    if (is.null(old)) {
      if (exists(".Random.seed", envir = globalenv(), inherits = FALSE))
        rm(".Random.seed", envir = globalenv())
    } else {
      assign(".Random.seed", old, envir = globalenv())
    }
  })
  set.seed(seed)
  expr
}

#' Plot a joint reference/query UMAP
#'
#' Scatter plot of [joint_umap()]'s layout, coloured by dataset (reference or
#' query), by a label column or by a numeric column such as an uncertainty.
#' When colouring by a label column `<col>` that the query lacks, the query's
#' transferred labels `<col>_transfer` are used for it, so reference and query cells
#' show their labels in one legend.
#'
#' @param umap The data frame from [joint_umap()].
#' @param color_by `"dataset"`, or a column of `umap` (categorical: discrete
#'   colours; numeric, e.g. `"cell_type_uncertainty"`: a continuous scale).
#' @param query_only Show only the query cells (the reference in light grey behind
#'   them); useful for query-only columns such as uncertainties (default when
#'   `color_by` has no values for reference cells).
#' @param point_size Point size.
#' @param title Plot title (default: the colouring).
#' @return A ggplot object.
#' @export
#' @examples
#' if (requireNamespace("uwot", quietly = TRUE)) {
#'   set.seed(1)
#'   ref <- matrix(rnorm(300 * 5), 300)
#'   qry <- matrix(rnorm(100 * 5), 100)
#'   plot_joint_umap(joint_umap(qry, ref, n_threads = 1))
#' }
plot_joint_umap <- function(umap, color_by = "dataset", query_only = NULL, point_size = 0.4,
                            title = NULL) {
  call <- rlang::current_env()
  if (!is.data.frame(umap) || !all(c("UMAP_1", "UMAP_2", "dataset") %in% names(umap))) {
    abort_scannot("`umap` must be the data frame returned by joint_umap().", "input",
                  call = call)
  }
  color_by <- check_string(color_by)
  d <- umap
  if (!color_by %in% names(d)) {
    abort_scannot(sprintf("Column '%s' is not in the UMAP data; available: %s.", color_by,
                          paste(names(d), collapse = ", ")), "input", call = call)
  }
  v <- d[[color_by]]
  tr <- paste0(color_by, "_transfer")
  is_q <- d$dataset == "query"
  if (tr %in% names(d) && all(is.na(v[is_q]))) {
    v <- if (is.factor(v) || is.factor(d[[tr]])) {
      lev <- union(levels(factor(v)), levels(factor(d[[tr]])))
      factor(ifelse(is_q, as.character(d[[tr]]), as.character(v)), levels = lev)
    } else {
      ifelse(is_q, as.character(d[[tr]]), as.character(v))
    }
  }
  d$.colour <- v
  if (is.null(query_only)) query_only <- all(is.na(v[!is_q])) && any(!is.na(v[is_q]))
  check_flag(query_only)
  back <- if (query_only) d[!is_q, , drop = FALSE] else d[0, , drop = FALSE]
  front <- if (query_only) d[is_q, , drop = FALSE] else d
  # draw the larger dataset first so the smaller stays visible
  front <- front[order(front$dataset != names(which.max(table(front$dataset)))), , drop = FALSE]
  p <- ggplot2::ggplot(front, ggplot2::aes(x = .data$UMAP_1, y = .data$UMAP_2))
  if (nrow(back)) {
    p <- p + ggplot2::geom_point(data = back, colour = "grey85", size = point_size)
  }
  p <- p + ggplot2::geom_point(ggplot2::aes(colour = .data$.colour), size = point_size)
  if (is.numeric(v)) {
    p <- p + ggplot2::scale_colour_viridis_c(name = color_by, option = "magma", direction = -1,
                                             end = 0.92)
  } else if (identical(color_by, "dataset")) {
    p <- p + ggplot2::scale_colour_manual(name = NULL,
                                          values = c(reference = "grey70", query = "#D6604D"))
  } else {
    p <- p + ggplot2::labs(colour = color_by)
  }
  p + ggplot2::guides(colour = if (is.numeric(v)) ggplot2::guide_colourbar() else
    ggplot2::guide_legend(override.aes = list(size = 3))) +
    ggplot2::labs(title = title %||% color_by, x = "UMAP 1", y = "UMAP 2") +
    ggplot2::theme_bw() +
    ggplot2::theme(panel.grid = ggplot2::element_blank(), aspect.ratio = 1,
                   axis.text = ggplot2::element_blank(), axis.ticks = ggplot2::element_blank())
}

#' Per-label uncertainty of transferred labels
#'
#' Boxplots of the kNN-transfer uncertainty of the query cells, one box per
#' transferred label, labels ordered by their median uncertainty (most certain
#' first), with the number of cells per label.
#'
#' @param object The query returned by [knn_transfer()] (Seurat,
#'   SingleCellExperiment or data frame).
#' @param label_col The transferred label column, `<col>` or `<col>_transfer`.
#' @param threshold Optional uncertainty level drawn as a dashed line.
#' @return A ggplot object.
#' @export
#' @examples
#' set.seed(1)
#' centres <- matrix(rnorm(4 * 10, sd = 2), 4)
#' type <- sample(4, 500, replace = TRUE)
#' ref <- centres[type, ] + matrix(rnorm(500 * 10), 500)
#' qry <- centres[sample(4, 200, replace = TRUE), ] + matrix(rnorm(200 * 10), 200)
#' res <- knn_transfer(qry, ref, "cell_type", k = 15,
#'                     reference_labels = data.frame(cell_type = letters[type]))
#' plot_uncertainty(res, "cell_type")
plot_uncertainty <- function(object, label_col, threshold = NULL) {
  call <- rlang::current_env()
  label_col <- check_string(label_col)
  md <- cell_metadata(object, call = call)
  base <- sub("_transfer$", "", label_col)
  lab <- paste0(base, "_transfer")
  unc <- paste0(base, "_uncertainty")
  if (!all(c(lab, unc) %in% names(md))) {
    abort_scannot(sprintf("Columns '%s' and '%s' are not in the query's metadata; run knn_transfer() with label_cols = \"%s\" first.",
                          lab, unc, base), "labels", call = call)
  }
  d <- data.frame(label = as.character(md[[lab]]), uncertainty = md[[unc]],
                  stringsAsFactors = FALSE)
  d <- d[!is.na(d$label), , drop = FALSE]
  med <- tapply(d$uncertainty, d$label, stats::median)
  ord <- names(sort(med))
  counts <- table(factor(d$label, levels = ord))
  d$label <- factor(d$label, levels = ord)
  n_lab <- data.frame(label = factor(ord, levels = ord), n = as.integer(counts))
  p <- ggplot2::ggplot(d, ggplot2::aes(x = .data$label, y = .data$uncertainty)) +
    ggplot2::geom_boxplot(fill = "#FDDBC7", colour = "grey30", outlier.size = 0.5,
                          outlier.alpha = 0.5, width = 0.7) +
    ggplot2::geom_text(data = n_lab, ggplot2::aes(x = .data$label, y = 1.04, label = .data$n),
                       size = 2.6, colour = "grey40") +
    ggplot2::scale_y_continuous(limits = c(0, 1.06), breaks = seq(0, 1, 0.25)) +
    ggplot2::labs(x = NULL, y = "uncertainty (1 - probability of the label)",
                  title = sprintf("Label transfer uncertainty: %s", base)) +
    ggplot2::theme_bw() +
    ggplot2::theme(axis.text.x = ggplot2::element_text(angle = 45, hjust = 1),
                   panel.grid.major.x = ggplot2::element_blank())
  if (!is.null(threshold)) {
    threshold <- check_number(threshold)
    p <- p + ggplot2::geom_hline(yintercept = threshold, linetype = "dashed", colour = "#B2182B")
  }
  p
}
