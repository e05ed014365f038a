"""illico side of bench/wilcoxon.R: illico.asymptotic_wilcoxon (one-vs-rest), timed.

    /tmp/scannot-illico-venv/bin/python bench/peers/wilcoxon_illico.py \
        <dir> <n_genes> <n_cells> [threads] [reps] [float64|float32]

illico 0.6.0 lives in its own venv (it imports statsmodels without declaring it):
    python3 -m venv /tmp/scannot-illico-venv
    /tmp/scannot-illico-venv/bin/pip install illico==0.6.0 statsmodels==0.15.0

<dir> holds the genes x cells dgCMatrix slots written by R (as bench/dotplot.R does):
x.bin (float64), i.bin, p.bin (int32), genes.txt, groups.txt, levels.txt. The matrix
is handed to illico as the cells x genes CSR that AnnData normally holds (sorted
indices), float64 as R has it (or float32, as in an h5ad, if asked). Call:
    asymptotic_wilcoxon(adata, is_log1p=True, group_keys="g", n_threads=threads)
(defaults: continuity and tie correction on, Rust kernels). threads defaults to
$SCANNOT_BENCH_THREADS or 2. A warm-up call on 50 genes first, then best of `reps`
(default 3) timed calls, loading excluded. Writes <dir>/wilcoxon_illico.csv
(group, gene, z, pval, statistic, fold_change). Prints: ... seconds=<best>
"""
import os
import sys
import time
import warnings
from importlib.metadata import version

os.environ.setdefault("TQDM_DISABLE", "1")
warnings.filterwarnings("ignore")

import anndata as ad  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import scipy.sparse as sp  # noqa: E402
from illico import asymptotic_wilcoxon  # noqa: E402
from loguru import logger  # noqa: E402  (illico logs INFO lines through loguru)

logger.remove()
logger.add(sys.stderr, level="WARNING")

d, nrow, ncol = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
threads = int(sys.argv[4]) if len(sys.argv) > 4 else int(os.environ.get("SCANNOT_BENCH_THREADS", "2"))
reps = int(sys.argv[5]) if len(sys.argv) > 5 else 3
dtype = sys.argv[6] if len(sys.argv) > 6 else "float64"

x = np.fromfile(f"{d}/x.bin", dtype="<f8").astype(dtype)
i = np.fromfile(f"{d}/i.bin", dtype="<i4")
p = np.fromfile(f"{d}/p.bin", dtype="<i4")
X = sp.csr_matrix((x, i, p), shape=(ncol, nrow))  # genes x cells CSC == cells x genes CSR
X.sort_indices()
genes = open(f"{d}/genes.txt").read().split("\n")[:nrow]
groups = open(f"{d}/groups.txt").read().split("\n")[:ncol]
levels = [l for l in open(f"{d}/levels.txt").read().split("\n") if l]
a = ad.AnnData(X=X, obs=pd.DataFrame({"g": pd.Categorical(groups, categories=levels)}))
a.var_names = genes

asymptotic_wilcoxon(a[:, :50].copy(), is_log1p=True, group_keys="g", n_threads=threads)

best, res = 1e18, None
for _ in range(reps):
    t0 = time.perf_counter()
    res = asymptotic_wilcoxon(a, is_log1p=True, group_keys="g", n_threads=threads)
    best = min(best, time.perf_counter() - t0)

out = res.reset_index().rename(columns={"pert": "group", "feature": "gene", "z_score": "z",
                                        "p_value": "pval"})
out[["group", "gene", "z", "pval", "statistic", "fold_change"]].to_csv(
    f"{d}/wilcoxon_illico.csv", index=False, float_format="%.17g")
print(f"illico {version('illico')} asymptotic_wilcoxon, {ncol} cells x {nrow} genes, "
      f"{len(levels)} groups, one-vs-rest, {dtype} CSR, {threads} threads (best of {reps}): "
      f"seconds={best:.4f}")
