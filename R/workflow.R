# The whole annotation workflow from one call: markers -> manual labels -> Wilcoxon
# markers -> CellTypist with majority voting -> scVI mapping -> kNN label transfer ->
# joint UMAP -> plots and an HTML report. Every step's result is checkpointed
# (out_dir/checkpoints) and a rerun resumes after the last finished step.

#' Files shipped with scannot for the default workflow
#'
#' Paths of the small default models in `inst/extdata`, made by the real tools from a
#' simulated PBMC-like reference (3,000 cells of seven types, two batches; see
#' `tools/fixtures/extdata/` and the `extdata` step of `tools/fixtures/make_fixtures.sh`):
#'
#' * `"celltypist"`: `celltypist_default.pkl`, a CellTypist 1.7.1 model trained with
#'   `celltypist.train()` on the reference's log1p CP10k expression (seven types).
#' * `"scvi"`: `scvi_reference/` (its `model.pt`), an scvi-tools 1.4.2 SCVI model of the
#'   reference with the scArches settings (layer norm, no batch norm, encoded
#'   covariates, two layers, 10 latent dimensions).
#' * `"reference_embedding"`: `reference_latent.csv.gz`, the reference cells' scVI
#'   latent (`get_latent_representation()`) with their `cell_type` and `batch`.
#'
#' @param what Which file.
#' @return The path.
#' @export
#' @examples
#' scannot_example("celltypist")
scannot_example <- function(what = c("celltypist", "scvi", "reference_embedding")) {
  what <- rlang::arg_match(what)
  f <- switch(what, celltypist = "celltypist_default.pkl", scvi = "scvi_reference",
              reference_embedding = "reference_latent.csv.gz")
  path <- system.file("extdata", f, package = "scannot")
  if (!nzchar(path)) {
    abort_scannot(sprintf("The default file '%s' is not installed with scannot (inst/extdata).", f),
                  "input")
  }
  path
}

# A shipped default file, or NULL when this installation lacks it.
shipped_file <- function(what) tryCatch(scannot_example(what), scannot_error = function(e) NULL)

# The simulation behind the default data and models: the query is its first cells, the
# reference (tools/fixtures/extdata/export_reference.R) its cells 50,001-53,500 without
# the fibroblasts.
DEFAULT_SIM <- list(n_genes = 15674, seed = 2026)

# The genes of the default models: every marker of the simulation's eight cell types and
# the fillers GENE00101..GENE00350.
default_reference_genes <- function() {
  sim <- simulate_counts(n_cells = 5, n_genes = 400, n_types = 8, seed = 1, as = "list",
                         n_threads = 1)
  g <- rownames(sim$counts)
  c(g[!grepl("^GENE[0-9]+$", g)], sprintf("GENE%05d", 101:350))
}

# The default reference as a SingleCellExperiment: the shipped counts of the model genes,
# log1p CP10k-normalised with each cell's total over all genes (as the query).
default_reference <- function() {
  r <- readRDS(system.file("extdata", "reference_counts.rds", package = "scannot"))
  cnt <- r$counts
  lc <- cnt
  lc@x <- log1p(lc@x / rep(r$cells$total_counts, diff(lc@p)) * 1e4)
  SingleCellExperiment::SingleCellExperiment(
    assays = list(counts = cnt, logcounts = lc),
    colData = S4Vectors::DataFrame(r$cells[c("cell_type", "batch")], row.names = colnames(cnt)))
}

#' Default marker genes of the workflow
#'
#' Canonical PBMC and tissue marker genes (real symbols), one set per cell type; the
#' workflow keeps the genes present in the data.
#' @return A named list of character vectors.
#' @export
#' @examples
#' default_markers()
default_markers <- function() {
  list(
    T = c("CD3D", "CD3E", "IL7R"), CD8 = c("CD8A", "CD8B"), NK = c("GNLY", "NKG7"),
    B = c("MS4A1", "CD79A"), Mono = c("CD14", "LYZ", "FCGR3A"), DC = c("FCER1A", "CST3"),
    Epithelial = c("EPCAM", "KRT18"), Endothelial = c("PECAM1", "VWF"),
    Fibroblast = c("COL1A2", "DCN"), Immune = "PTPRC"
  )
}

