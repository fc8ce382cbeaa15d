"""The weights app, with the weights memory-mapped read-only from its Volume instead of
read into memory: the pages are clean and file-backed, so CRIU leaves them out of the
image (the file is still there at restore) and the image stays small whatever the size
of the weights. The first start writes the file; every start after maps it.

    python -m beam serve examples/weights_mmap/app.py:predict
"""
import hashlib
import os

import numpy as np

from beam import Volume, endpoint

CACHE = "./weights"
SIZE_MB = int(os.environ.get("WEIGHTS_MB", "500"))


def write_once(path):
    if os.path.exists(path):
        return
    rng = np.random.default_rng(0)
    w = rng.standard_normal(SIZE_MB * (1 << 20) // 4, dtype=np.float32)
    np.save(path + ".tmp.npy", w)
    del w  # the anonymous copy would otherwise end up in the image
    os.replace(path + ".tmp.npy", path)


def load():
    path = os.path.join(CACHE, f"weights-{SIZE_MB}mb.npy")
    write_once(path)
    # mmap_mode="r": a read-only shared mapping of the file. Never copy it (np.array(w),
    # w + 0, astype): a copy is anonymous memory and goes into the image.
    weights = np.load(path, mmap_mode="r")
    return {"weights": weights, "sha256": hashlib.sha256(weights[: 1 << 20].tobytes()).hexdigest(),
            "pid": os.getpid(), "loaded": os.urandom(8).hex()}


@endpoint(on_start=load, checkpoint_enabled=True, name="weights_mmap",
          volumes=[Volume(name="weights-mmap", mount_path=CACHE)])
def predict(context, index: int = 0, full: bool = False):
    v = context.on_start_value
    w = v["weights"]
    out = {"value": float(w[index % w.size]), "n": int(w.size), "sha256": v["sha256"],
           "loaded": v["loaded"]}
    if full:  # every mapped byte, read through the restored mapping
        out["full_sha256"] = hashlib.sha256(memoryview(w).cast("B")).hexdigest()
    return out
