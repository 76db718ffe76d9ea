"""Reading tensors out of weight files: the names, shapes and dtypes first, the data only on request.

Safetensors files are parsed here (an 8-byte header length, a JSON header, then raw little-endian data)
so that every header is checked against the file before any data is read. Data comes from a memory map:
a CPU tensor already in its target dtype is used in place, and any other is copied once into its dtype
and device, its mapped pages given back right after, so peak memory stays near the size of the loaded
weights. Legacy `.bin` files are opened only by `torch.load(weights_only=True, mmap=True)`, which
refuses any pickle that would run code.
"""

from __future__ import annotations

import json
import mmap
import pickle
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .layout import CheckpointError, WeightFormat, check_not_lfs_pointer

_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors format's own limit


@dataclass(frozen=True)
class StoredTensor:
    """A tensor as a file holds it; `offset` (bytes from the file start) only for safetensors."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int = 0

    @property
    def nbytes(self) -> int:
        return _numel(self.shape) * self.dtype.itemsize


class SafetensorsReader:
    """One safetensors file: its validated header, and its tensors out of a memory map on request."""

    def __init__(self, path: Path) -> None:
        self.path = path
        check_not_lfs_pointer(path)
        self.tensors = _read_safetensors_header(path)

    def materialise(
        self, names: Iterable[str], *, dtype: torch.dtype, device: torch.device
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield each named tensor on `device`, floating-point ones cast to `dtype`, in file order.

        On the CPU, a tensor already in its target dtype is the memory-mapped file itself (a private,
        copy-on-write mapping, which the tensors keep alive): no copy, and its pages are the page
        cache's, shared with every process that maps the same file. Any other tensor is copied once.
        """
        ordered = sorted(names, key=lambda name: self.tensors[name].offset)
        with open(self.path, "rb") as f:
            # Private: writable for torch.frombuffer and for in-place updates, which never reach the file.
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        for name in ordered:
            stored = self.tensors[name]
            target = dtype if stored.dtype.is_floating_point else stored.dtype
            if device.type == "cpu" and target == stored.dtype and stored.offset % stored.dtype.itemsize == 0:
                yield name, _view(mapped, stored)
            else:
                yield name, _copy_out(mapped, stored, target, device)

    def close(self) -> None:
        pass


def _read_safetensors_header(path: Path) -> dict[str, StoredTensor]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise _corrupt(path, f"it is {size} bytes long, too short for a header")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(_MAX_HEADER_BYTES, size - 8):
            raise _corrupt(path, f"its header claims {header_len} bytes but the file holds {size}")
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise _corrupt(path, f"its header is not valid JSON ({err})") from err
    if not isinstance(header, dict):
        raise _corrupt(path, "its header is not a JSON object")
    header.pop("__metadata__", None)
    data_start, data_size = 8 + header_len, size - 8 - header_len
    tensors = {name: _stored(path, name, entry, data_start) for name, entry in header.items()}
    needed = max((t.offset + t.nbytes for t in tensors.values()), default=data_start) - data_start
    if needed > data_size:
        raise _corrupt(
            path,
            f"its header describes {needed} bytes of tensor data but only {data_size} follow (truncated)",
        )
    return tensors


def _stored(path: Path, name: str, entry: object, data_start: int) -> StoredTensor:
    if (
        isinstance(entry, dict)
        and isinstance(entry.get("dtype"), str)
        and entry["dtype"] not in _SAFETENSORS_DTYPES
    ):
        raise CheckpointError(
            f"{path} stores {name!r} as {entry['dtype']}, a dtype this loader does not read "
            f"(it reads {', '.join(_SAFETENSORS_DTYPES)})."
        )
    try:
        dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
        shape = tuple(int(n) for n in entry["shape"])
        begin, end = (int(n) for n in entry["data_offsets"])
    except (KeyError, TypeError, ValueError) as err:
        raise _corrupt(path, f"the header entry of {name!r} is malformed ({entry!r})") from err
    if min(shape, default=0) < 0 or not 0 <= begin <= end or end - begin != _numel(shape) * dtype.itemsize:
        raise _corrupt(path, f"the header entry of {name!r} is inconsistent ({entry!r})")
    return StoredTensor(dtype, shape, data_start + begin)


