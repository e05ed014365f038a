#' Map query cells onto an scVI reference by scArches surgery (query training)
#'
#' Extends a saved scvi-tools SCVI reference model to the query's batches and trains it on
#' the query as `scvi.model.SCVI.load_query_data(query, reference, freeze_dropout = TRUE)`
#' followed by `model.train()` does, then returns the query's latent representation. Only
#' what scArches trains is updated: the one-hot batch columns of the encoder and decoder
#' layers (new batches are appended after the reference's, sorted, and initialised like
#' torch's `Linear`) and the decoder's batch-norm weight and bias, if any; every other
#' weight stays frozen. Training is Rust code (hand-written
#' backward pass, torch's Adam with `lr = 1e-3`, `eps = 0.01`, `weight_decay = 1e-6`,
#' minibatches of 128, 90/10 train/validation split, KL warm-up over 400 epochs).
#'
#' The random numbers (split, shuffling, reparameterisation noise, initial batch columns)
#' come from a seeded generator of scannot, not torch's: results agree with scvi-tools in
#' distribution (validation ELBO within 1 %, same latent geometry), not bit for bit.
#'
#' Supported models: scArches settings (`use_batch_norm = "none"`, `use_layer_norm = "both"`,
#' `encode_covariates = TRUE`) and scvi-tools' defaults (batch norm in encoder and decoder)
#' or any other batch / layer norm choice, gene dispersion, ZINB or NB likelihood, observed
#' library size, one-hot batch. Extra categorical and continuous covariates
#' (`categorical_covariate_keys` / `continuous_covariate_keys`) are read from the cell
#' metadata (or `obs`) under the reference's names; as in scvi-tools, the one-hot columns of
#' every categorical covariate train too (new levels appended sorted), the continuous
#' covariates' weights stay frozen, and the columns of the new levels are appended after all
#' of the reference's columns (`load_query_data` pads each weight at its end); such a
#' query model saves too (`save_dir`). Other models give a `scannot_error_input`.
#' As in scvi-tools 1.4.2 (whose query module stays in eval mode during `train()`), batch
#' norm uses the reference's running statistics throughout; the decoder's batch-norm weight
#' and bias train (`freeze_batchnorm_decoder = FALSE`), the encoder's are frozen. Without
#' `encode_covariates` the encoder does not train, so the query latent is the reference
#' encoder's. Press Ctrl-C / Esc to stop training early: the latent of the
#' model trained so far is returned with a warning.
#'
#' @param object A Seurat object, a SingleCellExperiment, or a genes x cells `dgCMatrix` /
#'   numeric matrix of **raw counts** with gene names as row names.
#' @param model A model from [load_scvi_model()], or the model's folder.
#' @param batch_key The query's batch: a cell-metadata column name or one label per cell.
#'   `NULL`: the model's own `batch_key` column if the metadata has it.
#' @param ... Passed to methods.
#' @param obs For a matrix: a data frame of cell metadata (one row per cell) holding the
#'   batch column.
#' @param max_epochs Training epochs; `NULL`: scvi-tools' heuristic
#'   `min(round(20000 / n_cells * 400), 400)`.
#' @param early_stopping Stop when the validation ELBO has not improved for
#'   `early_stopping_patience` epochs (scvi-tools' default patience 45).
#' @param early_stopping_patience See `early_stopping`.
#' @param freeze_dropout `load_query_data()`'s argument, kept for parity. It changes
#'   nothing: scvi-tools 1.4.2 trains the loaded query module in eval mode (lightning 2.2 or
#'   newer keeps the mode `load_query_data()` leaves), so there is no dropout either way,
#'   and neither is there here.
#' @param batch_size,train_size,lr,weight_decay,n_epochs_kl_warmup Training settings
#'   (scvi-tools' defaults).
#' @param seed Seed of the split, shuffling, noise and new-column initialisation.
#' @param n_threads Number of threads (see [scannot_threads()]).
#' @param progress Show a progress bar (one step per epoch).
#' @param by,min_fraction Gene matching, see [align_to_reference()].
#' @param save_dir `NULL`, or a folder to save the trained query model in, as scvi-tools'
#'   `model.save(save_dir)` does (`model.pt`; the folder is created). It loads with
#'   [load_scvi_model()] and with `scvi.model.SCVI.load(save_dir, adata = query)` in
#'   Python (the query's batch column named as the reference's `batch_key`, and its
#'   categorical / continuous covariate columns under the reference's
#'   `categorical_covariate_keys` / `continuous_covariate_keys`). The file holds the
#'   reference's weights with the trained one-hot columns of the query (batch and
#'   categorical covariates; scvi-tools' layout after `load_query_data()` + `train()`, the
#'   library-size encoder enlarged likewise), the query's registry (batch categories and
#'   each categorical covariate's categories extended, `n_cats_per_key`, number of cells;
#'   continuous covariates and setup arguments as the reference's), `is_trained_ = TRUE`,
#'   the train / validation cells and the training history (`model.history`:
#'   `elbo_train`, `reconstruction_loss_train`, ... as pandas data frames by epoch). The
#'   saved model serves as the reference of a further query, here or in scvi-tools. A
#'   model interrupted by Ctrl-C is saved as trained so far.
#' @param overwrite Replace a `model.pt` already in `save_dir`; otherwise that is a
#'   `scannot_error_file` error, raised before training.
#' @param name Name of the stored reduction: Seurat DimReduc (default `"scvi"`, key
#'   `"scVI_"`), SingleCellExperiment `reducedDim` (default `"X_scVI"`).
#' @param assay,layer Seurat: assay and layer (default `"counts"`); SingleCellExperiment:
#'   assay (default `"counts"`).
#' @return For a matrix, a list: `latent` (cells x latent matrix), `history` (data frame
#'   per epoch: `epoch`, `kl_weight`, `elbo_train`, `reconstruction_loss_train`,
#'   `kl_local_train`, `elbo_validation`, `reconstruction_loss_validation`,
#'   `kl_local_validation`, `seconds`), `batch_levels` (the query model's batches),
#'   `stopped_early`, `cancelled`, `validation_cells`, `model_dir` (the folder of the saved
#'   query model, or `NULL`). A Seurat object gets a DimReduc
#'   (`name`) and the rest in `Misc(object, "<name>_training")`; a SingleCellExperiment a
#'   `reducedDim` (`name`) and `metadata(object)$<name>_training`.
#' @seealso [load_scvi_model()], [scvi_latent()], [knn_transfer()]
#' @export
#' @examples
#' \dontrun{
#' ref <- load_scvi_model("scarches_reference_model/")
#' query <- scvi_map_query(query, ref, batch_key = "sample", max_epochs = 200,
#'                         save_dir = "query_model")
#' query_model <- load_scvi_model("query_model")
#' query <- knn_transfer(query, reference_cells, "cell_type")
#' }
scvi_map_query <- function(object, model, ...) UseMethod("scvi_map_query")

