"""Peer side of bench/celltypist.R: train a CellTypist model on the reference cells, then time
celltypist.annotate (best match, no voting) on the query cells.

    python celltypist_celltypist.py DIR N_GENES
DIR holds ref_{x,i,p}.bin / query_{x,i,p}.bin (dgCMatrix slots, genes x cells = CSR cells x
genes), genes.txt, ref_labels.txt, query_cells.txt. Writes model.pkl, labels.txt, prob.bin.
"""
import sys
import time
import warnings

import anndata as ad
import celltypist
import numpy as np
import pandas as pd
import scipy.sparse as sp

warnings.filterwarnings("ignore")
d, n_genes = sys.argv[1], int(sys.argv[2])
genes = [x.rstrip("\n") for x in open(f"{d}/genes.txt")]


def load(prefix):
    x = np.fromfile(f"{d}/{prefix}_x.bin", dtype=np.float64)
    i = np.fromfile(f"{d}/{prefix}_i.bin", dtype=np.int32)
    p = np.fromfile(f"{d}/{prefix}_p.bin", dtype=np.int32)
    return sp.csr_matrix((x, i, p), shape=(len(p) - 1, n_genes))


ref = ad.AnnData(load("ref"), var=pd.DataFrame(index=genes))
ref.obs["ct"] = [x.rstrip("\n") for x in open(f"{d}/ref_labels.txt")]
t0 = time.perf_counter()
model = celltypist.train(ref, "ct", max_iter=100, n_jobs=1)
print(f"celltypist.train ({ref.n_obs} cells, lbfgs, max_iter 100): {time.perf_counter() - t0:.1f} s")
model.write(f"{d}/model.pkl")
cells = [x.rstrip("\n") for x in open(f"{d}/query_cells.txt")]
query = ad.AnnData(load("query"), obs=pd.DataFrame(index=cells), var=pd.DataFrame(index=genes))
times = []
for _ in range(2):
    q = query.copy()
    t0 = time.perf_counter()
    res = celltypist.annotate(q, model=f"{d}/model.pkl", mode="best match")
    times.append(time.perf_counter() - t0)
with open(f"{d}/labels.txt", "w") as fh:
    fh.write("\n".join(res.predicted_labels["predicted_labels"].astype(str)) + "\n")
res.probability_matrix.to_numpy().astype(np.float64).T.tofile(f"{d}/prob.bin")
print(f"celltypist.annotate best match ({query.n_obs} cells): seconds={min(times):.4f}")