#' Run the whole annotation workflow
#'
#' One call runs, on a Seurat object or a SingleCellExperiment (or an `.rds` / `.h5ad`
#' file holding one; by default the embedded simulated PBMC-like data):
#'
#' 1. **clustering**: the 1,000 most dispersed genes, PCA (30 components), a kNN graph
#'    (k = 15) and Leiden clusters
#'    (`leiden`, plus the finer `leiden_fine` over-clustering that CellTypist's majority
#'    voting uses, with CellTypist's resolution rule), and a UMAP;
#' 2. **markers**: the marker genes found in the data, a marker dotplot per cluster and
#'    a manual label per cluster (`marker_label`: the marker set each cluster expresses
#'    most, as a biologist would read the dotplot);
#' 3. **wilcoxon**: [find_markers()] (scanpy's Wilcoxon test), [filter_markers()] and the
#'    top 5 markers per cluster;
#' 4. **celltypist**: [annotate_celltypist()] with majority voting over `leiden_fine`;
#' 5. **scvi**: the query's scVI latent in the reference model's space
#'    (`scvi_map_query()`, scArches surgery, when scannot has it; else `scvi_latent()`;
#'    else the step is skipped with a note and the next step uses a joint PCA);
#' 6. **transfer**: [knn_transfer()] of the reference labels (scArches' weighted kNN),
#'    with `"Unknown"` for cells whose best label has a probability below
#'    `unknown_threshold`;
#' 7. **joint_umap**: [joint_umap()] of reference and query cells.
#'
#' It writes into `out_dir`: `annotated.rds` (the object with all new metadata columns
#' and the `PCA`/`UMAP` (and `scVI`) reductions), `labels.csv` (one row per cell),
#' `top_markers.csv`, `dotplot.csv`, `plots/*.png`, `steps.csv` (timings) and, with
#' `report = TRUE`, `report.html` ([annotation_report()]). `annotated.rds` is written
#' with gzip level 1 by a forked process while the plots and the report are made (about
#' 270 MB for the 28,911 default cells with their counts and logcounts); the checkpoints
#' are written uncompressed (native binary serialisation, read by [readRDS()]).
#'
#' **Checkpoints.** Each step's result is saved to `out_dir/checkpoints/<step>.rds`
#' (written to a temporary file and renamed, so a killed run never leaves a partial
#' checkpoint). With `resume = TRUE` a rerun reuses every checkpoint whose inputs
#' (data, models, settings and the previous steps) are unchanged and computes only the
#' rest; the input data themselves are re-read (or re-simulated) every time.
#'
#' @param object `NULL` (the embedded default data: [simulate_counts()] with
#'   the first `default_cells` cells of the seeded PBMC-like simulation the default
#'   models were built from: 15,674 genes, eight cell types, two batches), a Seurat object,
#'   a SingleCellExperiment, or the path to an `.rds` file holding one or to an
#'   `.h5ad` file. Needs log-normalised expression (`logcounts` / the `data` layer);
#'   when only counts exist they are normalised with [normalize_counts()].
#' @param out_dir Output folder.
#' @param group_by A cell-metadata column with clusters for the marker steps; default
#'   the workflow's Leiden clusters.
#' @param markers Marker gene sets (named list); default [default_markers()].
#' @param celltypist_model A CellTypist `.pkl` file or model; default the shipped model
#'   ([scannot_example()]); `NULL` skips the step.
#' @param scvi_model The scVI reference model folder (or its `model.pt`); default the
#'   shipped model.
#' @param reference_embedding The reference cells' latent in the scVI model's space: a
#'   `.csv`/`.csv.gz` file (first column the cell, then label columns, then numeric
#'   latent columns) or a data frame of that shape; default the shipped one.
#' @param reference A reference object (Seurat / SingleCellExperiment / `.rds` /
#'   `.h5ad`) with `reference_label` in its metadata, used for the joint-PCA fallback
#'   when no scVI mapping is available; default the simulated reference the shipped
#'   models were trained on.
#' @param reference_label The reference label column to transfer.
#' @param batch_key The query's batch column (for the scVI mapping), if any.
#' @param unknown_threshold Cells whose transferred label has a probability below this
#'   are labelled `"Unknown"`.
#' @param k Neighbours for the label transfer.
#' @param resume Reuse finished steps' checkpoints.
#' @param report Render `report.html` with [annotation_report()] (needs rmarkdown and
#'   pandoc).
#' @param default_cells Number of cells of the default data (100 to 50,000).
#' @param umap_cells At most this many query cells go into the joint UMAP.
#' @param scvi_epochs Epochs of scArches query training in the scVI step (`NULL`: the
#'   scvi-tools heuristic, at most 400, with early stopping). The step's note in
#'   `steps` gives the epochs trained.
#' @param seed Random seed (clustering, UMAP, subsampling).
#' @param n_threads Threads (default: option `scannot.threads`, else all cores).
#' @param quiet Suppress the progress lines.
#' @return An object of class `scannot_workflow` (invisibly): a list with `object` (the
#'   annotated object), `results` (the tables behind the plots), `steps` (a data frame:
#'   step, status `"computed"`/`"checkpoint"`/`"skipped"`, seconds, note), `plots`
#'   (PNG paths) and `out_dir`.
#' @seealso [annotation_report()]
#' @export
#' @examples
#' \donttest{
#' if (requireNamespace("igraph", quietly = TRUE) && TRUE &&
#'     requireNamespace("uwot", quietly = TRUE)) {
#'   res <- run_annotation_workflow(out_dir = tempfile(), default_cells = 1500,
#'                                  report = FALSE, n_threads = 1)
#'   res$steps
#' }
#' }
run_annotation_workflow <- function(object = NULL, out_dir = "scannot-out", group_by = NULL,
                                    markers = default_markers(),
                                    celltypist_model = shipped_file("celltypist"),
                                    scvi_model = shipped_file("scvi"),
                                    reference_embedding = shipped_file("reference_embedding"),
                                    reference = NULL, reference_label = "cell_type",
                                    batch_key = "batch", unknown_threshold = 0.5, k = 30,
                                    resume = TRUE, report = TRUE, default_cells = 28911,
                                    umap_cells = 8000, scvi_epochs = NULL, seed = 2026,
                                    n_threads = NULL, quiet = FALSE) {
  call <- rlang::current_env()
  n_threads <- scannot_threads(n_threads)
  check_flag(resume); check_flag(report); check_flag(quiet)
  unknown_threshold <- check_number(unknown_threshold)
  out_dir <- check_string(out_dir)
  dir.create(file.path(out_dir, "checkpoints"), showWarnings = FALSE, recursive = TRUE)
  dir.create(file.path(out_dir, "plots"), showWarnings = FALSE, recursive = TRUE)
  t_all <- proc.time()[["elapsed"]]
  log_step <- function(name, status, secs, note = "") {
    if (quiet) return(invisible())
    msg <- sprintf("%-11s %-10s %7.2f s%s", name, status, secs,
                   if (nzchar(note)) paste0("  (", note, ")") else "")
    if (requireNamespace("cli", quietly = TRUE)) {
      sym <- switch(status, computed = cli::symbol$tick, checkpoint = cli::symbol$arrow_right,
                    skipped = cli::symbol$info, cli::symbol$bullet)
      cli::cat_line(sym, " [scannot] ", msg)
    } else {
      cat("[scannot]", msg, "\n")
    }
  }

  # -- input (re-read every run; not checkpointed)
  t0 <- proc.time()[["elapsed"]]
  inp <- workflow_input(object, default_cells, seed, n_threads, call)
  obj <- inp$object
  log_step("input", "loaded", proc.time()[["elapsed"]] - t0,
           sprintf("%s: %d cells x %d genes", inp$label, ncol(obj), nrow(obj)))

  ctx <- list(markers = markers, celltypist_model = celltypist_model, scvi_model = scvi_model,
              reference_embedding = reference_embedding, reference = reference,
              reference_label = check_string(reference_label), batch_key = batch_key,
              unknown_threshold = unknown_threshold, k = check_number(k), group_by = group_by,
              umap_cells = check_number(umap_cells), seed = check_number(seed),
              scvi_epochs = if (!is.null(scvi_epochs)) check_number(scvi_epochs),
              quiet = quiet,
              n_threads = n_threads, call = call)
  file_id <- function(f) {
    if (is.character(f) && length(f) == 1L && file.exists(f)) {
      fs <- if (dir.exists(f)) list.files(f, recursive = TRUE, full.names = TRUE) else f
      unname(tools::md5sum(fs))
    } else if (is.null(f)) {
      "none"
    } else {
      rlang::hash(f)
    }
  }
  settings <- list(
    clustering = list(seed),
    markers = list(markers, group_by),
    wilcoxon = list(),
    celltypist = list(file_id(celltypist_model)),
    scvi = list(file_id(scvi_model), batch_key, scvi_capability(), scvi_epochs),
    transfer = list(file_id(reference_embedding), file_id(reference), reference_label,
                    unknown_threshold, k),
    joint_umap = list(umap_cells, seed)
  )
  steps <- names(settings)
  fail_after <- getOption("scannot.workflow_fail_after")
  key <- rlang::hash(list(inp$id, utils::packageVersion("scannot")))
  state <- list()
  log <- data.frame(step = character(), status = character(), seconds = numeric(),
                    note = character(), stringsAsFactors = FALSE)
  for (s in steps) {
    key <- rlang::hash(list(key, s, settings[[s]]))
    ck <- file.path(out_dir, "checkpoints", paste0(s, ".rds"))
    t0 <- proc.time()[["elapsed"]]
    res <- NULL
    if (resume && file.exists(ck)) {
      saved <- tryCatch(readRDS(ck), error = function(e) NULL)
      if (!is.null(saved) && identical(saved$key, key)) res <- saved$result
    }
    status <- "checkpoint"
    if (is.null(res)) {
      res <- workflow_steps[[s]](obj, state, ctx)
      status <- if (isTRUE(res$skipped)) "skipped" else "computed"
      save_rds_atomic(list(key = key, step = s, result = res, time = Sys.time()), ck,
                      compress = FALSE)
    }
    obj <- workflow_apply(obj, res)
    state[[s]] <- res$data
    secs <- proc.time()[["elapsed"]] - t0
    note <- res$note %||% ""
    log[nrow(log) + 1L, ] <- list(s, status, secs, note)
    log_step(s, status, secs, note)
    if (identical(fail_after, s)) {
      abort_scannot(sprintf("Injected failure after step '%s' (option scannot.workflow_fail_after).", s),
                    "workflow_injected")
    }
  }

  # -- outputs (always rewritten)
  t0 <- proc.time()[["elapsed"]]
  # annotated.rds (the largest output) is written by a forked child while the plots, the
  # tables and the report are made; waited for before returning
  wait_annotated <- write_rds_async(obj, file.path(out_dir, "annotated.rds"))
  on.exit(try(wait_annotated(), silent = TRUE), add = TRUE)
  results <- workflow_results(obj, state, ctx, inp)
  plots <- workflow_plots(obj, results, file.path(out_dir, "plots"))
  md <- cell_metadata(obj)
  new_cols <- unique(unlist(lapply(state, function(d) d$columns)))
  labels <- data.frame(cell = colnames(obj), md[intersect(new_cols, names(md))],
                       check.names = FALSE)
  utils::write.csv(labels, file.path(out_dir, "labels.csv"), row.names = FALSE)
  utils::write.csv(results$top_markers, file.path(out_dir, "top_markers.csv"), row.names = FALSE)
  utils::write.csv(results$dotplot, file.path(out_dir, "dotplot.csv"), row.names = FALSE)
  log_step("outputs", "computed", proc.time()[["elapsed"]] - t0,
           sprintf("%d plots, annotated.rds, labels.csv", length(plots)))
  log[nrow(log) + 1L, ] <- list("outputs", "computed", proc.time()[["elapsed"]] - t0, "")
  out <- structure(list(object = obj, results = results, steps = log, plots = plots,
                        out_dir = normalizePath(out_dir)), class = "scannot_workflow")
  results$steps <- log
  save_rds_atomic(results, file.path(out_dir, "results.rds"))
  if (report) {
    t0 <- proc.time()[["elapsed"]]
    annotation_report(out_dir)
    secs <- proc.time()[["elapsed"]] - t0
    log_step("report", "computed", secs, "report.html")
    out$steps[nrow(out$steps) + 1L, ] <- list("report", "computed", secs, "")
  }
  wait_annotated()
  total <- proc.time()[["elapsed"]] - t_all
  out$steps[nrow(out$steps) + 1L, ] <- list("total", "", total, "")
  utils::write.csv(out$steps, file.path(out_dir, "steps.csv"), row.names = FALSE)
  if (!quiet) cat(sprintf("[scannot] done in %.1f s: results in %s\n", total, out$out_dir))
  invisible(out)
}

