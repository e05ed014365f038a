"""scArches 0.6.1 weighted kNN transfer on embeddings written by bench/knn.R.

    python knn_scarches.py DIR N_REF N_QUERY DIM K

Reads DIR/{reference,query}.bin (float64 row-major) and DIR/labels.txt, times
weighted_knn_trainer + weighted_knn_transfer (best of 2; imports and I/O excluded),
prints `seconds=` and writes DIR/scarches_labels.txt and DIR/scarches_uncert.bin.
"""
import os
import sys
import time
import warnings

import numpy as np
import pandas as pd
import anndata

anndata.read = anndata.read_h5ad  # scarches 0.6.1 imports anndata.read
warnings.filterwarnings("ignore", category=FutureWarning)
from scarches.utils.knn import weighted_knn_trainer, weighted_knn_transfer  # noqa: E402

d, n_ref, n_query, dim, k = sys.argv[1], *map(int, sys.argv[2:6])
xr = np.fromfile(os.path.join(d, "reference.bin"), "<f8").reshape(n_ref, dim)
xq = np.fromfile(os.path.join(d, "query.bin"), "<f8").reshape(n_query, dim)
labels = np.array(open(os.path.join(d, "labels.txt")).read().splitlines(), dtype=object)
ref = anndata.AnnData(X=np.zeros((n_ref, 1)), obs=pd.DataFrame({"cell_type": labels},
                      index=[f"r{i}" for i in range(n_ref)]))
ref.obsm["X_scvi"] = xr
qry = anndata.AnnData(X=np.zeros((n_query, 1)),
                      obs=pd.DataFrame(index=[f"q{i}" for i in range(n_query)]))
qry.obsm["X_scvi"] = xq
times = []
for _ in range(2):
    t0 = time.perf_counter()
    model = weighted_knn_trainer(ref, "X_scvi", n_neighbors=k)
    lab, unc = weighted_knn_transfer(qry, "X_scvi", ref.obs, "cell_type", model)
    times.append(time.perf_counter() - t0)
with open(os.path.join(d, "scarches_labels.txt"), "w") as f:
    f.write("\n".join(lab["cell_type"].astype(str)) + "\n")
unc["cell_type"].to_numpy(dtype="<f8").tofile(os.path.join(d, "scarches_uncert.bin"))
print(f"scArches weighted_knn_trainer + transfer (k={k}): best of 2 seconds={min(times):.3f}")
