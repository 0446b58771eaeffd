"""A GGUF file's metadata and tensor shapes, read from its header alone.

gguf's `GGUFReader` decodes every field of a file when it opens it, which takes 20 s of CPU for a real model's
vocabulary (Gemma 3's 262,144 tokens). turnflow reads a model's header at every start (its chat template, its
special tokens, its KV shape, an adapter's base), so this reader steps over what it is not asked for: numeric
arrays come as numpy views, string arrays only when named.
"""

from __future__ import annotations

import math
import mmap
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

MAGIC = b"GGUF"
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_DTYPES = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8",
           12: "<f8"}
_STRING, _ARRAY = 8, 9
_SMALL_ARRAY = 4096
"""Numeric arrays up to this length come as lists (per-layer head counts); longer ones as numpy arrays."""


def read_gguf(
    path: str | Path, *, string_arrays: Iterable[str] = ()
) -> tuple[dict[str, Any], dict[str, tuple[int, ...]]]:
    """The metadata (strings, numbers, numeric arrays; the string arrays named in `string_arrays`) and each
    tensor's shape (ggml order, ne0 first) of a GGUF file, checked that the tensors' data fits in the file.

    Raises ValueError for a file that is not GGUF, is cut short or has a malformed header.
    """
    import gguf

    wanted = set(string_arrays)
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        if data[:4] != MAGIC:
            raise ValueError("not a GGUF file (it does not start with 'GGUF')")
        pos = 4

        def number(fmt: str) -> Any:
            nonlocal pos
            value = struct.unpack_from(fmt, data, pos)[0]
            pos += struct.calcsize(fmt)
            return value

        def string() -> str:
            nonlocal pos
            size = int(number("<Q"))
            if pos + size > len(data):
                raise ValueError("a string runs past the end of the file")
            pos += size
            return bytes(data[pos - size:pos]).decode("utf-8", errors="replace")

        def value(kind: int, keep_strings: bool) -> Any:
            nonlocal pos
            if kind == _STRING:
                return string()
            if kind in _SCALARS:
                return number(_SCALARS[kind])
            if kind != _ARRAY:
                raise ValueError(f"unknown GGUF value type {kind}")
            inner, count = int(number("<I")), int(number("<Q"))
            if inner in _DTYPES:
                size = count * struct.calcsize(_SCALARS[inner])
                if pos + size > len(data):
                    raise ValueError("an array runs past the end of the file")
                array = np.frombuffer(data, dtype=_DTYPES[inner], count=count, offset=pos).copy()
                pos += size
                return array.tolist() if count <= _SMALL_ARRAY else array
            if inner == _STRING and not keep_strings:
                for _ in range(count):
                    size = int(number("<Q"))  # read before `pos +=`, which would add to the old pos
                    pos += size
                if pos > len(data):
                    raise ValueError("an array runs past the end of the file")
                return None
            return [value(inner, keep_strings) for _ in range(count)]

        version = number("<I")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} (llama.cpp reads versions 2 and 3)")
        n_tensors, n_kv = int(number("<Q")), int(number("<Q"))
        if n_tensors > len(data) or n_kv > len(data):
            raise ValueError("the header's counts exceed the file")
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key, kind = string(), int(number("<I"))
            found = value(kind, key in wanted)
            if found is not None:
                metadata[key] = found
        alignment = int(metadata.get("general.alignment") or gguf.GGUF_DEFAULT_ALIGNMENT)
        tensors: dict[str, tuple[int, ...]] = {}
        end = 0
        for _ in range(n_tensors):
            name, dims = string(), int(number("<I"))
            if dims > 8:
                raise ValueError(f"tensor {name!r} has {dims} dimensions")
            shape = tuple(int(number("<Q")) for _ in range(dims))
            kind, offset = int(number("<I")), int(number("<Q"))
            block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(kind)]
            end = max(end, offset + math.prod(shape) // block * size)
            tensors[name] = shape
        start = -(-pos // alignment) * alignment
        if start + end > len(data):
            raise ValueError(f"the tensor data needs {start + end} bytes; the file has {len(data)} (cut short?)")
    return metadata, tensors