#' @method print scannot_workflow
#' @export
print.scannot_workflow <- function(x, ...) {
  cat(sprintf("<scannot workflow> %d cells, results in %s\n", ncol(x$object), x$out_dir))
  print(x$steps, row.names = FALSE)
  invisible(x)
}

# saveRDS to a temporary file in the same folder, then rename: readers never see a
# partial file. `compress = FALSE` writes the native (little-endian) binary format,
# which readRDS() reads like any other: no byte swapping, no compression.
save_rds_atomic <- function(x, path, compress = TRUE) {
  tmp <- tempfile(paste0(".", basename(path), "."), tmpdir = dirname(path))
  on.exit(unlink(tmp), add = TRUE)
  if (isFALSE(compress)) {
    con <- file(tmp, "wb")
    tryCatch(serialize(x, con, xdr = FALSE), finally = close(con))
  } else if (is.numeric(compress)) {
    con <- gzfile(tmp, "wb", compression = compress)
    saveRDS(x, con)
    close(con)
  } else {
    saveRDS(x, tmp, compress = compress)
  }
  if (!file.rename(tmp, path)) {
    abort_scannot(sprintf("Could not write '%s'.", path), "io")
  }
  invisible(path)
}

# Write `x` to `path` (gzip level 1: a fifth of the uncompressed size for ~10 CPU-s, hidden
# behind the plots) in a forked child where the platform forks, else at once.
# Returns a function that waits for the write (a no-op after the first call) and turns
# its failure into an error.
write_rds_async <- function(x, path) {
  job <- NULL
  if (.Platform$OS.type == "unix" && !isTRUE(getOption("scannot.workflow_sync_write"))) {
    job <- tryCatch(parallel::mcparallel(save_rds_atomic(x, path, compress = 1L),
                                         silent = TRUE),
                    error = function(e) NULL)
  }
  if (is.null(job)) save_rds_atomic(x, path, compress = 1L)
  done <- is.null(job)
  function() {
    if (done) return(invisible())
    done <<- TRUE
    r <- parallel::mccollect(job)[[1]]
    if (is.null(r) || inherits(r, "try-error")) {
      abort_scannot(sprintf("Could not write '%s'%s.", path, if (inherits(r, "try-error"))
        paste0(": ", conditionMessage(attr(r, "condition"))) else ""), "io")
    }
    invisible()
  }
}