#' @rdname scvi_map_query
#' @export
scvi_map_query.default <- function(object, model, batch_key = NULL, ..., obs = NULL,
                                   max_epochs = NULL, early_stopping = TRUE,
                                   early_stopping_patience = 45, freeze_dropout = TRUE,
                                   batch_size = 128, train_size = 0.9, lr = 1e-3,
                                   weight_decay = 1e-6, n_epochs_kl_warmup = 400, seed = 0,
                                   n_threads = NULL, progress = interactive(), by = "name",
                                   min_fraction = 0.5, save_dir = NULL, overwrite = FALSE) {
  call <- rlang::current_env()
  rlang::check_dots_empty(call = call)
  if (!is.null(obs) && (!is.data.frame(obs) || nrow(obs) != ncol(object))) {
    abort_scannot(sprintf("`obs` must be a data frame with one row per cell (%d).", ncol(object)),
                  "input", call = call)
  }
  scvi_map_query_run(object, model, batch_key, NULL, NULL, obs, max_epochs, early_stopping,
                     early_stopping_patience, freeze_dropout, batch_size, train_size, lr,
                     weight_decay, n_epochs_kl_warmup, seed, n_threads, progress, by,
                     min_fraction, save_dir, overwrite, call)
}

#' @rdname scvi_map_query
#' @export
scvi_map_query.Seurat <- function(object, model, batch_key = NULL, ..., assay = NULL,
                                  layer = "counts", max_epochs = NULL, early_stopping = TRUE,
                                  early_stopping_patience = 45, freeze_dropout = TRUE,
                                  batch_size = 128, train_size = 0.9, lr = 1e-3,
                                  weight_decay = 1e-6, n_epochs_kl_warmup = 400, seed = 0,
                                  n_threads = NULL, progress = interactive(), by = "name",
                                  min_fraction = 0.5, save_dir = NULL, overwrite = FALSE,
                                  name = "scvi") {
  call <- rlang::current_env()
  rlang::check_dots_empty(call = call)
  name <- check_string(name)
  r <- scvi_map_query_run(object, model, batch_key, assay, layer, NULL, max_epochs,
                          early_stopping, early_stopping_patience, freeze_dropout, batch_size,
                          train_size, lr, weight_decay, n_epochs_kl_warmup, seed, n_threads,
                          progress, by, min_fraction, save_dir, overwrite, call)
  assay <- assay %||% SeuratObject::DefaultAssay(object)
  object[[name]] <- SeuratObject::CreateDimReducObject(embeddings = r$latent, key = "scVI_",
                                                       assay = assay)
  r$latent <- NULL
  store_in_object(object, paste0(name, "_training"), r)
}

