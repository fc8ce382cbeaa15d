"""Checkpoint test app: counts on_start runs in a file, keeps state in memory, uses a
secret in on_start and returns what the tests need to check after a restore."""
import hashlib
import os
import random

import beam
from beam import endpoint

COUNTER = os.environ.get("CKPT_COUNTER_FILE", "/tmp/ckpt-counter")
EVENTS = os.environ.get("CKPT_EVENTS_FILE", "/tmp/ckpt-events")


def _event(what):
    with open(EVENTS, "a") as f:
        f.write(f"{what} {os.getpid()}\n")


@beam.before_checkpoint
def first_registered():
    _event("before_checkpoint:first")


@beam.before_checkpoint
def second_registered():
    _event("before_checkpoint:second")


@beam.after_restore
def restored_a():
    _event("after_restore:a")


@beam.after_restore
def restored_b():
    _event("after_restore:b")


def load():
    with open(COUNTER, "a") as f:
        f.write("on_start\n")
    secret = os.environ.get("BEAM_TEST_SECRET")
    assert secret, "secret must be visible to on_start"
    # Memory state built at start that must survive a restore bit for bit.
    blob = bytes(random.Random(1234).getrandbits(8) for _ in range(1 << 14))
    return {"digest": hashlib.sha256(blob).hexdigest(), "blob": blob,
            "token_len": len(secret)}


@endpoint(on_start=load, checkpoint_enabled=True, secrets=["BEAM_TEST_SECRET"],
          env={"CKPT_MODE": "on"}, name="ckpt")
def predict(context, what: str = "state"):
    v = context.on_start_value
    return {
        "digest": hashlib.sha256(v["blob"]).hexdigest(),
        "expected": v["digest"],
        "token_len": v["token_len"],
        "secret_now": os.environ.get("BEAM_TEST_SECRET"),
        "mode": os.environ.get("CKPT_MODE"),
        "random": random.random(),
        "container_id": context.container_id,
        "pid": os.getpid(),
    }