# ---- input ---------------------------------------------------------------------------

workflow_input <- function(object, default_cells, seed, n_threads, call) {
  if (is.null(object)) {
    n <- check_number(default_cells, call = call)
    if (n < 100 || n > 50000) {
      abort_scannot("`default_cells` must be between 100 and 50,000 (the default reference is simulated cells 50,001 to 53,500 of the same simulation).",
                    "input", call = call)
    }
    obj <- simulate_counts(n_cells = n, n_genes = DEFAULT_SIM$n_genes, n_types = 8, n_batches = 2,
                           seed = DEFAULT_SIM$seed, n_threads = n_threads)
    return(list(object = obj, id = list("default", n, DEFAULT_SIM),
                label = "simulated PBMC-like default data", simulated = TRUE))
  }
  id <- NULL
  label <- "object"
  if (is.character(object) && length(object) == 1L) {
    if (!file.exists(object)) {
      abort_scannot(sprintf("Input file '%s' does not exist.", object), "input", call = call)
    }
    info <- file.info(object)
    id <- list(normalizePath(object), info$size, as.numeric(info$mtime))
    label <- basename(object)
    object <- if (grepl("\\.h5ad$", object, ignore.case = TRUE)) {
      read_h5ad(object, as = "SingleCellExperiment")
    } else {
      readRDS(object)
    }
  }
  if (!is_seurat(object) && !methods::is(object, "SingleCellExperiment")) {
    abort_scannot(sprintf("The workflow needs a Seurat object or a SingleCellExperiment (or an .rds/.h5ad file of one); got '%s'.",
                          paste(class(object), collapse = "/")), "input", call = call)
  }
  object <- workflow_normalized(object, n_threads)
  list(object = object, id = id %||% rlang::hash(object), label = label, simulated = FALSE)
}

# Make sure log-normalised expression exists (logcounts / the data layer).
workflow_normalized <- function(object, n_threads) {
  if (is_seurat(object)) {
    e <- tryCatch(get_expression(object, layer = "data")$matrix, error = function(e) NULL)
    cnt <- tryCatch(get_expression(object, layer = "counts")$matrix, error = function(e) NULL)
    if (is.null(e) || (!is.null(cnt) && identical(dim(e), dim(cnt)) &&
                       identical(e@x[seq_len(min(100, length(e@x)))],
                                 cnt@x[seq_len(min(100, length(cnt@x)))]))) {
      object <- normalize_counts(object, n_threads = n_threads)
    }
    return(object)
  }
  an <- SummarizedExperiment::assayNames(object)
  if ("logcounts" %in% an) return(object)
  src <- if ("counts" %in% an) "counts" else if ("X" %in% an) "X" else an[1]
  m <- SummarizedExperiment::assay(object, src)
  x <- if (methods::is(m, "dgCMatrix")) m@x else as.vector(m)
  if (length(x) && all(x == round(x))) {
    if (!"counts" %in% an) SummarizedExperiment::assay(object, "counts") <- m
    SummarizedExperiment::assay(object, "logcounts") <- normalize_counts(
      as_expr_matrix(m), n_threads = n_threads)
  } else {
    SummarizedExperiment::assay(object, "logcounts") <- m
  }
  object
}

# ---- steps -----------------------------------------------------------------------------
# Each step: function(object, state, ctx) -> list(cols = data frame of new cell columns,
# reductions = named list of cells x dims matrices, data = results kept for later steps
# and the report (data$columns: the new column names), note = "", skipped = FALSE).

