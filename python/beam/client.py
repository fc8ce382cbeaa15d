"""A small synchronous client for ``beam-worker`` (see docs/protocol.md).

    with beam.Client("unix:///tmp/app.sock") as c:
        c.call(prompt="hi")                      # the handler's result, or RemoteError
        c.call_with_info(prompt="hi")            # the whole response: ok, task_id, result/error
        c.pipeline([{"x": 1}, {"x": 2}])         # many requests in flight, results in order
        for chunk in c.stream(prompt="hi"):      # a generator handler's chunks, as they come
            ...

A ``Client`` owns one connection and is **not thread-safe**: use one per thread. If the
worker closes the connection (``ConnectionClosed``) or a call times out, the connection is
dropped and the next call opens a new one.
"""
from __future__ import annotations

import os
import re
import selectors
import socket
import struct
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import msgpack

from .exceptions import BeamError, ConnectionClosed, RemoteError
from .exceptions import TimeoutError as BeamTimeoutError

_LEN = struct.Struct(">I")
_MAX_LEN = 0xFFFFFFFF
_CHUNK = 1 << 20
_HOST_PORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[^/\[\]:]*):(\d+)$")

Address = Tuple[str, Union[str, Tuple[str, int]]]


def parse_address(address: str) -> Address:
    """``unix:///abs/path`` → ``("unix", "/abs/path")``; ``tcp://HOST:PORT`` →
    ``("tcp", (HOST, PORT))`` (IPv6 as ``tcp://[::1]:8765``). A bare ``HOST:PORT`` is TCP;
    any other bare string is a unix socket path (made absolute)."""
    if not isinstance(address, str) or not address:
        raise ValueError(f"address must be a non-empty string, got {address!r}")
    if address.startswith("unix://"):
        path = address[len("unix://"):]
        if not path.startswith("/"):
            raise ValueError(f"unix address needs an absolute path (unix:///run/app.sock), got {address!r}")
        return "unix", path
    if address.startswith("tcp://"):
        return "tcp", _host_port(address[len("tcp://"):].rstrip("/"), address)
    if "://" in address:
        raise ValueError(f"unsupported address scheme in {address!r}; use unix:// or tcp://")
    if "/" not in address and _HOST_PORT.match(address):
        return "tcp", _host_port(address, address)
    return "unix", os.path.abspath(address)


def _host_port(text: str, original: str) -> Tuple[str, int]:
    m = _HOST_PORT.match(text)
    if not m:
        raise ValueError(f"tcp address must look like tcp://HOST:PORT, got {original!r}")
    host, port = m.group(1), int(m.group(2))
    if host.startswith("["):
        host = host[1:-1]
    if not 0 < port < 65536:
        raise ValueError(f"port out of range in {original!r}")
    return host or "127.0.0.1", port


def _pack(body: Mapping[str, Any]) -> bytes:
    data = msgpack.packb(body, use_bin_type=True)
    if len(data) > _MAX_LEN:
        raise ValueError(f"request of {len(data)} bytes does not fit a frame")
    return _LEN.pack(len(data)) + data


def _remote_error(resp: Mapping[str, Any]) -> RemoteError:
    err = resp.get("error")
    if not isinstance(err, Mapping):
        err = {"type": "ProtocolError", "message": f"error response without an error map: {resp!r}"}
    return RemoteError(str(err.get("type", "Error")), str(err.get("message", "")),
                       str(err.get("traceback", "") or ""), str(resp.get("task_id", "") or ""))


