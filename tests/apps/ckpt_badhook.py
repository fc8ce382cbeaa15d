"""A before_checkpoint hook that fails: the worker must serve without a checkpoint."""
import beam
from beam import endpoint


@beam.before_checkpoint
def broken():
    raise RuntimeError("cannot close the database")


@endpoint(on_start=lambda: 41, checkpoint_enabled=True, name="badhook")
def predict(context):
    return context.on_start_value + 1
