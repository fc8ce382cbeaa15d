"""GPU test app for tests/test_gpu.py.

`predict` declares gpu="T4" and "uses CUDA" by loading the libcuda TEST DOUBLE
(tests/cuda_double, path in $CUDA_DOUBLE_PATH) in on_start: /proc/PID/maps then shows
libcuda.so.1, so the supervisor drives the GPU checkpoint steps on this process.
`cpu_predict` never touches CUDA."""
import ctypes
import hashlib
import os

from beam import endpoint

COUNTER = os.environ.get("GPU_COUNTER_FILE", "/tmp/gpu-counter")


def _state():
    with open(COUNTER, "a") as f:
        f.write("on_start\n")
    blob = os.urandom(1 << 16)
    return {"digest": hashlib.sha256(blob).hexdigest(), "blob": blob}


def load_gpu():
    v = _state()
    path = os.environ.get("CUDA_DOUBLE_PATH")
    v["lib"] = ctypes.CDLL(path) if path else None  # kept: stays mapped
    return v


def _answer(context):
    v = context.on_start_value
    return {"digest": hashlib.sha256(v["blob"]).hexdigest(), "expected": v["digest"],
            "pid": os.getpid()}


@endpoint(on_start=load_gpu, checkpoint_enabled=True, gpu="T4", name="gpu", workers=2)
def predict(context):
    return _answer(context)


@endpoint(on_start=_state, checkpoint_enabled=True, name="cpu")
def cpu_predict(context):
    return _answer(context)
