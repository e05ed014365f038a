# CellTypist's automatic over-clustering for majority voting (spec section 4.3).

# Leiden resolution by number of cells, as CellTypist.
celltypist_resolution <- function(n) {
  if (n < 5000) 5 else if (n < 20000) 10 else if (n < 40000) 15 else if (n < 100000) 20 else
    if (n < 200000) 25 else 30
}

# The neighbour graph a Seurat object already has (`<assay>_snn` first), or NULL.
seurat_graph <- function(object, assay = NULL) {
  gs <- names(object@graphs)
  if (!length(gs)) return(NULL)
  if (is.null(assay)) assay <- SeuratObject::DefaultAssay(object)
  pick <- intersect(c(paste0(assay, "_snn"), paste0(assay, "_nn")), gs)
  methods::as(object@graphs[[if (length(pick)) pick[1] else gs[1]]], "CsparseMatrix")
}

# Run `expr` with the RNG seeded, leaving the caller's RNG state as it was.
with_seed <- function(seed, expr) {
  has <- exists(".Random.seed", envir = globalenv(), inherits = FALSE)
  old <- if (has) get(".Random.seed", envir = globalenv(), inherits = FALSE)
  on.exit(if (has) assign(".Random.seed", old, envir = globalenv()) else
    rm(".Random.seed", envir = globalenv()), add = TRUE)
  set.seed(seed)
  expr
}

# Top `n_top` genes by scanpy's 'seurat' flavour: dispersion var/mean of expm1 data,
# log, z-scored within 20 bins of log1p(mean); genes in fewer than 5 cells are skipped.
celltypist_hvg <- function(m, n_top = 2500) {
  e <- m
  if (methods::is(e, "sparseMatrix")) e@x <- expm1(e@x) else e <- expm1(e)
  n <- ncol(e)
  ncells <- if (methods::is(m, "sparseMatrix")) Matrix::rowSums(m != 0) else rowSums(m != 0)
  mu <- Matrix::rowMeans(e)
  v <- (Matrix::rowMeans(e^2) - mu^2) * n / max(n - 1, 1)
  mu[mu == 0] <- 1e-12
  disp <- v / mu
  disp[disp == 0] <- NA
  disp <- log(disp)
  lm <- log1p(mu)
  bins <- cut(lm, 20)
  z <- stats::ave(disp, bins, FUN = function(d) {
    s <- stats::sd(d, na.rm = TRUE)
    if (is.na(s) || s == 0) d - mean(d, na.rm = TRUE) else (d - mean(d, na.rm = TRUE)) / s
  })
  z[ncells < 5 | is.na(z)] <- -Inf
  ok <- which(is.finite(z))
  ok[order(-z[ok])][seq_len(min(n_top, length(ok)))]
}

# PCA (50 components) of the HVGs, scaled with population sd and clipped at 10.
celltypist_pca <- function(m, n_pcs = 50) {
  x <- m[celltypist_hvg(m), , drop = FALSE]
  x <- t(as.matrix(x))
  mu <- colMeans(x)
  s <- sqrt(colMeans(sweep(x, 2, mu)^2))
  s[s == 0] <- 1
  x <- sweep(sweep(x, 2, mu), 2, s, "/")
  x[x > 10] <- 10
  k <- min(n_pcs, ncol(x) - 1L, nrow(x) - 1L)
  if (requireNamespace("irlba", quietly = TRUE) && k < min(dim(x)) / 2) {
    p <- irlba::irlba(x, nv = k, center = colMeans(x))
    p$u %*% diag(p$d, k)
  } else {
    stats::prcomp(x, center = TRUE, scale. = FALSE, rank. = k)$x
  }
}

# Cluster labels ("0", "1", ...) of the cells of `m` by Leiden on a neighbour graph.
celltypist_over_cluster <- function(m, neighbors, n_threads, call, seed = 0L) {
  rlang::check_installed("igraph", "to build CellTypist's over-clustering for majority voting")
  n <- ncol(m)
  graph <- neighbors$graph
  if (!is.null(graph) && !identical(dim(graph), c(n, n))) graph <- NULL
  with_seed(seed, {
    if (is.null(graph)) {
      pca <- neighbors$pca
      if (is.null(pca) || nrow(pca) != n) pca <- celltypist_pca(m)
      pca <- unname(as.matrix(pca))
      storage.mode(pca) <- "double"
      k <- min(10L, n)
      nn <- rs_call(rs_knn_transfer(pca, nrow(pca), ncol(pca), pca, nrow(pca), ncol(pca), k,
                                    integer(), integer(), n_threads), call = call)
      idx <- matrix(nn$index, n, k, byrow = TRUE)
      from <- rep(seq_len(n), k)
      to <- as.vector(idx)
      keep <- from != to
      graph <- Matrix::sparseMatrix(i = from[keep], j = to[keep], x = 1, dims = c(n, n))
      graph <- graph + Matrix::t(graph)
      graph@x[] <- 1
    }
    g <- igraph::graph_from_adjacency_matrix(graph, mode = "undirected", weighted = TRUE,
                                             diag = FALSE)
    cl <- igraph::cluster_leiden(g, objective_function = "modularity",
                                 resolution_parameter = celltypist_resolution(n),
                                 n_iterations = 2)
  })
  memb <- igraph::membership(cl)
  # relabel by first appearance so labels do not depend on igraph's numbering
  as.character(match(memb, unique(memb)) - 1L)
}
