"""App for tests/test_serve.py: a volume written by on_start through a relative path.
The test copies this file into a temporary directory (a relative mount_path is linked
next to the app)."""
import os
from pathlib import Path

import beam


def load():
    path = Path("./weights") / "model.bin"
    path.write_bytes(b"weights-from-on-start")
    return str(path)


@beam.endpoint(on_start=load, volumes=[beam.Volume(name="weights", mount_path="./weights")])
def handler(context):
    return {"on_start_value": context.on_start_value,
            "content": Path("./weights/model.bin").read_bytes(),
            "is_link": os.path.islink("weights"),
            "target": os.path.realpath("weights")}