class Client:
    """Connection to one ``beam-worker`` socket.

    ``address``: ``unix:///abs/path``, ``tcp://HOST:PORT``, or a bare socket path.
    ``timeout``: seconds to wait for the worker to make progress (connect, accept a
    request, answer it); ``None`` waits forever. On expiry ``beam.TimeoutError`` is raised
    and the connection is dropped (a late answer would desynchronise it).
    """

    def __init__(self, address: str, timeout: Optional[float] = 30.0) -> None:
        self.address = address
        self.timeout = timeout
        self._kind, self._target = parse_address(address)
        self._sock: Optional[socket.socket] = None
        self._buf = bytearray()
        self._next_id = 0
        self._closed = False
        self._connect()

    # -- public API -------------------------------------------------------------------
    def call(self, /, **kwargs: Any) -> Any:
        """Call the endpoint with ``kwargs``; return its result or raise ``RemoteError``."""
        resp = self._exchange([{"type": "call", "kwargs": kwargs}])[0]
        if resp.get("ok") is True:
            return resp.get("result")
        raise _remote_error(resp)

    def call_with_info(self, /, **kwargs: Any) -> Dict[str, Any]:
        """Call the endpoint; return the whole response map (``id``, ``ok``, ``task_id``,
        ``result`` or ``error``). Does not raise for an error response."""
        return self._exchange([{"type": "call", "kwargs": kwargs}])[0]

    def stream(self, /, **kwargs: Any) -> Iterator[Any]:
        """Call the endpoint asking for a streamed answer; yield each chunk as it arrives.

        A generator handler's chunks come one by one; any other handler's result comes
        as the only chunk. An error (also one raised mid-stream) raises ``RemoteError``
        after the chunks sent before it. ``timeout`` bounds the wait for each chunk.
        Leaving the loop early closes the connection, which closes the handler's
        generator in the worker (its ``finally:`` runs); the next call reconnects."""
        self._next_id += 1
        rid = self._next_id
        payload = _pack({"id": rid, "type": "call", "kwargs": kwargs, "stream": True})
        sock = self._connect()
        finished = False
        try:
            self._send_all(sock, payload)
            while True:
                resp = self._check(self._recv_frame(sock), rid)
                if "chunk" in resp and "ok" not in resp:
                    yield resp["chunk"]
                    continue
                finished = True
                if resp.get("ok") is not True:
                    raise _remote_error(resp)
                if "chunks" not in resp:  # not a generator: its result is the one chunk
                    yield resp.get("result")
                return
        finally:
            if not finished:  # abandoned, failed or timed out mid-stream
                self._drop()

    def ping(self) -> Any:
        """``"pong"`` if the worker is serving."""
        return self._simple("ping")

    def stats(self) -> Dict[str, Any]:
        """The serving worker process's stats (pid, restored, requests, profile, ...)."""
        return self._simple("stats")

    def pipeline(self, calls: Sequence[Mapping[str, Any]]) -> List[Any]:
        """Send one request per kwargs map without waiting, then collect the answers.

        Returns a list in request order holding each result, or the ``RemoteError`` for a
        request that failed. If the connection closes part-way, ``ConnectionClosed`` is
        raised with the answers received so far in its ``results`` attribute and the ids
        of the requests left without an answer in ``unanswered``."""
        bodies = []
        for kw in calls:
            if not isinstance(kw, Mapping):
                raise TypeError(f"pipeline takes a list of kwargs dicts, got {kw!r}")
            bodies.append({"type": "call", "kwargs": dict(kw)})
        out: List[Any] = []
        try:
            responses = self._exchange(bodies)
        except ConnectionClosed as exc:
            exc.results = [self._result_or_error(r) for r in getattr(exc, "responses", [])]
            raise
        for r in responses:
            out.append(self._result_or_error(r))
        return out

    def close(self) -> None:
        self._drop()
        self._closed = True

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("connected" if self._sock else "idle")
        return f"<beam.Client {self.address} {state}>"

    # -- internals --------------------------------------------------------------------
    @staticmethod
    def _result_or_error(resp: Mapping[str, Any]) -> Any:
        return resp.get("result") if resp.get("ok") is True else _remote_error(resp)

    def _simple(self, kind: str) -> Any:
        resp = self._exchange([{"type": kind}])[0]
        if resp.get("ok") is True:
            return resp.get("result")
        raise _remote_error(resp)

    def _connect(self) -> socket.socket:
        if self._closed:
            raise BeamError("client is closed")
        if self._sock is not None:
            return self._sock
        try:
            if self._kind == "unix":
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.settimeout(self.timeout)
                    sock.connect(self._target)
                except BaseException:
                    sock.close()
                    raise
            else:
                sock = socket.create_connection(self._target, timeout=self.timeout)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except socket.timeout as exc:
            raise BeamTimeoutError(f"connecting to {self.address} timed out after {self.timeout}s") from exc
        sock.setblocking(False)
        self._sock = sock
        self._buf = bytearray()
        return sock

    def _drop(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None
                self._buf = bytearray()

    def _exchange(self, bodies: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        frames, ids = [], []
        for body in bodies:  # pack everything first: an unpackable kwarg sends nothing
            self._next_id += 1
            ids.append(self._next_id)
            frames.append(_pack({"id": self._next_id, **body}))
        sock = self._connect()
        try:
            return self._transfer(sock, b"".join(frames), ids)
        except BaseException:
            self._drop()
            raise

    def _transfer(self, sock: socket.socket, payload: bytes, ids: List[int]) -> List[Dict[str, Any]]:
        """Write ``payload`` while reading answers (so a long pipeline cannot deadlock on
        full socket buffers); return one response per id, in order."""
        out = memoryview(payload)
        sent = 0
        responses: List[Dict[str, Any]] = []
        with selectors.DefaultSelector() as sel:
            sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
            writing = True
            while True:
                if self._drain_answers(responses, ids):
                    return responses
                ready = sel.select(self.timeout)
                if not ready:
                    raise BeamTimeoutError(
                        f"no answer from {self.address} within {self.timeout}s "
                        f"({len(responses)} of {len(ids)} received)")
                events = ready[0][1]
                if writing and events & selectors.EVENT_WRITE:
                    try:
                        sent += sock.send(out[sent:sent + _CHUNK])
                    except (BlockingIOError, InterruptedError):
                        pass
                    except (BrokenPipeError, ConnectionResetError):
                        sent = len(out)  # peer is gone; read what it said before leaving
                    if sent >= len(out):
                        writing = False
                        sel.modify(sock, selectors.EVENT_READ)
                if events & selectors.EVENT_READ:
                    chunk = self._recv_some(sock)
                    if chunk is None:
                        continue
                    if not chunk:
                        if self._drain_answers(responses, ids):  # they came with the EOF
                            return responses
                        unanswered = ids[len(responses):]
                        shown = ", ".join(map(str, unanswered[:10]))
                        if len(unanswered) > 10:
                            shown += f", ... ({len(unanswered)} in all)"
                        exc = ConnectionClosed(
                            f"{self.address} closed the connection after {len(responses)} "
                            f"of {len(ids)} responses; request id(s) {shown} got no answer "
                            f"(they may or may not have run)")
                        exc.responses = responses  # type: ignore[attr-defined]
                        exc.unanswered = unanswered  # type: ignore[attr-defined]
                        raise exc
                    self._buf += chunk

    @staticmethod
    def _recv_some(sock: socket.socket) -> Optional[bytes]:
        """What arrived; b"" once the peer closed or reset; None when nothing was ready."""
        try:
            return sock.recv(_CHUNK)
        except (BlockingIOError, InterruptedError):
            return None
        except ConnectionResetError:
            return b""

    def _wait(self, sock: socket.socket, events: int, what: str) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(sock, events)
            if not sel.select(self.timeout):
                raise BeamTimeoutError(f"no {what} from {self.address} within {self.timeout}s")

    def _send_all(self, sock: socket.socket, payload: bytes) -> None:
        out = memoryview(payload)
        while out:
            try:
                out = out[sock.send(out[:_CHUNK]):]
            except (BlockingIOError, InterruptedError):
                self._wait(sock, selectors.EVENT_WRITE, "progress sending")

    def _recv_frame(self, sock: socket.socket) -> Dict[str, Any]:
        while True:
            resp = self._pop_frame()
            if resp is not None:
                return resp
            self._wait(sock, selectors.EVENT_READ, "answer")
            chunk = self._recv_some(sock)
            if chunk is None:
                continue
            if not chunk:
                raise ConnectionClosed(f"{self.address} closed the connection during a streamed answer")
            self._buf += chunk

    def _drain_answers(self, responses: List[Any], ids: List[int]) -> bool:
        """Move every complete answer buffered so far into ``responses`` (checked against
        the ids in order); True once all ``ids`` are answered."""
        while len(responses) < len(ids):
            resp = self._pop_frame()
            if resp is None:
                break
            responses.append(self._check(resp, ids[len(responses)]))
        return len(responses) == len(ids)

    def _pop_frame(self) -> Optional[Dict[str, Any]]:
        buf = self._buf
        if len(buf) < 4:
            return None
        (n,) = _LEN.unpack_from(buf)
        if len(buf) < 4 + n:
            return None
        body = bytes(buf[4:4 + n])
        del buf[:4 + n]
        try:
            resp = msgpack.unpackb(body, raw=False, strict_map_key=False)
        except Exception as exc:
            raise BeamError(f"undecodable response frame from {self.address}: {exc}") from exc
        if not isinstance(resp, dict):
            raise BeamError(f"response from {self.address} is not a map: {resp!r}")
        return resp

    def _check(self, resp: Dict[str, Any], expected: int) -> Dict[str, Any]:
        rid = resp.get("id")
        if rid == expected and not isinstance(rid, bool):
            return resp
        if rid is None and resp.get("ok") is False:
            return resp  # the worker could not decode the request far enough to echo its id
        raise BeamError(f"response id {rid!r} from {self.address} does not match request id {expected}")
