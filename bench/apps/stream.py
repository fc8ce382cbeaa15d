"""The streaming handler bench/serve.py measures: a generator of small chunks, the
cost of the streaming path alone. bench/apps/stream_fastapi.py serves the same one.

    beam-worker --no-checkpoint --socket /tmp/s.sock bench/apps/stream.py:handler
"""
from beam import endpoint


def chunks(n: int):
    for i in range(n):
        yield {"i": i}


@endpoint(name="stream")
def handler(n: int = 1000):
    return chunks(n)
