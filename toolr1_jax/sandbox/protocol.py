"""Length-prefixed JSON frames between the host, the pre-warmed parent and the workers.

JSON, never pickle, for anything a worker can write: a hostile program owns its end of the channel
and may forge frames, so the host only ever parses data, and bounds its size and nesting depth.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct

_HEADER = struct.Struct("!I")
MAX_FRAME_BYTES = 64 * 2**20  # host -> worker (attachments never travel here; code does)
MAX_DEPTH = 32  # nesting of arrays and objects in a frame from a worker


class ProtocolError(Exception):
    """A peer sent something that is not a well-formed frame."""


def encode(obj: dict) -> bytes:
    # ensure_ascii: lone surrogates from user strings cannot break the UTF-8 encoding.
    data = json.dumps(obj, ensure_ascii=True, separators=(",", ":")).encode("ascii")
    return _HEADER.pack(len(data)) + data


def decode(data: bytes, max_depth: int = MAX_DEPTH) -> dict:
    try:
        obj = json.loads(data)
    except RecursionError:
        # json's C parser guards its recursion with the interpreter's limit; deeper input raises
        # this instead of a ValueError.
        raise ProtocolError("frame nests deeper than the parser allows") from None
    except ValueError as e:
        raise ProtocolError(f"frame is not JSON: {e}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("op"), str):
        raise ProtocolError("frame is not an object with an 'op' string")
    if depth(obj) > max_depth:
        raise ProtocolError(f"frame nests deeper than {max_depth}")
    return obj


def depth(obj) -> int:
    """Nesting depth of a parsed JSON value (a scalar is 0), without recursion."""
    deepest = 0
    stack = [(obj, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict):
            v = v.values()
        elif not isinstance(v, list):
            continue
        deepest = max(deepest, d)
        stack.extend((x, d + 1) for x in v if isinstance(x, (dict, list)))
    return deepest


def send_sock(sock: socket.socket, obj: dict) -> None:
    sock.sendall(encode(obj))


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks = []
    while n:
        chunk = sock.recv(min(n, 2**20))
        if not chunk:
            raise EOFError("peer closed the channel")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def recv_sock(sock: socket.socket) -> dict:
    (size,) = _HEADER.unpack(_recv_exact(sock, _HEADER.size))
    if size > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame of {size} bytes exceeds {MAX_FRAME_BYTES}")
    return decode(_recv_exact(sock, size))


def write_fd(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class FrameBuffer:
    """Incremental frame parser for a non-blocking fd driven by a selector."""

    def __init__(self, max_bytes: int = MAX_FRAME_BYTES):
        self._buf = bytearray()
        self._max_bytes = max_bytes

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        frames = []
        while len(self._buf) >= _HEADER.size:
            (size,) = _HEADER.unpack_from(self._buf)
            if size > self._max_bytes:
                raise ProtocolError(f"frame of {size} bytes exceeds {self._max_bytes}")
            if len(self._buf) < _HEADER.size + size:
                break
            frames.append(bytes(self._buf[_HEADER.size : _HEADER.size + size]))
            del self._buf[: _HEADER.size + size]
        return frames


async def read_raw(reader: asyncio.StreamReader, max_bytes: int = MAX_FRAME_BYTES) -> bytes:
    """One frame's payload; EOFError when the peer is gone."""
    try:
        header = await reader.readexactly(_HEADER.size)
        (size,) = _HEADER.unpack(header)
        if size > max_bytes:
            raise ProtocolError(f"frame of {size} bytes exceeds {max_bytes}")
        return await reader.readexactly(size)
    except asyncio.IncompleteReadError:
        raise EOFError("peer closed the channel") from None


async def read(reader: asyncio.StreamReader, max_bytes: int = MAX_FRAME_BYTES) -> dict:
    return decode(await read_raw(reader, max_bytes))


def write(writer: asyncio.StreamWriter, obj: dict) -> None:
    writer.write(encode(obj))