workflow_steps <- list(
  clustering = function(obj, state, ctx) {
    rlang::check_installed(c("igraph", "uwot"), "to cluster and embed the cells")
    e <- get_expression(obj)$matrix
    pca <- workflow_pca(e, n_hvg = 1000, n_pcs = 30, seed = ctx$seed)
    nb <- knn_neighbors(pca, pca, k = 15, n_threads = ctx$n_threads)
    g <- knn_graph(nb$index)
    n <- nrow(pca)
    # CellTypist's over-clustering resolution rule (cells: <5k 5, <20k 10, <40k 15, ...)
    res_fine <- if (n < 5000) 5 else if (n < 20000) 10 else if (n < 40000) 15 else
      if (n < 100000) 20 else if (n < 200000) 25 else 30
    leiden <- withr_seed(ctx$seed, igraph::cluster_leiden(
      g, objective_function = "modularity", resolution_parameter = 0.5, n_iterations = 5))
    fine <- withr_seed(ctx$seed, igraph::cluster_leiden(
      g, objective_function = "modularity", resolution_parameter = res_fine, n_iterations = 2))
    relabel <- function(m) {
      m <- as.integer(igraph::membership(m))
      o <- order(-tabulate(m))
      factor(match(m, o) - 1L, levels = seq_along(o) - 1L)
    }
    cl <- relabel(leiden)
    umap <- withr_seed(ctx$seed, uwot::umap(
      pca, nn_method = list(idx = nb$index, dist = nb$distance), min_dist = 0.3,
      n_threads = ctx$n_threads, n_sgd_threads = ctx$n_threads,
      n_epochs = if (n > 10000) 100 else 200))
    dimnames(umap) <- list(colnames(obj), c("UMAP_1", "UMAP_2"))
    list(cols = data.frame(leiden = cl, leiden_fine = relabel(fine)),
         reductions = list(PCA = pca, UMAP = umap),
         data = list(columns = c("leiden", "leiden_fine"), resolution_fine = res_fine),
         note = sprintf("%d clusters, %d over-clusters (resolution %g)", nlevels(cl),
                        length(unique(igraph::membership(fine))), res_fine))
  },

  markers = function(obj, state, ctx) {
    group_by <- ctx$group_by %||% "leiden"
    mk <- markers_in_data(ctx$markers, obj, quiet = TRUE)
    d <- dotplot_data(obj, mk, group_by, standard_scale = "var")
    top <- tapply(d$color, list(as.character(d$group), d$marker_set), mean)
    top <- top[, setdiff(colnames(top), "Immune"), drop = FALSE]
    mapping <- stats::setNames(colnames(top)[apply(top, 1, which.max)], rownames(top))
    lab <- label_clusters(cell_metadata(obj)[group_by], group_by, mapping,
                          new_col = "marker_label")
    list(cols = data.frame(marker_label = lab$marker_label),
         data = list(columns = "marker_label", dotplot = d, mapping = mapping,
                     markers = mk, group_by = group_by),
         note = sprintf("%d marker genes, %d clusters labelled", length(unlist(mk)),
                        length(mapping)))
  },

  wilcoxon = function(obj, state, ctx) {
    group_by <- state$markers$group_by
    wx <- find_markers(obj, group_by, n_threads = ctx$n_threads)
    fl <- filter_markers(wx)
    top <- top_markers(fl, n = 5)
    grp <- unique(as.character(top$group))
    sets <- lapply(grp, function(k) top$gene[as.character(top$group) == k])
    names(sets) <- grp
    d <- dotplot_data(obj, sets[lengths(sets) > 0L], group_by, standard_scale = "var")
    list(data = list(columns = character(), top = top, dotplot = d),
         note = sprintf("%d genes tested, %d filtered markers", nrow(wx) / length(grp),
                        sum(!is.na(fl$gene))))
  },

  celltypist = function(obj, state, ctx) {
    if (is.null(ctx$celltypist_model)) {
      return(list(skipped = TRUE, data = list(columns = character()),
                  note = "no CellTypist model given"))
    }
    model <- if (is.character(ctx$celltypist_model)) load_celltypist_model(ctx$celltypist_model)
      else ctx$celltypist_model
    a <- annotate_celltypist(obj, model, majority_voting = TRUE, over_clustering = "leiden_fine",
                             n_threads = ctx$n_threads)
    md <- cell_metadata(a)
    cols <- grep("^celltypist_", names(md), value = TRUE)
    list(cols = md[cols], data = list(columns = cols, cell_types = model$cell_types,
                                      n_features = length(model$features)),
         note = sprintf("%d types, %d model genes", length(model$cell_types),
                        length(model$features)))
  },

  scvi = function(obj, state, ctx) {
    r <- workflow_scvi(obj, ctx)
    if (is.null(r$latent)) {
      return(list(skipped = TRUE, data = list(columns = character(), method = NA_character_),
                  note = r$note))
    }
    list(reductions = list(scVI = r$latent),
         data = list(columns = character(), method = r$method, epochs = r$epochs,
                     stopped_early = r$stopped_early), note = r$note)
  },

  transfer = function(obj, state, ctx) {
    emb <- workflow_joint_embedding(obj, state, ctx)
    lab <- ctx$reference_label
    res <- knn_transfer(emb$query, emb$reference, lab, k = min(ctx$k, nrow(emb$reference)),
                        reference_labels = emb$reference_labels[lab],
                        threshold = ctx$unknown_threshold, unknown_label = "Unknown",
                        n_threads = ctx$n_threads)
    names(res) <- paste0("transfer_", sub(paste0("^", lab, "_"), "", names(res)))
    names(res)[names(res) == "transfer_transfer"] <- "transfer_label"
    list(cols = res, data = list(columns = names(res), embedding = emb$name,
                                 reference = emb$reference, reference_labels = emb$reference_labels,
                                 query = emb$query),
         note = sprintf("%s; %d Unknown of %d", emb$name, sum(res$transfer_label == "Unknown"),
                        nrow(res)))
  },

  joint_umap = function(obj, state, ctx) {
    tr <- state$transfer
    q <- tr$query
    n <- nrow(q)
    keep <- if (n > ctx$umap_cells) sort(withr_seed(ctx$seed, sample.int(n, ctx$umap_cells)))
      else seq_len(n)
    md <- cell_metadata(obj)[keep, , drop = FALSE]
    qd <- data.frame(md[intersect(c("transfer_label", "transfer_uncertainty", "leiden",
                                    "celltypist_majority_voting", "batch"), names(md))],
                     check.names = FALSE)
    rl <- tr$reference_labels
    qd[[ctx$reference_label]] <- NULL
    # the exact kNN of the joint cells (scannot's, threaded) instead of uwot's Annoy index
    # build; joint_umap() stacks the reference rows first
    x <- rbind(unname(as.matrix(tr$reference)), unname(as.matrix(q[keep, , drop = FALSE])))
    nb <- knn_neighbors(x, x, k = min(15L, nrow(x) - 1L), n_threads = ctx$n_threads)
    u <- joint_umap(q[keep, , drop = FALSE], tr$reference, query_data = qd,
                    reference_data = rl, seed = ctx$seed, n_threads = ctx$n_threads,
                    nn_method = list(idx = nb$index, dist = nb$distance),
                    n_epochs = if (nrow(x) > 10000) 100 else 200)
    u$label <- ifelse(u$dataset == "query", as.character(u$transfer_label),
                      as.character(u[[ctx$reference_label]]))
    list(data = list(columns = character(), umap = u, n_query = length(keep), n_total = n),
         note = sprintf("%d reference + %d query cells", nrow(tr$reference), length(keep)))
  }
)

# Apply a step's result to the object.
workflow_apply <- function(obj, res) {
  if (!is.null(res$cols) && ncol(res$cols)) obj <- add_cell_columns(obj, res$cols)
  for (n in names(res$reductions)) obj <- add_reduction(obj, n, res$reductions[[n]])
  obj
}

add_reduction <- function(obj, name, m) {
  m <- as.matrix(m)
  rownames(m) <- colnames(obj)
  if (is_seurat(obj)) {
    colnames(m) <- paste0(name, "_", seq_len(ncol(m)))
    obj[[name]] <- SeuratObject::CreateDimReducObject(
      embeddings = m, key = paste0(gsub("[^A-Za-z0-9]", "", name), "_"),
      assay = SeuratObject::DefaultAssay(obj))
  } else {
    SingleCellExperiment::reducedDim(obj, name) <- m
  }
  obj
}

