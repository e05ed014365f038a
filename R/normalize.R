#' Normalise counts to log1p(CP10k)
#'
#' `log1p(counts / total * target_sum)` per cell (scanpy's `normalize_total` then
#' `log1p`; Seurat's `LogNormalize`). Cells with no counts stay zero.
#' The sparse structure is shared with the input: only the values are new.
#'
#' @param object A `dgCMatrix` or numeric matrix (features x cells): returns the
#'   same kind of matrix. A SingleCellExperiment: adds the `logcounts` assay from
#'   `assay`. A Seurat object: fills the `data` layer from `counts`.
#' @param ... Passed to methods.
#' @param target_sum Counts per cell after scaling (default 1e4).
#' @param assay SingleCellExperiment: assay of counts (default `"counts"`); Seurat:
#'   assay name (default: the default assay).
#' @param n_threads Threads (default: option `scannot.threads`, else all cores).
#' @return The normalised matrix, or the object with normalised values.
#' @export
#' @examples
#' m <- Matrix::rsparsematrix(5, 4, 0.6, rand.x = function(n) rpois(n, 5) + 1)
#' normalize_counts(m)
normalize_counts <- function(object, ...) UseMethod("normalize_counts")

#' @rdname normalize_counts
#' @export
normalize_counts.default <- function(object, ..., target_sum = 1e4, n_threads = NULL) {
  call <- rlang::current_env()
  rlang::check_dots_empty(call = call)
  m <- as_expr_matrix(object, call = call)
  a <- matrix_args(m)
  x <- rs_call(rs_log_normalize(a$p, a$i, a$x, a$nrow, a$ncol, a$dense,
                                check_number(target_sum), scannot_threads(n_threads)),
               call = call)
  if (a$dense) {
    out <- matrix(x, nrow(m), ncol(m), dimnames = dimnames(m))
  } else {
    out <- m
    out@x <- x
  }
  out
}

#' @rdname normalize_counts
#' @export
normalize_counts.SummarizedExperiment <- function(object, ..., assay = "counts",
                                                  target_sum = 1e4, n_threads = NULL) {
  call <- rlang::current_env()
  rlang::check_dots_empty(call = call)
  e <- get_expression(object, assay = assay)
  SummarizedExperiment::assay(object, "logcounts", withDimnames = FALSE) <-
    normalize_counts(e$matrix, target_sum = target_sum, n_threads = n_threads)
  object
}

#' @rdname normalize_counts
#' @export
normalize_counts.Seurat <- function(object, ..., assay = NULL, target_sum = 1e4,
                                    n_threads = NULL) {
  call <- rlang::current_env()
  rlang::check_dots_empty(call = call)
  e <- get_expression(object, assay = assay, layer = "counts")
  out <- normalize_counts(e$matrix, target_sum = target_sum, n_threads = n_threads)
  assay <- assay %||% SeuratObject::DefaultAssay(object)
  if (utils::packageVersion("SeuratObject") >= "5.0.0") {
    set_layer <- getExportedValue("SeuratObject", "LayerData<-")
    object <- set_layer(object, assay = assay, layer = "data", value = out)
  } else {
    object <- SeuratObject::SetAssayData(object, slot = "data", new.data = out, assay = assay)
  }
  object
}
