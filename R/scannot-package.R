#' scannot: fast single-cell cell-type annotation with a Rust core
#'
#' scannot runs the cell-type annotation workflow from R on Seurat,
#' SingleCellExperiment and plain matrix inputs: marker dotplots
#' ([dotplot_data()], [plot_dotplot()]), cluster labelling ([label_clusters()]),
#' and more. The numerical work runs in a Rust core (one pass over the
#' non-zeros, never copying the matrix) with numbers identical to scanpy.
#'
#' Options:
#' * `scannot.threads`: default number of threads of heavy functions
#'   (otherwise all cores).
#'
#' Errors are conditions of class `scannot_error` plus a specific subclass
#' (`scannot_error_input`, `scannot_error_group_by`, `scannot_error_markers`,
#' `scannot_error_dims`, `scannot_error_layer`, `scannot_error_groups`,
#' `scannot_error_value`, `scannot_error_mapping`, `scannot_error_internal`).
#' @keywords internal
"_PACKAGE"

#' @importFrom methods is new
#' @importClassesFrom Matrix dgCMatrix
#' @importFrom rlang .data
NULL