# PCA of the most dispersed genes (centred and scaled to unit variance, no clipping) by a
# randomized SVD (Halko et al.: a 10-column oversampled range, `n_iter` power iterations) on
# the sparse matrix with implicit centring/scaling: no dense copy of the data. Signs are
# fixed so that each component's largest loading is positive.
workflow_pca <- function(e, n_hvg, n_pcs, seed, n_iter = 4L) {
  n_hvg <- min(n_hvg, nrow(e))
  mu <- Matrix::rowMeans(e)
  v <- Matrix::rowMeans(e^2) - mu^2
  # highly variable genes: largest dispersion (variance / mean of the log expression)
  # among genes with mean > 0.0125 (scanpy's min_mean), then by variance
  disp <- ifelse(mu > 0.0125, v / pmax(mu, 1e-12), -1)
  hvg <- order(-disp, -v)[seq_len(n_hvg)]
  x <- Matrix::t(e[hvg, , drop = FALSE]) # cells x genes
  mu <- mu[hvg]
  sdv <- sqrt(pmax(v[hvg], 1e-12) * ncol(e) / max(ncol(e) - 1, 1))
  n_pcs <- min(n_pcs, n_hvg - 1L, nrow(x) - 1L)
  # A = (X - 1 mu') D^-1; products with A and A' without forming it
  a_mult <- function(m) { m <- m / sdv; as.matrix(x %*% m) - matrix(colSums(mu * m), nrow(x), ncol(m), byrow = TRUE) }
  at_mult <- function(m) { (as.matrix(Matrix::crossprod(x, m)) - outer(mu, colSums(m))) / sdv }
  l <- min(n_pcs + 10L, ncol(x))
  omega <- withr_seed(seed, matrix(stats::rnorm(ncol(x) * l), ncol(x), l))
  y <- qr.Q(qr(a_mult(omega)))
  for (it in seq_len(n_iter)) {
    y <- qr.Q(qr(at_mult(y)))
    y <- qr.Q(qr(a_mult(y)))
  }
  b <- t(at_mult(y)) # l x genes
  sv <- svd(b, nu = n_pcs, nv = n_pcs)
  u <- y %*% sv$u
  sgn <- sign(sv$v[cbind(apply(abs(sv$v), 2, which.max), seq_len(n_pcs))])
  pcs <- sweep(u, 2, sv$d[seq_len(n_pcs)] * sgn, `*`)
  dimnames(pcs) <- list(rownames(x), paste0("PC_", seq_len(n_pcs)))
  pcs
}

# Symmetric kNN graph (self excluded) from a neighbour index matrix.
knn_graph <- function(index) {
  n <- nrow(index)
  from <- rep(seq_len(n), ncol(index))
  to <- as.vector(index)
  keep <- from != to
  g <- igraph::graph_from_edgelist(cbind(from[keep], to[keep]), directed = FALSE)
  g <- igraph::add_vertices(g, max(0L, n - igraph::vcount(g)))
  igraph::simplify(g)
}

# Which scVI mapping scannot offers (part of the scvi step's checkpoint key).
scvi_capability <- function() {
  ns <- asNamespace("scannot")
  if (exists("scvi_map_query", ns)) "scvi_map_query" else if (exists("scvi_latent", ns))
    "scvi_latent" else "none"
}

# Call f with the positional args and those named args f accepts explicitly.
# The query's latent in the scVI reference model's space, or NULL with a note.
workflow_scvi <- function(obj, ctx) {
  cap <- scvi_capability()
  if (cap == "none") {
    return(list(latent = NULL, note = paste(
      "scVI mapping is not available in this build of scannot (no scvi_map_query() or",
      "scvi_latent()); the label transfer uses a joint PCA of reference and query instead")))
  }
  if (is.null(ctx$scvi_model)) {
    return(list(latent = NULL, note = "no scVI model given; joint PCA used instead"))
  }
  ns <- asNamespace("scannot")
  model <- ctx$scvi_model
  if (is.character(model) && exists("load_scvi_model", ns)) {
    model <- tryCatch(get("load_scvi_model", ns)(model), error = function(e) model)
  }
  bk <- if (!is.null(ctx$batch_key) && ctx$batch_key %in% names(cell_metadata(obj)))
    ctx$batch_key else NULL
  r <- tryCatch(
    if (cap == "scvi_map_query") {
      # the per-epoch bar only in interactive sessions (a log gets the step line)
      scvi_map_query(obj, model, batch_key = bk, max_epochs = ctx$scvi_epochs,
                     seed = ctx$seed, n_threads = ctx$n_threads,
                     progress = !ctx$quiet && interactive())
    } else {
      scvi_latent(obj, model, batch_key = bk, n_threads = ctx$n_threads)
    },
    error = function(e) e)
  if (inherits(r, "error")) {
    rlang::warn(sprintf("The scVI step (%s) failed: %s; the label transfer uses a joint PCA instead.",
                        cap, conditionMessage(r)), class = "scannot_warning_workflow")
    return(list(latent = NULL, note = sprintf("%s failed (%s); joint PCA used instead", cap,
                                              conditionMessage(r))))
  }
  z <- latent_of(r)
  if (is.null(z) || nrow(z) != ncol(obj)) {
    return(list(latent = NULL, note = sprintf("%s returned no latent of the query cells; joint PCA used instead", cap)))
  }
  tr <- training_of(r)
  epochs <- if (is.data.frame(tr$history)) nrow(tr$history) else NA_integer_
  list(latent = z, method = cap, epochs = epochs, stopped_early = isTRUE(tr$stopped_early),
       note = sprintf("%s: %d-d latent%s", if (cap == "scvi_map_query")
         "scvi_map_query (scArches surgery)" else "scvi_latent (reference encoder)", ncol(z),
         if (is.na(epochs)) "" else sprintf(", %d epochs%s", epochs,
                                            if (isTRUE(tr$stopped_early)) " (early stop)" else "")))
}

# The training record scvi_map_query() stores in the object (history, stopped_early).
training_of <- function(r) {
  tr <- if (is_seurat(r)) r@misc[["scvi_training"]] else if (methods::is(r, "SingleCellExperiment"))
    S4Vectors::metadata(r)[["X_scVI_training"]] else if (is.list(r)) r
  if (is.list(tr)) tr else list()
}

latent_of <- function(r) {
  if (is.matrix(r) || (is.data.frame(r) && all(vapply(r, is.numeric, logical(1))))) {
    return(as.matrix(r))
  }
  if (is_seurat(r) || methods::is(r, "SingleCellExperiment")) {
    return(tryCatch(knn_embedding(r, NULL, "query", rlang::current_env()),
                    error = function(e) NULL))
  }
  if (is.list(r)) {
    for (n in c("latent", "z", "qz_mean", "embedding")) if (is.matrix(r[[n]])) return(r[[n]])
  }
  NULL
}

# Read a reference embedding file / data frame: cell, label columns, numeric latent.
read_reference_embedding <- function(x, call) {
  if (is.character(x) && length(x) == 1L) {
    if (!file.exists(x)) {
      abort_scannot(sprintf("Reference embedding file '%s' does not exist.", x), "input", call = call)
    }
    x <- utils::read.csv(x, check.names = FALSE, stringsAsFactors = FALSE)
  }
  if (!is.data.frame(x)) {
    abort_scannot("`reference_embedding` must be a .csv file or a data frame (cell, labels, latent columns).",
                  "input", call = call)
  }
  num <- vapply(x, is.numeric, logical(1))
  lat <- as.matrix(x[num])
  rownames(lat) <- as.character(x[[1]])
  list(latent = lat, labels = x[!num][-1])
}

