"""GPU state that survives a checkpoint: on_start fills GPU memory with a known pattern,
each request checks it bit for bit on the GPU. Used by scripts/gpu-check.sh.

    python -m beam serve examples/gpu/app.py:predict --socket /tmp/gpu.sock
    python -m beam call unix:///tmp/gpu.sock '{}'

Uses PyTorch if importable, else CuPy. $GPU_CHECK_GIB sets the size (default 1 GiB).
The pattern is x[i] = (i * 2654435761) mod 4294967291 as int64: no overflow, and every
element differs from its neighbours, so a lost, shifted or zeroed page shows."""
import os
import time

from beam import endpoint

GIB = float(os.environ.get("GPU_CHECK_GIB", "1"))
MUL, MOD = 2654435761, 4294967291


def _backend():
    try:
        import torch

        if torch.cuda.is_available():
            return "torch"
    except ImportError:
        pass
    try:
        import cupy  # noqa: F401

        return "cupy"
    except ImportError:
        raise RuntimeError("examples/gpu needs PyTorch with CUDA or CuPy") from None


def _pattern(backend, n):
    if backend == "torch":
        import torch

        i = torch.arange(n, dtype=torch.int64, device="cuda")
        return (i * MUL) % MOD
    import cupy as cp

    return (cp.arange(n, dtype=cp.int64) * MUL) % MOD


def _sync(backend):
    if backend == "torch":
        import torch

        torch.cuda.synchronize()
    else:
        import cupy as cp

        cp.cuda.runtime.deviceSynchronize()


def load():
    backend = _backend()
    n = int(GIB * (1 << 30)) // 8
    t0 = time.perf_counter()
    x = _pattern(backend, n)
    _sync(backend)
    checksum = int(x.sum())
    # Give the allocator's cached blocks (the arange temporary) back to the driver: the
    # checkpoint copies every device allocation, and the restore rate is per byte held.
    if backend == "torch":
        import torch

        torch.cuda.empty_cache()
        name = torch.cuda.get_device_name(0)
    else:
        import cupy as cp

        cp.get_default_memory_pool().free_all_blocks()
        name = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
    return {"backend": backend, "x": x, "n": n, "checksum": checksum, "device": name,
            "fill_s": time.perf_counter() - t0}


@endpoint(on_start=load, checkpoint_enabled=True, gpu="any", name="gpu-check")
def predict(context):
    v = context.on_start_value
    backend, x, n = v["backend"], v["x"], v["n"]
    t0 = time.perf_counter()
    expect = _pattern(backend, n)
    if backend == "torch":
        import torch

        equal = bool(torch.equal(x, expect))
    else:
        import cupy as cp

        equal = bool(cp.array_equal(x, expect))
    checksum = int(x.sum())
    del expect
    _sync(backend)
    if backend == "torch":
        import torch

        torch.cuda.empty_cache()
    else:
        import cupy as cp

        cp.get_default_memory_pool().free_all_blocks()
    return {"ok": equal and checksum == v["checksum"], "bit_exact": equal,
            "checksum": checksum, "checksum_at_start": v["checksum"], "bytes": n * 8,
            "device": v["device"], "backend": backend, "check_s": time.perf_counter() - t0,
            "fill_s": v["fill_s"]}
