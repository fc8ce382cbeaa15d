"""JSON over the HTTP front, both directions, against the real worker: a body reaches the
handler as json.loads would read it (floats stay floats, 64-bit integers exact, NULs and
astral code points kept), integers past 64 bits and malformed numbers are a 400, and a
result is written back with the same fidelity (csrc/json.c, docs/http.md)."""
from __future__ import annotations

import json

import pytest

from test_http import error_of, start_http

pytestmark = pytest.mark.timeout(60)


def send(s, text: str):
    """POST raw JSON text (not re-encoded by json.dumps) and return (status, body bytes)."""
    status, _, body = s.request("POST", "/", text.encode())
    return status, body


def received(s, value_text: str):
    """What the handler saw for "value": <value_text>, as (type name, repr)."""
    status, body = send(s, '{"op": "describe", "value": %s}' % value_text)
    assert status == 200, body
    doc = json.loads(body)
    return doc["type"], doc["repr"]


REQUESTS = [
    ("1.0", ("float", "1.0")),
    ("-0.0", ("float", "-0.0")),
    ("1e2", ("float", "100.0")),
    ("0.1", ("float", "0.1")),
    ("1", ("int", "1")),
    ("-0", ("int", "0")),
    ("9007199254740993", ("int", "9007199254740993")),
    ("9223372036854775807", ("int", "9223372036854775807")),
    ("9223372036854775808", ("int", "9223372036854775808")),
    ("18446744073709551615", ("int", "18446744073709551615")),
    ("-9223372036854775808", ("int", "-9223372036854775808")),
    ('"a\\u0000b"', ("str", repr("a\x00b"))),
    ('"\\ud83d\\ude00 \\u00e9 \\u20ac"', ("str", repr("\U0001F600 é €"))),
    ('"\U0001F600"', ("str", repr("\U0001F600"))),  # raw UTF-8, no escape
    ('{"k\\u0000ey": [1, 2.5]}', ("dict", repr({"k\x00ey": [1, 2.5]}))),
]


def test_request_values_reach_the_handler_exactly(start_worker):
    s = start_http(start_worker)
    for text, want in REQUESTS:
        assert received(s, text) == want, text


BAD = [
    ("18446744073709551616", "does not fit in 64 bits"),  # 2**64
    ("-9223372036854775809", "does not fit in 64 bits"),  # -2**63 - 1
    ("123456789012345678901234567890", "does not fit in 64 bits"),
    ("01", "malformed number"),
    ("1.", "malformed number"),
    ("1e", "malformed number"),
    ("-", "malformed number"),
    (".5", "not valid JSON"),
    ("+1", "not valid JSON"),
    ("NaN", "not valid JSON"),
    ("Infinity", "not valid JSON"),
    ('"\\ud83d"', "surrogate"),
    ('"\\ude00"', "surrogate"),
]


def test_out_of_range_and_malformed_numbers_are_400(start_worker):
    s = start_http(start_worker)
    for text, why in BAD:
        status, body = send(s, '{"op": "echo", "value": %s}' % text)
        err = error_of(body)
        assert (status, err["type"]) == (400, "BadRequest"), (text, body)
        assert why in err["message"], (text, err)
    assert s.call(op="echo", value=1)[::2] == (200, 1)  # still serving


def test_results_written_back_exactly(start_worker):
    s = start_http(start_worker)
    # The raw body text, not json.loads of it: 1.0 must not come back as 1.
    for text, body in [("1.0", b"1.0"), ("-0.0", b"-0.0"), ("0.1", b"0.1"), ("1e300", b"1e+300"),
                       ("18446744073709551615", b"18446744073709551615"),
                       ("-9223372036854775808", b"-9223372036854775808"),
                       ('"a\\u0000b"', b'"a\\u0000b"'), ('"\\ud83d\\ude00"', '"\U0001F600"'.encode())]:
        assert send(s, '{"op": "echo", "value": %s}' % text) == (200, body), text
    assert send(s, '{"op": "pow2", "k": 63, "sign": -1}') == (200, b"-9223372036854775808")
    # Python ints past 64 bits have no msgpack form: a clear error, not a rounded number.
    status, body = send(s, '{"op": "pow2", "k": 64}')
    err = error_of(body)
    assert (status, err["type"]) == (500, "UnsupportedType") and "64 bits" in err["message"], body
