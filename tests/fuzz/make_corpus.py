#!/usr/bin/env python3
"""Generate the fuzzers' seed corpora: tests/fuzz/corpus/{frame,codec,http}/.

Standard library only; msgpack is packed by hand so that non-canonical and malformed
encodings can be written on purpose. Re-running rewrites the same files (deterministic).
Also writes one seed-derived input per target into tests/fuzz/regressions/<target>/ so
those directories (replayed by ctest) are never empty.

    python3 tests/fuzz/make_corpus.py
"""
import json
import os
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


# ---- a tiny msgpack encoder -------------------------------------------------------------
def mp(v):
    if v is None:
        return b"\xc0"
    if v is True:
        return b"\xc3"
    if v is False:
        return b"\xc2"
    if isinstance(v, int):
        if 0 <= v < 128:
            return bytes([v])
        if -32 <= v < 0:
            return struct.pack("b", v)
        if v >= 0:
            for code, fmt, lim in ((0xCC, ">B", 1 << 8), (0xCD, ">H", 1 << 16),
                                   (0xCE, ">I", 1 << 32), (0xCF, ">Q", 1 << 64)):
                if v < lim:
                    return bytes([code]) + struct.pack(fmt, v)
        for code, fmt, lim in ((0xD0, ">b", 1 << 7), (0xD1, ">h", 1 << 15),
                               (0xD2, ">i", 1 << 31), (0xD3, ">q", 1 << 63)):
            if v >= -lim:
                return bytes([code]) + struct.pack(fmt, v)
    if isinstance(v, float):
        return b"\xcb" + struct.pack(">d", v)
    if isinstance(v, str):
        b = v.encode("utf-8", "surrogatepass")
        return str_head(len(b)) + b
    if isinstance(v, (bytes, bytearray)):
        return bin_head(len(v)) + bytes(v)
    if isinstance(v, (list, tuple)):
        return arr_head(len(v)) + b"".join(mp(x) for x in v)
    if isinstance(v, dict):
        return map_head(len(v)) + b"".join(mp(k) + mp(x) for k, x in v.items())
    if isinstance(v, Raw):
        return v.b
    raise TypeError(type(v))


class Raw:  # pre-encoded bytes, to put odd encodings inside containers
    def __init__(self, b):
        self.b = b


def str_head(n):
    if n < 32:
        return bytes([0xA0 | n])
    if n < 256:
        return b"\xd9" + bytes([n])
    return b"\xda" + struct.pack(">H", n) if n < 65536 else b"\xdb" + struct.pack(">I", n)


def bin_head(n):
    return b"\xc4" + bytes([n]) if n < 256 else b"\xc5" + struct.pack(">H", n)


def arr_head(n):
    return bytes([0x90 | n]) if n < 16 else b"\xdc" + struct.pack(">H", n)


def map_head(n):
    return bytes([0x80 | n]) if n < 16 else b"\xde" + struct.pack(">H", n)


def frame(body):
    return struct.pack(">I", len(body)) + body


def nest(depth, leaf):
    v = leaf
    for _ in range(depth):
        v = [v]
    return v


# ---- frame: 2 bytes of read-split seed, then the stream ------------------------------------
def frame_corpus():
    req = mp({"id": 1, "type": "call", "kwargs": {"x": 1, "s": "hi"}, "headers": {"x": True}})
    ping = mp({"id": "p", "type": "ping"})
    stats = mp({"type": "stats"})
    streams = {
        "call": frame(req),
        "ping": frame(ping),
        "pipelined": frame(req) + frame(ping) + frame(stats) + frame(mp({})),
        "empty-frame": frame(b""),
        "too-large": struct.pack(">I", (1 << 20) + 1) + b"\x80",
        "max-length-header": b"\xff\xff\xff\xff",
        "short-header": b"\x00\x00",
        "short-body": struct.pack(">I", 40) + req[:10],
        "trailing-byte": frame(req + b"\xc0"),
        "array-body": frame(mp([1, 2, 3])),
        "deep-33": frame(mp({"kwargs": nest(33, 0)})),
        "deep-31": frame(mp({"kwargs": nest(31, 0)})),
        "type-long": frame(mp({"type": "x" * 100, "id": "y" * 300})),
        "kwargs-not-map": frame(mp({"kwargs": [1], "type": 7, "id": 1.5})),
        "int-keys": frame(mp({1: 2, "id": None}) ) + frame(mp({"kwargs": {1: 2, "a": 3}})),
        "garbage": frame(b"\xc1\xc1\xc1"),
        "then-too-large": frame(ping) + struct.pack(">I", 0x7FFFFFFF),
        "many-small": b"".join(frame(mp(i)) for i in range(40)),
    }
    out = {}
    for i, (name, s) in enumerate(sorted(streams.items())):
        out[name] = bytes([i * 37 % 256, i * 101 % 256]) + s
    return out


