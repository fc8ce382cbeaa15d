"""An app CRIU refuses to checkpoint: on_start keeps an established TCP connection
(CRIU dumps those only with --tcp-established, which the worker never asks for)."""
import os
import socket

from beam import endpoint


def load():
    port = int(os.environ["CKPT_EXTERNAL_PORT"])
    return socket.create_connection(("127.0.0.1", port))


@endpoint(on_start=load, checkpoint_enabled=True, name="unsupported")
def predict():
    return "still serving"
