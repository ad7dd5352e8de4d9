"""msgpack in a little pure Python, for ``heel ipc`` inside a sandbox.

``heel ipc NAME`` is one call per process, and importing msgpack (with the
datetime module its extension types pull in) cost it more than the call
itself.  These two functions cover what the IPC protocol carries: nil,
booleans, integers of up to 64 bits, floats, str, bytes, arrays and maps.

- :func:`packb` gives the very bytes that ``msgpack.packb(obj,
  use_bin_type=True)`` gives (the smallest encoding of each value, floats as
  float64), and raises what it raises: TypeError for another type, ValueError
  for a str that is not UTF-8, OverflowError for an int beyond 64 bits, and
  ValueError past 511 levels of nesting (msgpack's own limit was 511 too
  before version 1.1, and is 1,024 now; 511 keeps the packer's recursion
  within Python's).
- :func:`unpackb` reads what ``msgpack.unpackb(data, raw=False,
  strict_map_key=True)`` reads, and refuses with ValueError what heel's codec
  refuses: extension types (the timestamp's too), map keys other than str and
  bytes, bytes that are not one whole object, invalid UTF-8, more than 1,024
  levels of nesting.

heel's host side and ``heel.client.call()`` in a long-lived program use
msgpack itself; tests/test_ipc_codec.py checks the two against each other.
"""

from __future__ import annotations

import struct

#: Levels of nesting packb takes.
PACK_NEST_LIMIT = 511
#: Containers open at once that unpackb takes, as msgpack's unpacker.
UNPACK_NEST_LIMIT = 1024

_B = struct.Struct(">B").pack
_BB = struct.Struct(">BB").pack
_BH = struct.Struct(">BH").pack
_BI = struct.Struct(">BI").pack
_BQ = struct.Struct(">BQ").pack
_Bb = struct.Struct(">Bb").pack
_Bh = struct.Struct(">Bh").pack
_Bi = struct.Struct(">Bi").pack
_Bq = struct.Struct(">Bq").pack
_Bd = struct.Struct(">Bd").pack


def packb(obj: object) -> bytes:
    out: list[bytes] = []
    _pack(obj, out, PACK_NEST_LIMIT)
    return b"".join(out)


def _header(out: list[bytes], length: int, fix: int, fix_max: int, codes: tuple[int, ...]) -> None:
    """A length header: fix|length when it fits, else the 8-, 16- or 32-bit
    form (codes: those that exist for the type, None for a missing one)."""
    if length <= fix_max and fix:
        out.append(_B(fix | length))
    elif length <= 0xFF and codes[0]:
        out.append(_BB(codes[0], length))
    elif length <= 0xFFFF:
        out.append(_BH(codes[1], length))
    elif length <= 0xFFFFFFFF:
        out.append(_BI(codes[2], length))
    else:
        raise ValueError(f"{length} items or bytes are more than msgpack can carry")


def _pack(obj: object, out: list[bytes], depth: int) -> None:
    if depth < 0:
        raise ValueError("recursion limit exceeded")
    if obj is None:
        out.append(b"\xc0")
    elif obj is True or obj is False:
        out.append(b"\xc3" if obj else b"\xc2")
    elif isinstance(obj, int):
        n = int(obj)
        if n >= 0:
            if n < 0x80:
                out.append(_B(n))
            elif n <= 0xFF:
                out.append(_BB(0xCC, n))
            elif n <= 0xFFFF:
                out.append(_BH(0xCD, n))
            elif n <= 0xFFFFFFFF:
                out.append(_BI(0xCE, n))
            elif n <= 0xFFFFFFFFFFFFFFFF:
                out.append(_BQ(0xCF, n))
            else:
                raise OverflowError("Integer value out of range")
        elif n >= -32:
            out.append(_B(n & 0xFF))
        elif n >= -0x80:
            out.append(_Bb(0xD0, n))
        elif n >= -0x8000:
            out.append(_Bh(0xD1, n))
        elif n >= -0x80000000:
            out.append(_Bi(0xD2, n))
        elif n >= -0x8000000000000000:
            out.append(_Bq(0xD3, n))
        else:
            raise OverflowError("Integer value out of range")
    elif isinstance(obj, float):
        out.append(_Bd(0xCB, obj))
    elif isinstance(obj, (bytes, bytearray, memoryview)):
        data = bytes(obj)
        _header(out, len(data), 0, -1, (0xC4, 0xC5, 0xC6))
        out.append(data)
    elif isinstance(obj, str):
        data = obj.encode("utf-8")
        _header(out, len(data), 0xA0, 31, (0xD9, 0xDA, 0xDB))
        out.append(data)
    elif isinstance(obj, dict):
        _header(out, len(obj), 0x80, 15, (0, 0xDE, 0xDF))
        for key, value in obj.items():
            _pack(key, out, depth - 1)
            _pack(value, out, depth - 1)
    elif isinstance(obj, (list, tuple)):
        _header(out, len(obj), 0x90, 15, (0, 0xDC, 0xDD))
        for item in obj:
            _pack(item, out, depth - 1)
    else:
        raise TypeError(f"can not serialize {type(obj).__name__!r} object")


