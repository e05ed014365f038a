"""scanpy side of bench/wilcoxon.R: sc.tl.rank_genes_groups(method="wilcoxon"), timed.

    python bench/peers/wilcoxon_scanpy.py <dir> <n_genes> <n_cells> [threads] [reps]

<dir> holds the genes x cells dgCMatrix slots written by R (as bench/dotplot.R does):
x.bin (float64), i.bin, p.bin (int32), genes.txt, groups.txt (one label per cell),
levels.txt. One-vs-rest, all genes (n_genes=None), every group, defaults otherwise
(tie_correct=False, pts=False, BH). numba (scanpy's rankdata) runs on `threads` threads
(default $SCANNOT_BENCH_THREADS or 2). A warm-up call on 50 genes compiles numba first;
then best of `reps` (default 1) timed calls, loading excluded. Writes
<dir>/wilcoxon_scanpy.csv (group, gene, score, pval, pval_adj, logfoldchange; score and
logfoldchange are scanpy's float32 values).
Prints: ... seconds=<best>
"""
import os
import sys
import time
import warnings
from importlib.metadata import version

import anndata as ad
import numba
import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp

warnings.filterwarnings("ignore")

d, nrow, ncol = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
threads = int(sys.argv[4]) if len(sys.argv) > 4 else int(os.environ.get("SCANNOT_BENCH_THREADS", "2"))
reps = int(sys.argv[5]) if len(sys.argv) > 5 else 1
numba.set_num_threads(threads)

x = np.fromfile(f"{d}/x.bin", dtype="<f8")
i = np.fromfile(f"{d}/i.bin", dtype="<i4")
p = np.fromfile(f"{d}/p.bin", dtype="<i4")
X = sp.csr_matrix((x, i, p), shape=(ncol, nrow))  # genes x cells CSC == cells x genes CSR
genes = open(f"{d}/genes.txt").read().split("\n")[:nrow]
groups = open(f"{d}/groups.txt").read().split("\n")[:ncol]
levels = [l for l in open(f"{d}/levels.txt").read().split("\n") if l]


def make():
    a = ad.AnnData(X=X.copy(), obs=pd.DataFrame({"g": pd.Categorical(groups, categories=levels)}))
    a.var_names = genes
    return a


warm = make()[:, :50].copy()
sc.tl.rank_genes_groups(warm, "g", method="wilcoxon", use_raw=False, n_genes=None)

best, a = 1e18, None
for _ in range(reps):
    a = make()
    t0 = time.perf_counter()
    sc.tl.rank_genes_groups(a, "g", method="wilcoxon", use_raw=False, n_genes=None)
    best = min(best, time.perf_counter() - t0)

r = a.uns["rank_genes_groups"]
rows = []
for g in r["names"].dtype.names:
    rows.append(pd.DataFrame({
        "group": g, "gene": r["names"][g], "score": r["scores"][g].astype(np.float64),
        "pval": r["pvals"][g], "pval_adj": r["pvals_adj"][g],
        "logfoldchange": r["logfoldchanges"][g].astype(np.float64),
    }))
pd.concat(rows).to_csv(f"{d}/wilcoxon_scanpy.csv", index=False, float_format="%.9g")
print(f"scanpy {version('scanpy')} rank_genes_groups wilcoxon, {ncol} cells x {nrow} genes, "
      f"{len(levels)} groups, one-vs-rest, numba {threads} threads (best of {reps}): "
      f"seconds={best:.4f}")