def _view(mapped: mmap.mmap, stored: StoredTensor) -> torch.Tensor:
    if stored.nbytes == 0:
        return torch.empty(stored.shape, dtype=stored.dtype)
    count = stored.nbytes // stored.dtype.itemsize
    return torch.frombuffer(mapped, dtype=stored.dtype, count=count, offset=stored.offset).view(stored.shape)


def _copy_out(
    mapped: mmap.mmap, stored: StoredTensor, target: torch.dtype, device: torch.device
) -> torch.Tensor:
    """A copy of the stored tensor in `target` on `device`; the mapped pages are given back afterwards."""
    out = torch.empty(stored.shape, dtype=target, device=device)
    if out.numel() == 0:
        return out
    first = stored.offset // mmap.PAGESIZE * mmap.PAGESIZE
    _advise(mapped, "MADV_WILLNEED", first, stored.offset + stored.nbytes - first)
    if stored.offset % stored.dtype.itemsize:  # misaligned: read the bytes, then reinterpret them
        raw = torch.frombuffer(mapped, dtype=torch.uint8, count=stored.nbytes, offset=stored.offset)
        out.copy_(raw.clone().view(stored.dtype).view(stored.shape))
    else:
        out.copy_(_view(mapped, stored))
    # Read pages count as this process's memory while mapped; drop them (the page cache keeps them) so
    # that converting a checkpoint never holds the source and the result at once.
    _advise(mapped, "MADV_DONTNEED", first, stored.offset + stored.nbytes - first)
    return out


def _advise(mapped: mmap.mmap, advice: str, start: int, length: int) -> None:
    if hasattr(mapped, "madvise") and hasattr(mmap, advice):  # Linux and macOS; elsewhere a no-op
        mapped.madvise(getattr(mmap, advice), start, length)


class TorchBinReader:
    """A legacy `pytorch_model*.bin` file, opened with `torch.load(weights_only=True, mmap=True)`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        check_not_lfs_pointer(path)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as err:
            if "weights only" not in str(err).lower():
                raise _corrupt(path, f"its pickle is damaged ({err})") from err
            raise CheckpointError(
                f"{path} holds objects other than tensors, which loading would have to execute; refusing to "
                f"unpickle it ({str(err).splitlines()[0]}). Convert the checkpoint to safetensors in a trusted "
                "environment."
            ) from err
        except Exception as err:  # zip and storage errors differ by torch version
            raise _corrupt(path, f"torch.load failed ({type(err).__name__}: {err})") from err
        if not isinstance(state, dict):
            raise CheckpointError(f"{path} holds a {type(state).__name__}, not a dict of named tensors.")
        for name, value in state.items():
            if not isinstance(name, str) or not isinstance(value, torch.Tensor):
                raise CheckpointError(
                    f"{path} holds {name!r} -> {type(value).__name__}; a weights file maps names to tensors only."
                )
        self._state: dict[str, torch.Tensor] | None = state
        self.tensors = {name: StoredTensor(t.dtype, tuple(t.shape)) for name, t in state.items()}

    def materialise(
        self, names: Iterable[str], *, dtype: torch.dtype, device: torch.device
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield each named tensor on `device`, floating-point ones cast to `dtype` (mapped, as above)."""
        assert self._state is not None, "reader used after close()"
        for name in names:
            src = self._state[name]
            target = dtype if src.dtype.is_floating_point else src.dtype
            if device.type == "cpu" and target == src.dtype and src.is_contiguous():
                yield name, src
            else:
                yield name, src.to(device=device, dtype=target, copy=True)

    def close(self) -> None:
        self._state = None  # unmaps the file


def open_reader(path: Path, fmt: WeightFormat) -> SafetensorsReader | TorchBinReader:
    return SafetensorsReader(path) if fmt == "safetensors" else TorchBinReader(path)


def _corrupt(path: Path, what: str) -> CheckpointError:
    return CheckpointError(
        f"{path} is not a valid {'safetensors' if path.suffix == '.safetensors' else 'PyTorch'} weights file: "
        f"{what}. It is probably truncated or corrupt; download or copy it again."
    )


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for dim in shape:
        n *= dim
    return n
