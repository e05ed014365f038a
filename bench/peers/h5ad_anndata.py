"""Peer for bench/h5ad.R: write the seed-scale h5ad with anndata, then time read_h5ad.
    python h5ad_anndata.py write DIR NCELLS NGENES   (x.bin f32, i.bin/p.bin int32 -> DIR/seed.h5ad)
    python h5ad_anndata.py read FILE                 (prints first_seconds=<first read in the process> seconds=<best of 3>)"""
import sys, time
import numpy as np, pandas as pd, scipy.sparse as sp
import anndata as ad
from importlib.metadata import version

AD_VERSION = version("anndata")

if sys.argv[1] == "write":
    d, n, g = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    x = np.fromfile(f"{d}/x.bin", dtype=np.float32)
    i = np.fromfile(f"{d}/i.bin", dtype=np.int32)
    p = np.fromfile(f"{d}/p.bin", dtype=np.int32)
    X = sp.csr_matrix((x, i, p), shape=(n, g))
    obs = pd.DataFrame({"cell_type": pd.Categorical(open(f"{d}/types.txt").read().split("\n")[:n])},
                       index=[f"cell{k:06d}" for k in range(n)])
    var = pd.DataFrame(index=open(f"{d}/genes.txt").read().split("\n")[:g])
    ad.AnnData(X=X, obs=obs, var=var).write_h5ad(f"{d}/seed.h5ad")
else:
    best, best_cpu, first = float("inf"), float("inf"), None
    for _ in range(3):
        t, c = time.perf_counter(), time.process_time()
        a = ad.read_h5ad(sys.argv[2])
        el = time.perf_counter() - t
        first = el if first is None else first
        best = min(best, el)
        best_cpu = min(best_cpu, time.process_time() - c)
        nnz = a.X.nnz
        del a
    print(f"anndata {AD_VERSION} read_h5ad: nnz={nnz} cpu_seconds={best_cpu:.4f} first_seconds={first:.4f} seconds={best:.4f}")