# ---- codec: one msgpack value, or JSON text ------------------------------------------------
def codec_corpus():
    nan = float("nan")
    values = {
        "nil": None, "true": True, "false": False,
        "ints": [0, 1, 127, 128, 255, 256, 65535, 65536, (1 << 32) - 1, 1 << 32, (1 << 64) - 1,
                 -1, -32, -33, -128, -129, -32768, -32769, -(1 << 31), -(1 << 31) - 1, -(1 << 63)],
        "floats": [0.0, -0.0, 1.5, -2.25, 1e308, 5e-324, float("inf"), float("-inf"), nan],
        "strs": ["", "a", "é☃😀", "x" * 31, "y" * 32, "z" * 300, "nul\x00inside", '"\\\n\t'],
        "bins": [b"", b"\x00\xff", bytes(range(256)), b"ab", b"abc", b"abcd"],
        "map": {"a": 1, "b": [1, 2, {"c": None}], "d": {"e": b"\x01"}},
        "map-keys": {1: "int", -1: "neg", 1.5: "float", None: "nil", True: "bool", b"k": "bin"},
        "nan-key": {nan: 1, "x": [nan]},
        "deep-32": nest(32, 1),
        "deep-33": nest(33, 1),
        "map-deep": {"a": {"b": {"c": {"d": {"e": {"f": [[[[[[1]]]]]]}}}}}},
        "big-array": list(range(200)),
        "big-map": {str(i): i for i in range(40)},
    }
    out = {"mp-" + k: mp(v) for k, v in values.items()}
    raw = {
        # non-canonical encodings of small values
        "mp-wide-ints": arr_head(4) + b"\xcf" + struct.pack(">Q", 1) + b"\xd3" + struct.pack(">q", 5)
        + b"\xd0\x05" + b"\xcd\x00\x01",
        "mp-float32": arr_head(3) + b"\xca" + struct.pack(">f", 1.5) + b"\xca\x7f\xc0\x00\x00"
        + b"\xca\x7f\x80\x00\x00",
        "mp-str8-short": b"\xd9\x01a",
        "mp-invalid-utf8": mp({"k": Raw(b"\xa2\xc3\x28")}),
        "mp-invalid-utf8-key": map_head(1) + b"\xa1\xff" + b"\x01",
        "mp-surrogate": mp("\ud800"),
        "mp-dup-keys": map_head(3) + mp("a") + mp(1) + mp("a") + mp(2) + mp(1) + mp(True),
        "mp-unhashable-key": map_head(1) + mp([1]) + mp(2),
        "mp-map-key": map_head(1) + mp({"a": 1}) + mp(2),
        "mp-fixext1": b"\xd4\x01\x00",
        "mp-ext8": b"\xc7\x03\x05abc",
        "mp-ext-in-map": map_head(1) + mp("e") + b"\xd5\x02\x00\x01",
        "mp-timestamp": b"\xd6\xff\x00\x00\x00\x01",
        "mp-truncated": mp({"a": [1, 2, 3]})[:-2],
        "mp-trailing": mp(1) + mp(2),
        "mp-reserved-c1": b"\xc1",
        "mp-array16-short": b"\xdc\xff\xff\x01",
        "mp-map32-huge": b"\xdf\x7f\xff\xff\xff",
        "mp-str32-huge": b"\xdb\x7f\xff\xff\xff",
    }
    out.update(raw)
    texts = {
        "json-object": '{"a": 1, "b": [1, 2.5, "x", null, true, false], "c": {"d": "e"}}',
        "json-escapes": '{"s": "q\\"b\\\\s\\/n\\n\\t\\u00e9\\ud83d\\ude00\\u0000x"}',
        "json-lone-surrogate": '{"s": "\\ud800"}',
        "json-numbers": '[0, -0, -0.0, 1e400, -1e400, 9223372036854775807, -9223372036854775808,'
                        ' 9223372036854775808, 1.7976931348623157e308, 5e-324, 0.1, 123456789012345678901234567890]',
        "json-deep-32": "[" * 32 + "]" * 32,
        "json-deep-34": "[" * 34 + "]" * 34,
        "json-trailing": '{"a": 1} x',
        "json-trailing-ws": '{"a": 1} \n\t',
        "json-dup-keys": '{"a": 1, "a": 2}',
        "json-empty": "",
        "json-string": '"just a string"',
        "json-bad": '{"a": }',
        "json-unterminated": '{"a": "b',
        "json-control": '{"a": "\x01\x1f"}',
        "json-big": json.dumps({"k%d" % i: [i, str(i) * 3, i / 7] for i in range(30)}),
    }
    for k, v in texts.items():
        out[k] = v.encode("utf-8")
    out["json-raw-utf8"] = '{"k\u00e9": "\u2603", "bad": "'.encode() + b'\xff\xc3"}'
    return out