# The query and reference embeddings for the label transfer: the scVI latent (query
# from the scvi step, reference from reference_embedding), or a joint PCA fallback.
workflow_joint_embedding <- function(obj, state, ctx) {
  lab <- ctx$reference_label
  if (!is.na(state$scvi$method %||% NA)) {
    ref <- read_reference_embedding(ctx$reference_embedding, ctx$call)
    if (!lab %in% names(ref$labels)) {
      abort_scannot(sprintf("The reference embedding has no '%s' column.", lab), "labels",
                    call = ctx$call)
    }
    q <- knn_embedding(obj, "scVI", "query", ctx$call)
    return(list(query = q, reference = ref$latent, reference_labels = ref$labels,
                name = "scVI latent"))
  }
  ref <- ctx$reference
  if (is.null(ref)) {
    ref <- default_reference()
  } else if (is.character(ref)) {
    ref <- workflow_input(ref, 0, ctx$seed, ctx$n_threads, ctx$call)$object
  } else {
    ref <- workflow_normalized(ref, ctx$n_threads)
  }
  rmd <- cell_metadata(ref)
  if (!lab %in% names(rmd)) {
    abort_scannot(sprintf("The reference has no '%s' column.", lab), "labels", call = ctx$call)
  }
  eq <- get_expression(obj)$matrix
  er <- get_expression(ref)$matrix
  genes <- intersect(rownames(eq), rownames(er))
  if (length(genes) < 20L) {
    abort_scannot(sprintf("Query and reference share only %d genes.", length(genes)), "input",
                  call = ctx$call)
  }
  x <- cbind(eq[genes, , drop = FALSE], er[genes, , drop = FALSE])
  pcs <- workflow_pca(x, n_hvg = 2000, n_pcs = 20, seed = ctx$seed)
  nq <- ncol(eq)
  q <- pcs[seq_len(nq), , drop = FALSE]
  r <- pcs[-seq_len(nq), , drop = FALSE]
  labels <- data.frame(rmd[lab], check.names = FALSE)
  labels[[lab]] <- as.character(labels[[lab]])
  list(query = q, reference = r, reference_labels = labels,
       name = "joint PCA (no scVI mapping: not batch-corrected)")
}

# ---- results and plots -------------------------------------------------------------------

workflow_results <- function(obj, state, ctx, inp) {
  md <- cell_metadata(obj)
  um <- if (is_seurat(obj)) SeuratObject::Embeddings(obj[["UMAP"]]) else
    SingleCellExperiment::reducedDim(obj, "UMAP")
  cells <- data.frame(cell = colnames(obj), UMAP_1 = um[, 1], UMAP_2 = um[, 2],
                      md[intersect(c("leiden", "marker_label", "celltypist_predicted_labels",
                                     "celltypist_majority_voting", "celltypist_conf_score",
                                     "transfer_label", "transfer_uncertainty", "batch",
                                     if (isTRUE(inp$simulated)) "cell_type"), names(md))],
                      check.names = FALSE, row.names = NULL)
  # expression of one marker per set for the feature plots
  e <- get_expression(obj)$matrix
  feat <- unique(vapply(state$markers$markers[lengths(state$markers$markers) > 0L],
                        `[`, character(1), 1))
  feat <- utils::head(feat, 9)
  expr <- as.matrix(Matrix::t(e[feat, , drop = FALSE]))
  list(cells = cells, marker_expression = expr, dotplot = state$markers$dotplot,
       mapping = state$markers$mapping, group_by = state$markers$group_by,
       top_markers = state$wilcoxon$top, top_dotplot = state$wilcoxon$dotplot,
       celltypist = state$celltypist, scvi_method = state$scvi$method,
       embedding = state$transfer$embedding, joint_umap = state$joint_umap$umap,
       joint_n = c(query = state$joint_umap$n_query, total = state$joint_umap$n_total),
       unknown_threshold = ctx$unknown_threshold, simulated = isTRUE(inp$simulated),
       input = inp$label, n_cells = ncol(obj), n_genes = nrow(obj),
       notes = vapply(names(state), function(s) "", ""))
}

umap_theme <- function() {
  ggplot2::theme_bw() +
    ggplot2::theme(panel.grid = ggplot2::element_blank(), aspect.ratio = 1,
                   axis.text = ggplot2::element_blank(), axis.ticks = ggplot2::element_blank())
}

plot_umap_cells <- function(cells, col, title, point_size = 0.3) {
  d <- cells[order(cells[[col]] == "Unknown"), , drop = FALSE]
  d$.col <- d[[col]]
  p <- ggplot2::ggplot(d, ggplot2::aes(.data$UMAP_1, .data$UMAP_2, colour = .data$.col)) +
    ggplot2::geom_point(size = point_size) +
    ggplot2::labs(title = title, colour = NULL, x = "UMAP 1", y = "UMAP 2") + umap_theme()
  if (is.numeric(d$.col)) {
    p + ggplot2::scale_colour_viridis_c(option = "magma", direction = -1, end = 0.92)
  } else {
    p + ggplot2::guides(colour = ggplot2::guide_legend(override.aes = list(size = 3)))
  }
}

