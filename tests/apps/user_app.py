"""An app as a user writes it, for tests that go the user's way (`python -m beam serve`
from a shell): reads one secret in on_start and never reads another, prints from
on_start, from the handler and at exit, and reports its environment."""
import atexit
import os
import sys
import time

from beam import endpoint


def _bye():
    print("atexit-ran-in-worker", os.getpid())


def load():
    token = os.environ["USER_SECRET_READ"]  # e.g. to download weights
    print("on-start-printed-this-once")
    atexit.register(_bye)
    return {"token_len": len(token)}


@endpoint(on_start=load, checkpoint_enabled=True,
          secrets=["USER_SECRET_READ", "USER_SECRET_UNREAD"], env={"USER_DECLARED": "declared"})
def predict(context, say: str = "", crash: bool = False, big: int = 0, sleep: float = 0):
    time.sleep(sleep)
    if say:
        print(say)  # no flush: line buffering must carry it
    if crash:
        sys.stdout.flush()
        os._exit(3)
    names = ("USER_SECRET_READ", "USER_SECRET_UNREAD", "USER_DECLARED", "USER_UNDECLARED",
             "TZ", "OMP_NUM_THREADS")
    return {"env": {n: os.environ.get(n) for n in names},
            "token_len": context.on_start_value["token_len"], "pad": "x" * big}
