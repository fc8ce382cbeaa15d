"""App for tests/test_errors.py: an endpoint with a 1 s timeout whose behaviour is chosen
by ``op``."""
import sys
import time

import beam


class Unpackable:
    pass


class UnprintableError(Exception):
    def __str__(self):
        raise RuntimeError("__str__ of UnprintableError failed")


def failing_handler_helper(message):
    raise ValueError(message)


@beam.endpoint(name="error-app", timeout=1)
def handler(op="ok", **kwargs):
    if op == "ok":
        return {"ok": True, "echo": kwargs.get("value")}
    if op == "raise":
        failing_handler_helper(kwargs.get("message", "boom"))
    if op == "keyerror":
        return {}["missing-key"]
    if op == "sleep":
        if kwargs.get("marker"):
            with open(kwargs["marker"], "w") as f:
                f.write("started")
        time.sleep(kwargs.get("seconds", 5))
        return "woke up"
    if op == "busy":
        deadline = time.monotonic() + kwargs.get("seconds", 5)
        n = 0
        while time.monotonic() < deadline:
            n += 1
        return n
    if op == "set":
        return {1, 2, 3}
    if op == "object":
        return Unpackable()
    if op == "nested_object":
        return {"fine": [1, 2, 3], "bad": [Unpackable()]}
    if op == "bigint":
        return 2 ** 70
    if op == "negbigint":
        return -(2 ** 63) - 1
    if op == "surrogate":
        raise ValueError("bad byte \udcff in input")
    if op == "unprintable":
        raise UnprintableError()
    if op == "sysexit":
        sys.exit(3)
    if op == "kbint":
        raise KeyboardInterrupt("interrupted by the handler")
    if op == "deep":
        value = "leaf"
        for _ in range(kwargs["depth"]):
            value = [value]
        return value
    if op == "cycle":
        value = []
        value.append(value)
        return value
    if op == "keys":
        return sorted(kwargs)
    raise RuntimeError(f"unknown op {op!r}")


def not_an_endpoint(**kwargs):
    return "plain function"