#' @rdname scvi_map_query
#' @export
scvi_map_query.SummarizedExperiment <- function(object, model, batch_key = NULL, ...,
                                                assay = "counts", max_epochs = NULL,
                                                early_stopping = TRUE,
                                                early_stopping_patience = 45,
                                                freeze_dropout = TRUE, batch_size = 128,
                                                train_size = 0.9, lr = 1e-3,
                                                weight_decay = 1e-6, n_epochs_kl_warmup = 400,
                                                seed = 0, n_threads = NULL,
                                                progress = interactive(), by = "name",
                                                min_fraction = 0.5, save_dir = NULL,
                                                overwrite = FALSE, name = "X_scVI") {
  call <- rlang::current_env()
  rlang::check_dots_empty(call = call)
  name <- check_string(name)
  if (!methods::is(object, "SingleCellExperiment")) {
    abort_scannot("scvi_map_query() stores the latent in reducedDims: convert the object to a SingleCellExperiment first.",
                  "input", call = call)
  }
  r <- scvi_map_query_run(object, model, batch_key, assay, NULL, NULL, max_epochs,
                          early_stopping, early_stopping_patience, freeze_dropout, batch_size,
                          train_size, lr, weight_decay, n_epochs_kl_warmup, seed, n_threads,
                          progress, by, min_fraction, save_dir, overwrite, call)
  SingleCellExperiment::reducedDim(object, name) <- r$latent
  r$latent <- NULL
  store_in_object(object, paste0(name, "_training"), r)
}

scvi_whole <- function(v, what, min, call, allow_null = FALSE) {
  if (allow_null && is.null(v)) return(NULL)
  v <- check_number(v, arg = what, call = call)
  if (v < min || v != round(v) || v > .Machine$integer.max) {
    abort_scannot(sprintf("`%s` must be a whole number >= %d.", what, min), "input", call = call)
  }
  as.integer(v)
}

