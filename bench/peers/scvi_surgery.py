"""scvi-tools peer of bench/scvi_surgery.R: train an SCVI reference with the scArches settings,
then time scArches surgery (load_query_data + train) per epoch.

Usage: python scvi_surgery.py <dir> <threads> <ref_epochs> <query_epochs> [settings]
settings: "scarches" (default: 2 layers, layer norm, no batch norm, encode_covariates,
dropout 0.2; reference in <dir>/ref) or "default" (scvi-tools' SCVI defaults: 1 layer,
batch norm, no layer norm, dropout 0.1; reference in <dir>/ref_default).
<dir> holds (written by bench/scvi_surgery.R): x.bin i.bin p.bin (genes x cells CSC counts,
float64 / int32 / int32), genes.txt, batch.txt (batch per cell), set.txt ("ref" / "query").
Writes <dir>/<ref>/model.pt (the reference, also used by scannot), <dir>/<ref>/scvi_latent.csv
and <dir>/<ref>/scvi_history.csv (the query run). Prints seconds=<median seconds per query epoch>.
"""
import os
import sys
import time

import numpy as np


def main(d, threads, ref_epochs, query_epochs, settings="scarches"):
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp
    import scvi
    import torch
    from lightning.pytorch.callbacks import Callback

    torch.set_num_threads(threads)
    genes = open(os.path.join(d, "genes.txt")).read().split("\n")[:-1]
    batch = np.array(open(os.path.join(d, "batch.txt")).read().split("\n")[:-1])
    sets = np.array(open(os.path.join(d, "set.txt")).read().split("\n")[:-1])
    x = np.fromfile(os.path.join(d, "x.bin"), dtype=np.float64)
    i = np.fromfile(os.path.join(d, "i.bin"), dtype=np.int32)
    p = np.fromfile(os.path.join(d, "p.bin"), dtype=np.int32)
    m = sp.csc_matrix((x.astype(np.float32), i, p), shape=(len(genes), len(batch))).T.tocsr()

    def adata(mask):
        a = ad.AnnData(X=m[mask], obs=pd.DataFrame({"batch": batch[mask]}))
        a.obs_names = [f"c{k}" for k in np.flatnonzero(mask)]
        a.var_names = genes
        return a

    if settings not in ("scarches", "default"):
        raise SystemExit(f"unknown settings {settings!r}: use scarches or default")
    ref_dir = os.path.join(d, "ref" if settings == "scarches" else "ref_default")
    arch = dict(n_layers=2, use_layer_norm="both", use_batch_norm="none",
                encode_covariates=True, dropout_rate=0.2) if settings == "scarches" else {}
    scvi.settings.seed = 0
    if not os.path.exists(os.path.join(ref_dir, "model.pt")):
        ref = adata(sets == "ref")
        scvi.model.SCVI.setup_anndata(ref, batch_key="batch")
        model = scvi.model.SCVI(ref, **arch)
        t0 = time.perf_counter()
        model.train(max_epochs=ref_epochs, accelerator="cpu", enable_progress_bar=False)
        print(f"reference: {ref.n_obs} cells, {ref_epochs} epochs in "
              f"{time.perf_counter() - t0:.1f} s")
        model.save(ref_dir, overwrite=True)

    query = adata(sets == "query")

    class Timer(Callback):
        def __init__(self):
            self.t = []

        def on_train_epoch_start(self, trainer, module):
            self.t0 = time.perf_counter()

        def on_validation_epoch_end(self, trainer, module):
            # training + validation of the epoch, as scannot's epoch
            self.t.append(time.perf_counter() - self.t0)

    scvi.settings.seed = 0
    q = scvi.model.SCVI.load_query_data(query, ref_dir, freeze_dropout=True, accelerator="cpu")
    timer = Timer()
    q.train(
        max_epochs=query_epochs,
        accelerator="cpu",
        enable_progress_bar=False,
        check_val_every_n_epoch=1,
        callbacks=[timer],
    )
    h = pd.concat([q.history["elbo_train"], q.history["elbo_validation"]], axis=1)
    h.to_csv(os.path.join(ref_dir, "scvi_history.csv"))
    np.savetxt(os.path.join(ref_dir, "scvi_latent.csv"), q.get_latent_representation(), delimiter=",")
    per_epoch = float(np.median(timer.t))
    print(f"scvi-tools {scvi.__version__} ({settings} settings): {query.n_obs} query cells x {query.n_vars} genes, "
          f"{threads} threads, epochs {', '.join(f'{t:.2f}' for t in timer.t)} s; "
          f"final elbo_validation {h['elbo_validation'].iloc[-1]:.3f}")
    print(f"seconds={per_epoch:.4f}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]),
         sys.argv[5] if len(sys.argv) > 5 else "scarches")