# Write every report plot as PNG; returns the named paths.
workflow_plots <- function(obj, res, dir) {
  save <- function(name, p, w, h) {
    f <- file.path(dir, paste0(name, ".png"))
    ggplot2::ggsave(f, p, width = w, height = h, dpi = 90)
    f
  }
  cells <- res$cells
  out <- list()
  out$umap_clusters <- save("umap_clusters", plot_umap_cells(cells, "leiden", "Leiden clusters"), 6, 5)
  if ("batch" %in% names(cells)) {
    out$umap_batch <- save("umap_batch", plot_umap_cells(cells, "batch", "Batch"), 6, 5)
  }
  ex <- res$marker_expression
  long <- data.frame(UMAP_1 = rep(cells$UMAP_1, ncol(ex)), UMAP_2 = rep(cells$UMAP_2, ncol(ex)),
                     gene = factor(rep(colnames(ex), each = nrow(ex)), levels = colnames(ex)),
                     expression = as.vector(ex))
  long <- long[order(long$expression), ]
  p <- ggplot2::ggplot(long, ggplot2::aes(.data$UMAP_1, .data$UMAP_2, colour = .data$expression)) +
    ggplot2::geom_point(size = 0.15) +
    ggplot2::facet_wrap(ggplot2::vars(.data$gene), ncol = 3) +
    ggplot2::scale_colour_gradient(low = "grey88", high = "#67000D", name = "log1p\nexpression") +
    ggplot2::labs(title = "Marker expression", x = "UMAP 1", y = "UMAP 2") + umap_theme() +
    ggplot2::theme(strip.text = ggplot2::element_text(face = "italic"))
  out$umap_markers <- save("umap_markers", p, 9, 9)
  out$marker_dotplot <- save("marker_dotplot", plot_dotplot(res$dotplot, title = sprintf(
    "Marker genes per cluster (%s)", res$group_by)), 11, 5)
  out$umap_manual <- save("umap_manual_labels", plot_umap_cells(cells, "marker_label",
                                                                 "Manual labels (marker dotplot)"), 6.5, 5)
  out$top_marker_dotplot <- save("top_marker_dotplot", plot_dotplot(
    res$top_dotplot, title = "Top 5 Wilcoxon markers per cluster"),
    max(8, 0.22 * length(unique(res$top_dotplot$gene)) + 3), 5)
  if ("celltypist_majority_voting" %in% names(cells)) {
    out$umap_celltypist <- save("umap_celltypist", plot_umap_cells(
      cells, "celltypist_majority_voting", "CellTypist (majority voting)"), 6.5, 5)
    out$umap_celltypist_conf <- save("umap_celltypist_confidence", plot_umap_cells(
      cells, "celltypist_conf_score", "CellTypist confidence (conf_score)"), 6.5, 5)
    p <- ggplot2::ggplot(cells, ggplot2::aes(x = .data$celltypist_predicted_labels,
                                             y = .data$celltypist_conf_score)) +
      ggplot2::geom_boxplot(fill = "#D1E5F0", outlier.size = 0.4) +
      ggplot2::labs(x = NULL, y = "confidence", title = "CellTypist confidence per predicted label") +
      ggplot2::theme_bw() + ggplot2::theme(axis.text.x = ggplot2::element_text(angle = 45, hjust = 1))
    out$celltypist_conf_box <- save("celltypist_confidence", p, 7, 4.5)
  }
  if (!is.null(res$joint_umap)) {
    u <- res$joint_umap
    out$joint_dataset <- save("joint_umap_dataset", plot_joint_umap(
      u, "dataset", title = sprintf("Joint UMAP (%s)", res$embedding)), 6.5, 5)
    out$joint_labels <- save("joint_umap_labels", plot_joint_umap(
      u, "label", query_only = FALSE,
      title = "Reference labels and transferred query labels"), 7, 5)
    out$joint_uncertainty <- save("joint_umap_uncertainty", plot_joint_umap(
      u, "transfer_uncertainty", title = "Transfer uncertainty (query)"), 6.5, 5)
  }
  if ("transfer_label" %in% names(cells)) {
    out$umap_transfer <- save("umap_transferred_labels", plot_umap_cells(
      cells, "transfer_label", "Transferred labels (kNN)"), 6.5, 5)
    tr <- data.frame(label_transfer = cells$transfer_label,
                     label_uncertainty = cells$transfer_uncertainty)
    out$uncertainty <- save("uncertainty_boxplot", plot_uncertainty(
      tr, "label", threshold = 1 - res$unknown_threshold) +
        ggplot2::labs(title = "Uncertainty of the transferred labels",
                      subtitle = "dashed: the \"Unknown\" cut-off"), 7, 4.5)
    cells$unknown <- factor(ifelse(cells$transfer_label == "Unknown", "Unknown", "labelled"),
                            levels = c("labelled", "Unknown"))
    p <- ggplot2::ggplot(cells[order(cells$unknown), ],
                         ggplot2::aes(.data$UMAP_1, .data$UMAP_2, colour = .data$unknown)) +
      ggplot2::geom_point(size = 0.3) +
      ggplot2::scale_colour_manual(values = c(labelled = "grey80", Unknown = "#B2182B"), name = NULL) +
      ggplot2::labs(title = sprintf("\"Unknown\" cells: %d (label probability < %g)",
                                    sum(cells$unknown == "Unknown"), res$unknown_threshold),
                    x = "UMAP 1", y = "UMAP 2") + umap_theme() +
      ggplot2::guides(colour = ggplot2::guide_legend(override.aes = list(size = 3)))
    out$umap_unknown <- save("umap_unknown", p, 6.5, 5)
  }
  out
}

#' Render the HTML report of an annotation workflow run
#'
#' Renders the report template (`inst/report/report.Rmd`) for a finished
#' [run_annotation_workflow()] run: the data, every step with its plots (marker
#' expression on the UMAP, the marker dotplot and the manual labels, the top Wilcoxon
#' markers, CellTypist labels and confidence, the joint UMAP, the transferred labels,
#' their uncertainty and the "Unknown" cells), agreement tables between the methods
#' and the step timings.
#'
#' @param x The output folder of [run_annotation_workflow()] (holding `results.rds` and
#'   `plots/`), or the `scannot_workflow` object it returned.
#' @param output_file The HTML file (default `report.html` in that folder).
#' @param quiet Passed to [rmarkdown::render()].
#' @return The path of the HTML file, invisibly.
#' @export
annotation_report <- function(x, output_file = NULL, quiet = TRUE) {
  call <- rlang::current_env()
  rlang::check_installed(c("rmarkdown", "knitr"), "to render the report")
  dir <- if (inherits(x, "scannot_workflow")) x$out_dir else check_string(x)
  if (!file.exists(file.path(dir, "results.rds"))) {
    abort_scannot(sprintf("'%s' has no results.rds: run run_annotation_workflow() first.", dir),
                  "input", call = call)
  }
  if (!rmarkdown::pandoc_available()) {
    abort_scannot("pandoc is needed to render the report (apt-get install pandoc).", "input",
                  call = call)
  }
  dir <- normalizePath(dir)
  output_file <- output_file %||% file.path(dir, "report.html")
  tmpl <- system.file("report", "report.Rmd", package = "scannot")
  work <- tempfile("scannot-report-")
  dir.create(work)
  on.exit(unlink(work, recursive = TRUE), add = TRUE)
  file.copy(tmpl, file.path(work, "report.Rmd"))
  out <- rmarkdown::render(file.path(work, "report.Rmd"), output_file = basename(output_file),
                           output_dir = work, intermediates_dir = work,
                           params = list(out_dir = dir), quiet = quiet,
                           envir = new.env(parent = globalenv()))
  file.copy(out, output_file, overwrite = TRUE)
  invisible(output_file)
}
