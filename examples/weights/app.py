"""An app holding ~500 MB of weights in memory, loaded in on_start from a Volume that
caches them (the seed's model-cache pattern): the first start writes the cache, later
cold starts read it, and a restore from the checkpoint reads neither.

    python -m beam serve examples/weights/app.py:predict
"""
import hashlib
import os

import numpy as np

from beam import Volume, endpoint

CACHE = "./weights"
SIZE_MB = int(os.environ.get("WEIGHTS_MB", "500"))


def load():
    path = os.path.join(CACHE, f"weights-{SIZE_MB}mb.npy")
    if not os.path.exists(path):
        rng = np.random.default_rng(0)
        w = rng.standard_normal(SIZE_MB * (1 << 20) // 4, dtype=np.float32)
        np.save(path + ".tmp.npy", w)
        os.replace(path + ".tmp.npy", path)
    weights = np.load(path)  # read into memory, not mmap: real loaders copy and convert
    return {"weights": weights, "sha256": hashlib.sha256(weights[: 1 << 20].tobytes()).hexdigest()}


@endpoint(on_start=load, checkpoint_enabled=True, name="weights",
          volumes=[Volume(name="weights", mount_path=CACHE)])
def predict(context, index: int = 0):
    w = context.on_start_value["weights"]
    return {"value": float(w[index % w.size]), "n": int(w.size),
            "sha256": context.on_start_value["sha256"]}
