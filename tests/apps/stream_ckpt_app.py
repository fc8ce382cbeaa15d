"""App for tests/test_stream.py: a streaming generator in a checkpointed replica."""
import os

import beam


def load():
    return {"loaded_by": os.getpid()}


@beam.endpoint(name="stream-ckpt", on_start=load, checkpoint_enabled=True)
def handler(context, n=3):
    for i in range(n):
        yield {"i": i, "loaded_by": context.on_start_value["loaded_by"]}
