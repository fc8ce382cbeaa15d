"""Checkpoint test app with a large, deterministic memory state: the handler checks
every byte of it against the digest on_start computed (bit-exact after a restore)."""
import hashlib
import os

from beam import endpoint

MB = int(os.environ.get("MEMORY_APP_MB", "256"))


def load():
    import numpy as np
    data = np.random.default_rng(7).integers(0, 2**63, size=MB * 1024 * 1024 // 8, dtype=np.int64)
    return {"data": data, "digest": hashlib.sha256(data.tobytes()).hexdigest()}


@endpoint(on_start=load, checkpoint_enabled=True)
def predict(context, full: bool = False, i: int = 0):
    v = context.on_start_value
    if full:
        return hashlib.sha256(v["data"].tobytes()).hexdigest() == v["digest"]
    return int(v["data"][i])
