"""Raw protocol helpers for tests that speak the wire format themselves (malformed
frames, pipelining) instead of going through beam.Client."""
from __future__ import annotations

import socket
import struct

import msgpack


def connect(address: str, timeout: float = 10.0) -> socket.socket:
    if address.startswith("unix://"):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect(address[len("unix://"):])
    else:
        host, port = address[len("tcp://"):].rsplit(":", 1)
        s = socket.create_connection((host, int(port)), timeout=timeout)
    s.settimeout(timeout)
    return s


def raw_frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def frame(obj) -> bytes:
    return raw_frame(msgpack.packb(obj, use_bin_type=True))


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise EOFError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def recv_frame(s: socket.socket):
    (n,) = struct.unpack(">I", recv_exact(s, 4))
    return msgpack.unpackb(recv_exact(s, n), raw=False, strict_map_key=False)


def roundtrip(s: socket.socket, obj):
    s.sendall(frame(obj))
    return recv_frame(s)
