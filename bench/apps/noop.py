"""The no-op handler bench/serve.py measures: the cost of the serving stack alone.

    beam-worker --no-checkpoint --socket /tmp/s.sock bench/apps/noop.py:predict
"""
from beam import endpoint


@endpoint(name="noop")
def predict():
    return {}
