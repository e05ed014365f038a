"""scanpy side of bench/dotplot.R: the same data, sc.pl.dotplot's frames, timed."""
import json
import sys
import time

import matplotlib

matplotlib.use("Agg")
import anndata as ad  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import scanpy as sc  # noqa: E402
import scipy.sparse as sp  # noqa: E402

d, nrow, ncol = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
x = np.fromfile(f"{d}/x.bin", dtype="<f8")
i = np.fromfile(f"{d}/i.bin", dtype="<i4")
p = np.fromfile(f"{d}/p.bin", dtype="<i4")
# genes x cells CSC == cells x genes CSR
X = sp.csr_matrix((x, i, p), shape=(ncol, nrow))
genes = open(f"{d}/genes.txt").read().split("\n")[:nrow]
groups = open(f"{d}/groups.txt").read().split("\n")[:ncol]
levels = [l for l in open(f"{d}/levels.txt").read().split("\n") if l]
markers = json.load(open(f"{d}/markers.json"))
a = ad.AnnData(X=X, obs=pd.DataFrame({"g": pd.Categorical(groups, categories=levels)}))
a.var_names = genes
best = 1e9
for _ in range(3):
    t0 = time.perf_counter()
    dp = sc.pl.dotplot(a, markers, groupby="g", standard_scale="var", return_fig=True, show=False)
    best = min(best, time.perf_counter() - t0)
dp.dot_color_df.to_csv(f"{d}/scanpy_color.csv")
print(f"scanpy {sc.__version__} sc.pl.dotplot data (best of 3): seconds={best:.4f}")
