"""Reading tensors out of weight files: the names, shapes and dtypes first, the data only on request.

Safetensors files are parsed here (an 8-byte header length, a JSON header, then raw little-endian data)
so that every header is checked against the file before any data is read, at least as strictly as the
`safetensors` library does: no duplicate names, whole numbers only, and tensors that tile the data
exactly (no overlap, no hole, nothing after the last one). Data comes from a memory map: a CPU tensor
already in its target dtype is used in place (or, asked for, copied into huge pages: `huge_pages`), and
any other is copied once into its dtype and device,
its mapped pages given back right after, so peak memory stays near the size of the loaded weights.
Every floating-point tensor is checked for NaN and infinities as it is read.

Legacy `.bin` files are opened only by `torch.load(weights_only=True)` (memory-mapped when they are zip
archives, as every torch >= 1.6 writes them), which refuses any pickle that would run code; before torch
2.6 that refusal could be bypassed (CVE-2025-32434), so there `.bin` files are not opened at all.
"""

from __future__ import annotations

import json
import mmap
import pickle
import re
import struct
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .huge_pages import Arena, arena_bytes
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
_MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
_MAX_DIM = 2**63 - 1  # torch's sizes are int64
_SAFE_TORCH = (2, 6)  # torch.load(weights_only=True) cannot be talked into running code from here on
_SHOWN = 200  # characters of a malformed header entry quoted in an error


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
        self,
        names: Iterable[str],
        *,
        dtype: torch.dtype,
        device: torch.device,
        copy: bool = False,
        huge_pages: bool = False,
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield each named tensor on `device`, floating-point ones cast to `dtype`, in file order
        (`copy`: always a copy, the mapped pages given back: quantizing while loading).

        On the CPU, a tensor already in its target dtype is the memory-mapped file itself (a private,
        copy-on-write mapping, which the tensors keep alive): no copy, and its pages are the page
        cache's, shared with every process that maps the same file; with `huge_pages`, such tensors are
        copied instead into one mapping in transparent huge pages (`huge_pages.Arena`), each one's mapped
        pages given back right after. Any other tensor is copied once.
        """
        ordered = sorted(names, key=lambda name: self.tensors[name].offset)
        with open(self.path, "rb") as f:
            # Private: writable for torch.frombuffer and for in-place updates, which never reach the file.
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)

        def target(stored: StoredTensor) -> torch.dtype:
            return dtype if stored.dtype.is_floating_point else stored.dtype

        def in_place(stored: StoredTensor) -> bool:
            return (
                not copy
                and device.type == "cpu"
                and target(stored) == stored.dtype
                and stored.offset % stored.dtype.itemsize == 0
            )

        arena = None
        if huge_pages:
            sizes = [self.tensors[n].nbytes for n in ordered if in_place(self.tensors[n])]
            arena = Arena(arena_bytes(sizes)) if any(sizes) else None
        for name in ordered:
            stored = self.tensors[name]
            if not in_place(stored):
                yield name, _copy_out(mapped, stored, target(stored), device, name=name, path=self.path)
                continue
            tensor = _view(mapped, stored)
            check_finite(tensor, name, self.path)
            if arena is not None and stored.nbytes:
                tensor = arena.take(stored.dtype, stored.shape, stored.nbytes).copy_(tensor)
                _give_back(mapped, stored)
            yield name, tensor

    def close(self) -> None:
        pass


def _read_safetensors_header(path: Path) -> dict[str, StoredTensor]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise _corrupt(path, f"it is {size} bytes long, too short for a header")
        (header_len,) = struct.unpack("<Q", prefix)
        # The length is not quoted: a file that is no safetensors file at all would have its first bytes echoed.
        if header_len > min(_MAX_HEADER_BYTES, size - 8):
            raise _corrupt(path, f"its first 8 bytes are no header length that fits in its {size} bytes")
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except _DuplicateKey as err:
        raise _corrupt(path, f"its header names {err.key!r} twice") from None
    except UnicodeDecodeError:
        raise _corrupt(path, "its header is not UTF-8 text") from None
    except json.JSONDecodeError as err:
        raise _corrupt(path, f"its header is not valid JSON ({err.msg} at byte {err.pos})") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "its header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _corrupt(path, "its header's '__metadata__' is not a map of strings to strings")
    data_start, data_size = 8 + header_len, size - 8 - header_len
    spans = {name: _span(path, name, entry) for name, entry in header.items()}
    _check_tiling(path, spans, data_size)
    return {
        name: StoredTensor(dtype, shape, data_start + begin)
        for name, (dtype, shape, begin, _) in spans.items()
    }


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        self.key = key


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """A JSON object that names a key twice is refused (json.loads would silently keep the last)."""
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _span(path: Path, name: str, entry: object) -> tuple[torch.dtype, tuple[int, ...], int, int]:
    """dtype, shape and [begin, end) in the data of one header entry, checked against each other."""
    if (
        isinstance(entry, dict)
        and isinstance(entry.get("dtype"), str)
        and entry["dtype"] not in _SAFETENSORS_DTYPES
    ):
        raise CheckpointError(
            f"{path} stores {name!r} as {entry['dtype']}, a dtype this loader does not read "
            f"(it reads {', '.join(_SAFETENSORS_DTYPES)})."
        )
    shape, offsets = (
        (entry.get("shape"), entry.get("data_offsets")) if isinstance(entry, dict) else (None, None)
    )
    if (
        not isinstance(entry, dict)
        or not isinstance(entry.get("dtype"), str)
        or not isinstance(shape, list)
        or not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_count(n) for n in [*shape, *offsets])
    ):
        shown = repr(entry)
        shown = shown if len(shown) <= _SHOWN else shown[:_SHOWN] + "..."
        raise _corrupt(
            path,
            f"the header entry of {name!r} is malformed ({shown}); it needs a dtype, a shape of whole numbers "
            "and two whole-number data_offsets",
        )
    dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
    begin, end = offsets
    if (
        max(shape, default=0) > _MAX_DIM
        or end < begin
        or end - begin != _numel(tuple(shape)) * dtype.itemsize
    ):
        raise _corrupt(
            path,
            f"the header entry of {name!r} is inconsistent: {entry['dtype']} of shape {shape} takes "
            f"{_numel(tuple(shape)) * dtype.itemsize} bytes, its data_offsets [{begin}, {end}] span {end - begin}",
        )
    return dtype, tuple(shape), begin, end


def _is_count(n: object) -> bool:
    return type(n) is int and n >= 0  # not bool, float or str, which int() would quietly accept


def _check_tiling(path: Path, spans: dict, data_size: int) -> None:
    """The tensors, in offset order, must cover the data exactly: from byte 0, end to end, to its last byte."""
    end, last = 0, None
    for name, (_, _, begin, stop) in sorted(spans.items(), key=lambda item: item[1][2:]):
        if begin > end:
            where = f"after {last!r}" if last is not None else "before it"
            raise _corrupt(path, f"{name!r} starts at byte {begin} of the data, leaving a hole {where}")
        if begin < end:
            raise _corrupt(path, f"the data of {name!r} overlaps that of {last!r}")
        end, last = stop, name
    if end > data_size:
        raise _corrupt(
            path, f"its header describes {end} bytes of tensor data but only {data_size} follow (truncated)"
        )
    if end < data_size:
        after = f" after {last!r}" if last is not None else ""
        raise _corrupt(
            path,
            f"{data_size - end} bytes follow the last tensor{after}, which no tensor of the header covers",
        )


def _view(mapped: mmap.mmap, stored: StoredTensor) -> torch.Tensor:
    if stored.nbytes == 0:
        return torch.empty(stored.shape, dtype=stored.dtype)
    count = stored.nbytes // stored.dtype.itemsize
    return torch.frombuffer(mapped, dtype=stored.dtype, count=count, offset=stored.offset).view(stored.shape)


def _copy_out(
    mapped: mmap.mmap,
    stored: StoredTensor,
    target: torch.dtype,
    device: torch.device,
    *,
    name: str,
    path: Path,
) -> torch.Tensor:
    """A copy of the stored tensor in `target` on `device`; the mapped pages are given back afterwards."""
    out = torch.empty(stored.shape, dtype=target, device=device)
    if out.numel() == 0:
        return out
    _advise(mapped, "MADV_WILLNEED", *_pages(stored))
    if stored.offset % stored.dtype.itemsize:  # misaligned: read the bytes, then reinterpret them
        raw = torch.frombuffer(mapped, dtype=torch.uint8, count=stored.nbytes, offset=stored.offset)
        source = raw.clone().view(stored.dtype).view(stored.shape)
    else:
        source = _view(mapped, stored)
    check_finite(source, name, path)  # the stored values: a cast to a narrower dtype is not the file's fault
    out.copy_(source)
    _give_back(mapped, stored)
    return out


def _pages(stored: StoredTensor) -> tuple[int, int]:
    """(start, length) of the whole pages of the mapped file that hold the stored tensor."""
    first = stored.offset // mmap.PAGESIZE * mmap.PAGESIZE
    return first, stored.offset + stored.nbytes - first


def _give_back(mapped: mmap.mmap, stored: StoredTensor) -> None:
    """Drop the stored tensor's mapped pages once it has been copied out. Read pages count as this
    process's memory while mapped; the page cache keeps them, so that a load never holds the source and
    the result at once."""
    _advise(mapped, "MADV_DONTNEED", *_pages(stored))


def _advise(mapped: mmap.mmap, advice: str, start: int, length: int) -> None:
    if hasattr(mapped, "madvise") and hasattr(mmap, advice):  # Linux and macOS; elsewhere a no-op
        mapped.madvise(getattr(mmap, advice), start, length)


def check_finite(tensor: torch.Tensor, name: str, path: Path) -> None:
    """Refuse a floating-point tensor that holds NaN or an infinity: it would make the logits NaN, silently.

    One pass of `aminmax` (NaN propagates to both ends; an infinity is one of them), which reads at memory
    speed and allocates nothing the size of the tensor; the exact count is worked out only on failure.
    """
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return
    values = tensor if tensor.dtype.itemsize > 1 else tensor.to(torch.float16)  # float8 has no aminmax
    low, high = torch.aminmax(values)
    if bool(low.isfinite() & high.isfinite()):
        return
    bad = values.isfinite().logical_not_().reshape(-1)
    first = int(bad.nonzero()[0])
    raise CheckpointError(
        f"{path} holds {int(bad.sum())} NaN or infinite values in {name!r} (the first at flat index {first}): "
        "a model with them computes NaN logits. The file is damaged, or the training that wrote it diverged; "
        "download it again or use an earlier checkpoint."
    )


def torch_version() -> tuple[int, int]:
    """(major, minor) of the running torch."""
    match = re.match(r"(\d+)\.(\d+)", str(torch.__version__))
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


class TorchBinReader:
    """A legacy `pytorch_model*.bin` file, opened with `torch.load(weights_only=True)`.

    Memory-mapped when it is a zip archive (torch >= 1.6 writes them); the older non-zip serialization
    cannot be mapped and is read whole, still with `weights_only=True`.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        check_not_lfs_pointer(path)
        if torch_version() < _SAFE_TORCH:
            raise CheckpointError(
                f"{path} is a pickled PyTorch file, and torch {torch.__version__} cannot load one safely: before "
                "torch 2.6, torch.load(weights_only=True) can be made to run code (CVE-2025-32434). Upgrade "
                "torch to 2.6 or later, or convert the checkpoint to safetensors in a trusted environment."
            )
        is_zip = zipfile.is_zipfile(path)
        if not is_zip:  # torch's legacy format is a pickle, which opens with PROTO (0x80) and its version
            with open(path, "rb") as f:
                head = f.read(2)
            if len(head) < 2 or head[0] != 0x80 or not 2 <= head[1] <= 5:
                raise _corrupt(path, f"it is neither a zip archive nor a pickle (it starts with {head!r})")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
        except pickle.UnpicklingError as err:
            if "weights only" not in str(err).lower():
                raise _corrupt(path, f"its pickle is damaged ({_first_line(err)})") from err
            lines = [line.strip() for line in str(err).splitlines()]
            cause = next((line for line in lines if line.startswith("WeightsUnpickler error")), lines[0])
            raise CheckpointError(
                f"{path} holds objects other than tensors, which loading would have to execute; refusing to "
                f"unpickle it ({cause}). Convert the checkpoint to safetensors in a trusted environment."
            ) from err
        except Exception as err:  # zip and storage errors differ by torch version
            raise _corrupt(path, f"torch.load failed ({type(err).__name__}: {_first_line(err)})") from err
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
        self,
        names: Iterable[str],
        *,
        dtype: torch.dtype,
        device: torch.device,
        copy: bool = False,
        huge_pages: bool = False,
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield each named tensor on `device`, floating-point ones cast to `dtype` (mapped, as above)."""
        del copy, huge_pages  # legacy .bin: torch.load's tensors as they are
        assert self._state is not None, "reader used after close()"
        for name in names:
            src = self._state[name]
            check_finite(src, name, self.path)
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


def _first_line(err: Exception) -> str:
    line = (str(err).splitlines() or [""])[0]
    return line if len(line) <= _SHOWN else line[:_SHOWN] + "..."


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for dim in shape:
        n *= dim
    return n
