"""Shared-store test app (tests/test_store.py): every on_start run appends a line to
$STORE_MARKER, so a test counts them; $STORE_SLEEP stretches on_start (a lease held
while it runs), $STORE_MB keeps that many MiB of touched memory (a larger image)."""
import os
import time

from beam import endpoint

MARKER = os.environ.get("STORE_MARKER", "/tmp/store-marker")


def load():
    with open(MARKER, "a") as f:
        f.write(f"on_start {os.getpid()}\n")
    time.sleep(float(os.environ.get("STORE_SLEEP", "0")))
    return {"blob": b"\x01" * (int(os.environ.get("STORE_MB", "0")) << 20)}


@endpoint(on_start=load, checkpoint_enabled=True, name="store")
def predict(context):
    return {"blob_len": len(context.on_start_value["blob"]), "pid": os.getpid()}