scvi_map_query_run <- function(object, model, batch_key, assay, layer, obs, max_epochs,
                               early_stopping, early_stopping_patience, freeze_dropout,
                               batch_size, train_size, lr, weight_decay, n_epochs_kl_warmup,
                               seed, n_threads, progress, by, min_fraction, save_dir,
                               overwrite, call) {
  check_flag(early_stopping, call = call)
  check_flag(overwrite, call = call)
  save_dir <- scvi_check_save_dir(save_dir, overwrite, call)
  check_flag(freeze_dropout, call = call)
  check_flag(progress, call = call)
  max_epochs <- scvi_whole(max_epochs, "max_epochs", 1L, call, allow_null = TRUE)
  patience <- scvi_whole(early_stopping_patience, "early_stopping_patience", 1L, call)
  batch_size <- scvi_whole(batch_size, "batch_size", 1L, call)
  warmup <- scvi_whole(n_epochs_kl_warmup, "n_epochs_kl_warmup", 0L, call)
  seed <- scvi_whole(seed, "seed", 0L, call)
  train_size <- check_number(train_size, call = call)
  if (train_size <= 0 || train_size > 1) {
    abort_scannot("`train_size` must be in (0, 1].", "input", call = call)
  }
  lr <- check_number(lr, call = call)
  weight_decay <- check_number(weight_decay, call = call)
  if (lr <= 0 || weight_decay < 0) {
    abort_scannot("`lr` must be > 0 and `weight_decay` >= 0.", "input", call = call)
  }
  n_threads <- scannot_threads(n_threads)
  model <- check_scvi_model(model, call)
  q <- scvi_prepare_query(object, model, batch_key, assay, layer, by, covariates = obs,
                          min_fraction = min_fraction, call = call)
  check_counts(q$x, call)
  n <- ncol(q$x)
  if (n < 2) {
    abort_scannot("Query training needs at least 2 cells.", "input", call = call)
  }
  epochs <- max_epochs %||% min(max(round(20000 / n * 400), 1), 400)
  bar <- NULL
  cb <- NULL
  if (progress) {
    bar <- utils::txtProgressBar(min = 0, max = epochs, style = 3)
    on.exit(close(bar), add = TRUE)
    cb <- function(epoch, elbo_train, elbo_validation) {
      utils::setTxtProgressBar(bar, epoch)
      invisible(NULL)
    }
  }
  a <- matrix_args(q$x)
  r <- rs_call(rs_scvi_map_query(model$path, a$p, a$i, a$x, a$nrow, a$ncol, a$dense,
                                 q$batch, as.character(q$new_levels),
                                 unname(lapply(q$categorical, function(c) as.integer(c$codes))),
                                 unname(lapply(q$categorical, function(c) as.character(c$new_levels))),
                                 unname(lapply(q$continuous, as.double)), epochs, batch_size,
                                 train_size, lr, weight_decay, warmup, early_stopping,
                                 patience, freeze_dropout, seed, n_threads, cb,
                                 save_dir %||% ""),
               call = call)
  if (isTRUE(r$cancelled)) {
    rlang::warn(sprintf("Query training was interrupted after %d epoch(s); the latent is that of the model trained so far.",
                        length(r$history$epoch)), class = "scannot_warning_interrupted")
  }
  latent <- matrix(r$latent, n, r$n_latent,
                   dimnames = list(q$cells, paste0("scVI_", seq_len(r$n_latent))))
  list(latent = latent,
       history = as.data.frame(r$history),
       batch_levels = q$batch_levels,
       stopped_early = r$stopped_early,
       cancelled = r$cancelled,
       validation_cells = q$cells[r$validation_indices] %||% r$validation_indices,
       model_dir = if (is.null(r$model_file)) NULL else dirname(r$model_file))
}

# NULL, or the folder to save the query model in (absolute); refuses an existing model.pt
# unless `overwrite`, before any training.
scvi_check_save_dir <- function(save_dir, overwrite, call) {
  if (is.null(save_dir)) return(NULL)
  save_dir <- check_string(save_dir, call = call)
  if (file.exists(save_dir) && !dir.exists(save_dir)) {
    abort_scannot(sprintf("`save_dir` '%s' is a file; give a folder to save the query model in.",
                          save_dir), "file", call = call)
  }
  if (file.exists(file.path(save_dir, "model.pt")) && !overwrite) {
    abort_scannot(sprintf("'%s' already holds a model.pt; set `overwrite = TRUE` to replace it or choose another `save_dir`.",
                          save_dir), "file", call = call)
  }
  path <- normalizePath(save_dir, mustWork = FALSE)
  if (!dir.exists(dirname(path))) {
    abort_scannot(sprintf("The parent folder of `save_dir` ('%s') does not exist.", dirname(path)),
                  "file", call = call)
  }
  path
}