# ---- http: what a client sends ------------------------------------------------------------
def http_corpus():
    auth = "Authorization: Bearer secret\r\n"

    def post(body, extra="", path="/"):
        return ("POST %s HTTP/1.1\r\nHost: x\r\n%sContent-Type: application/json\r\n"
                "Content-Length: %d\r\n\r\n%s" % (path, extra, len(body.encode()), body))

    reqs = {
        "post-call": post('{"x": 1, "s": "hi"}', auth),
        "post-empty-body": "POST / HTTP/1.1\r\n" + auth + "Content-Length: 0\r\n\r\n",
        "post-no-length": "POST / HTTP/1.1\r\n" + auth + "\r\n",
        "post-no-auth": post('{"x": 1}'),
        "post-wrong-token": post('{"x": 1}', "Authorization: Bearer secreT\r\n"),
        "post-token-prefix": post('{"x": 1}', "Authorization: Bearer secretX\r\n"),
        "post-auth-split-case": post("{}", "AUTHORIZATION: Bearer secret\r\n"),
        "post-not-object": post("[1, 2]", auth),
        "post-bad-json": post('{"x": }', auth),
        "post-deep-json": post("{\"a\":" * 40 + "1" + "}" * 40, auth),
        "post-ws-body": post(" \r\n\t ", auth),
        "post-too-large": "POST / HTTP/1.1\r\n" + auth + "Content-Length: 2000\r\n\r\n" + "{" * 100,
        "post-chunked": "POST / HTTP/1.1\r\n" + auth + "Transfer-Encoding: chunked\r\n\r\n"
                        "5\r\n{\"a\":\r\n2\r\n1}\r\n0\r\n\r\n",
        "post-chunked-large": "POST / HTTP/1.1\r\n" + auth + "Transfer-Encoding: chunked\r\n\r\n"
                              "400\r\n" + "x" * 1024 + "\r\n10\r\n" + "y" * 16 + "\r\n0\r\n\r\n",
        "post-close": post('{"a": 1}', auth + "Connection: close\r\n"),
        "post-query": post('{"a": 1}', auth, "/?debug=1&x=%20"),
        "http10": "POST / HTTP/1.0\r\n" + auth + "Content-Length: 2\r\n\r\n{}",
        "http10-keepalive": "GET /health HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
        "get-health": "GET /health HTTP/1.1\r\nHost: x\r\n\r\n",
        "head-health": "HEAD /health HTTP/1.1\r\n\r\n",
        "head-pipelined": "HEAD /stats HTTP/1.1\r\n" + auth + "\r\nGET /health HTTP/1.1\r\n\r\n"
                          + "HEAD / HTTP/1.1\r\n\r\n" + post("{}", auth),
        "post-health": "POST /health HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
        "get-stats": "GET /stats HTTP/1.1\r\n" + auth + "\r\n",
        "post-stats": "POST /stats HTTP/1.1\r\n" + auth + "Content-Length: 0\r\n\r\n",
        "get-root": "GET / HTTP/1.1\r\n" + auth + "\r\n",
        "not-found": "GET /nope HTTP/1.1\r\n\r\n",
        "pipelined": post('{"a": 1}', auth) + "GET /health HTTP/1.1\r\n\r\n" + post("{}", auth)
                     + "GET /stats HTTP/1.1\r\n" + auth + "\r\n" + post('{"b": 2}'),
        "pipelined-then-close": post('{"a": 1}', auth) + post('{"a": 22}', auth + "Connection: close\r\n")
                                + post('{"never": 1}', auth),
        "pipelined-then-garbage": "GET /health HTTP/1.1\r\n\r\n" + "\x00\x01 garbage\r\n\r\n",
        "long-url": "GET /" + "a" * 1100 + " HTTP/1.1\r\n\r\n",
        "long-url-query": "GET /?" + "a" * 1100 + " HTTP/1.1\r\n" + auth + "\r\n",
        "long-auth": post("{}", "Authorization: Bearer " + "s" * 1100 + "\r\n"),
        "long-header-name": "GET /health HTTP/1.1\r\n" + "X" * 100 + ": y\r\n\r\n",
        "many-headers": "GET /stats HTTP/1.1\r\n" + "".join("H%d: v\r\n" % i for i in range(30))
                        + auth + "\r\n",
        "auth-twice": post("{}", auth + "Authorization: Bearer other\r\n"),
        "folded-header": "GET /stats HTTP/1.1\r\nAuthorization: Bearer\r\n secret\r\n\r\n",
        "bad-method": "BREW / HTTP/1.1\r\n\r\n",
        "bad-version": "GET / HTTP/9.9\r\n\r\n",
        "bad-request-line": "GARBAGE\r\n\r\n",
        "bad-content-length": "POST / HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
        "two-content-lengths": "POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n{}",
        "huge-content-length": "POST / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n",
        "bare-lf": "GET /health HTTP/1.1\nHost: x\n\n",
        "upgrade": "GET / HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        "connect": "CONNECT x:443 HTTP/1.1\r\n\r\n",
        "empty": "",
    }
    # more than MAX_PIPELINED (128) pending at once, within the 8 KiB -max_len
    many = ("POST / HTTP/1.1\r\n" + auth + "\r\n") * 140
    out = {k: v.encode("latin-1") for k, v in reqs.items()}
    out["pipelined-140"] = many.encode()
    return out


def write_dir(path, files):
    os.makedirs(path, exist_ok=True)
    for name in os.listdir(path):  # drop seeds this script no longer writes
        if name.startswith("seed-"):
            os.remove(os.path.join(path, name))
    for name, data in files.items():
        with open(os.path.join(path, "seed-" + name), "wb") as f:
            f.write(data)


def main():
    corpora = {"frame": frame_corpus(), "codec": codec_corpus(), "http": http_corpus()}
    for target, files in corpora.items():
        write_dir(os.path.join(HERE, "corpus", target), files)
        # One seed per target keeps the regression directory non-empty and checks the
        # replay path itself; real crash inputs sit beside it as crash-<sha1>.
        pick = {"frame": "pipelined", "codec": "mp-map-keys", "http": "pipelined"}[target]
        reg = os.path.join(HERE, "regressions", target)
        os.makedirs(reg, exist_ok=True)
        with open(os.path.join(reg, "seed-" + pick), "wb") as f:
            f.write(files[pick])
        total = sum(len(v) for v in files.values())
        print("%s: %d seeds, %d bytes" % (target, len(files), total))
    return 0


if __name__ == "__main__":
    sys.exit(main())
