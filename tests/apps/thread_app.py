"""on_start starts a background thread (a metrics flusher, a cache refresher...): it
must keep running after the worker is ready."""
import os
import threading
import time

from beam import endpoint

TICKS = os.environ["THREAD_TICKS_FILE"]


def _tick():
    while True:
        with open(TICKS, "a") as f:
            f.write("tick\n")
        time.sleep(0.05)


def load():
    threading.Thread(target=_tick, daemon=True).start()
    return "started"


@endpoint(on_start=load, name="threads")
def handler(context):
    return context.on_start_value
