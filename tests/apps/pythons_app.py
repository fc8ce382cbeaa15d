"""App for tests/test_pythons.py: on_start imports the extension modules a worker built
for another Python fails on (ssl, hashlib, sqlite3, ctypes, math via numpy)."""
import sys

from beam import endpoint


def load():
    import ctypes
    import hashlib
    import sqlite3
    import ssl

    import numpy
    return {"ssl": ssl.OPENSSL_VERSION, "sha": hashlib.sha256(b"beam").hexdigest(),
            "sqlite": sqlite3.sqlite_version, "ctypes": ctypes.sizeof(ctypes.c_void_p),
            "numpy": float(numpy.arange(10).sum())}


@endpoint(on_start=load, checkpoint_enabled=True, name="pythons")
def predict(context):
    return {**context.on_start_value, "version": sys.version, "prefix": sys.prefix}
