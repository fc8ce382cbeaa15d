"""The smallest app: no imports, an on_start value, a context.

    python -m beam serve examples/hello/app.py:predict --tcp 127.0.0.1:8765
    python -m beam call tcp://127.0.0.1:8765 '{"name": "Ada"}'
"""
import time

from beam import endpoint


def load():
    # Runs once per container. With checkpoint_enabled, restored replicas skip it.
    return {"greeting": "Hello", "loaded_at": time.time()}


@endpoint(on_start=load, checkpoint_enabled=True, name="hello")
def predict(context, name: str = "world"):
    return {
        "message": f"{context.on_start_value['greeting']}, {name}!",
        "task_id": context.task_id,
        "container_id": context.container_id,
    }
