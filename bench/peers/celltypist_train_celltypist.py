"""Peer side of bench/celltypist_train.R: time celltypist.train (defaults: all genes,
LogisticRegression lbfgs, max_iter 1000 below 50k cells) on the reference cells, then report
the held-out accuracy of its model on the query cells.

    python celltypist_train_celltypist.py DIR N_GENES [N_JOBS]
DIR holds ref_{x,i,p}.bin / query_{x,i,p}.bin (dgCMatrix slots, genes x cells = CSR cells x
genes), genes.txt, ref_labels.txt, query_labels.txt. Writes model.pkl and labels.txt.
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
n_jobs = int(sys.argv[3]) if len(sys.argv) > 3 else None
genes = [x.rstrip("\n") for x in open(f"{d}/genes.txt")]


def load(prefix):
    x = np.fromfile(f"{d}/{prefix}_x.bin", dtype=np.float64)
    i = np.fromfile(f"{d}/{prefix}_i.bin", dtype=np.int32)
    p = np.fromfile(f"{d}/{prefix}_p.bin", dtype=np.int32)
    return sp.csr_matrix((x, i, p), shape=(len(p) - 1, n_genes))


ref = ad.AnnData(load("ref"), var=pd.DataFrame(index=genes))
ref.obs["ct"] = [x.rstrip("\n") for x in open(f"{d}/ref_labels.txt")]
t0, c0 = time.perf_counter(), time.process_time()
model = celltypist.train(ref, "ct", n_jobs=n_jobs)
secs, cpu = time.perf_counter() - t0, time.process_time() - c0
with open(f"{d}/cpu.txt", "w") as fh:
    fh.write(f"cpu_seconds={cpu:.3f}\n")
model.write(f"{d}/model.pkl")
query = ad.AnnData(load("query"), var=pd.DataFrame(index=genes))
res = celltypist.annotate(query, model=f"{d}/model.pkl", mode="best match")
pred = res.predicted_labels["predicted_labels"].astype(str).to_numpy()
truth = np.array([x.rstrip("\n") for x in open(f"{d}/query_labels.txt")])
with open(f"{d}/labels.txt", "w") as fh:
    fh.write("\n".join(pred) + "\n")
print(f"celltypist n_iter_: {list(model.classifier.n_iter_)}")
print(f"celltypist held-out accuracy: {100 * np.mean(pred == truth):.2f}%")
print(f"celltypist.train ({ref.n_obs} cells x {ref.n_vars} genes, lbfgs, defaults, n_jobs={n_jobs}): seconds={secs:.3f}")