#: Fixed-size values by their first byte: (size after it, struct format).
_SCALARS = {0xCA: (4, ">f"), 0xCB: (8, ">d"), 0xCC: (1, ">B"), 0xCD: (2, ">H"), 0xCE: (4, ">I"),
            0xCF: (8, ">Q"), 0xD0: (1, ">b"), 0xD1: (2, ">h"), 0xD2: (4, ">i"), 0xD3: (8, ">q")}
#: Lengths of str, bin, array and map headers by their first byte: (kind, size of the length).
_SIZED = {0xC4: ("bin", 1), 0xC5: ("bin", 2), 0xC6: ("bin", 4), 0xD9: ("str", 1), 0xDA: ("str", 2),
          0xDB: ("str", 4), 0xDC: ("array", 2), 0xDD: ("array", 4), 0xDE: ("map", 2), 0xDF: ("map", 4)}
_EXT = frozenset(range(0xC7, 0xCA)) | frozenset(range(0xD4, 0xD9))
_NO_KEY = object()


def unpackb(data: bytes) -> object:
    """The one msgpack object ``data`` holds; ValueError for anything else."""
    view = memoryview(data)
    end = len(view)
    pos = 0
    # Open containers, innermost last: [container, items still to come, key waiting for its value].
    stack: list[list] = []
    while True:
        if pos >= end:
            raise ValueError("incomplete input")
        code = view[pos]
        pos += 1
        if code <= 0x7F:
            value: object = code
        elif code >= 0xE0:
            value = code - 0x100
        elif code <= 0x8F or 0x90 <= code <= 0x9F:
            kind, length = ("map" if code <= 0x8F else "array"), code & 0x0F
        elif code <= 0xBF:
            kind, length = "str", code & 0x1F
        elif code == 0xC0:
            value = None
        elif code == 0xC2:
            value = False
        elif code == 0xC3:
            value = True
        elif code in _SCALARS:
            size, fmt = _SCALARS[code]
            if end - pos < size:
                raise ValueError("incomplete input")
            (value,) = struct.unpack_from(fmt, view, pos)
            pos += size
        elif code in _SIZED:
            kind, size = _SIZED[code]
            if end - pos < size:
                raise ValueError("incomplete input")
            length = int.from_bytes(view[pos:pos + size], "big")
            pos += size
        elif code in _EXT:
            raise ValueError(f"msgpack extension types are not accepted (code 0x{code:02x})")
        else:  # 0xC1
            raise ValueError(f"0x{code:02x} is not a msgpack type")

        if 0x80 <= code <= 0xBF or code in _SIZED:
            if kind in ("str", "bin"):
                if end - pos < length:
                    raise ValueError("incomplete input")
                raw = bytes(view[pos:pos + length])
                pos += length
                value = raw.decode("utf-8") if kind == "str" else raw
            else:
                # Each item takes a byte at least, each pair two: a count
                # larger than what is left is refused before anything is made.
                if length * (2 if kind == "map" else 1) > end - pos:
                    raise ValueError(f"{kind} of {length} items in {end - pos} bytes")
                if length:
                    if len(stack) >= UNPACK_NEST_LIMIT:
                        raise ValueError("nested too deeply")
                    stack.append([{} if kind == "map" else [], length, _NO_KEY])
                    continue
                value = {} if kind == "map" else []

        # A complete value: it goes into the innermost open container, which
        # may then be complete itself, and so on outwards.
        while stack:
            top = stack[-1]
            container = top[0]
            if type(container) is list:
                container.append(value)
            elif top[2] is _NO_KEY:
                if type(value) is not str and type(value) is not bytes:
                    raise ValueError(f"{type(value).__name__} is not allowed for map key")
                top[2] = value
                break
            else:
                container[top[2]] = value
                top[2] = _NO_KEY
            top[1] -= 1
            if top[1]:
                break
            stack.pop()
            value = container
        else:
            if pos != end:
                raise ValueError(f"extra data: {end - pos} bytes after the object")
            return value
