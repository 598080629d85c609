"""Read a PyTorch state_dict file (``torch.save``) into numpy arrays, without torch.

Two layouts exist:

* legacy (torch < 1.6, and what facenet-pytorch ships): five things back to back --
  a pickled magic number, a pickled protocol version, a pickled sys-info dict, the
  pickled object (tensors refer to storages by persistent id), the pickled list of
  storage keys -- then, for each key in that order, an int64 element count followed by
  the raw little-endian elements.
* zip (torch >= 1.6): ``<name>/data.pkl`` holds the object, ``<name>/data/<key>`` holds
  each storage's raw bytes.

Unpickling runs only a short allow-list of globals, so a hostile file cannot run code.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from engines.errors import ModelError

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

_STORAGE_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


class TorchFileError(ModelError, ValueError):
    """A .pt file is truncated, corrupt, or uses something this reader does not support."""


@dataclass
class _Storage:
    """A storage named by a persistent id; its data is filled in after the main pickle is read."""

    key: str
    dtype: np.dtype
    numel: int
    data: np.ndarray | None = None


@dataclass(frozen=True)
class _StorageView:
    """A slice of another storage (only old torch wrote these)."""

    base: _Storage
    offset: int
    numel: int


@dataclass(frozen=True)
class _PendingTensor:
    storage: _Storage | _StorageView
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    return _PendingTensor(storage, int(storage_offset), tuple(int(s) for s in size), tuple(int(s) for s in stride))


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _PendingTensor(storage, int(storage_offset), tuple(int(s) for s in size), tuple(int(s) for s in stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    return data


class _StorageType:
    """Stands in for ``torch.FloatStorage`` etc.: carries only the element dtype."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.dtype = _STORAGE_DTYPES[name]


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(name) for name in _STORAGE_DTYPES},
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: BinaryIO, storages: dict[str, _Storage], source: str) -> None:
        super().__init__(file, encoding="utf-8")
        self._storages = storages
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise TorchFileError(
                f"{self._source}: the pickle asks for {module}.{name}, which this torch-free reader does not "
                "allow; only plain tensor state_dicts (float/int storages) can be read"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage":
            raise TorchFileError(f"{self._source}: unexpected persistent id {pid!r}; not a torch tensor file")
        storage_type, key, numel = pid[1], str(pid[2]), int(pid[4])
        if not isinstance(storage_type, _StorageType):
            raise TorchFileError(f"{self._source}: storage {key} has unsupported type {storage_type!r}")
        storage = self._storages.get(key)
        if storage is None:
            storage = _Storage(key, storage_type.dtype, numel)
            self._storages[key] = storage
        if len(pid) > 5 and pid[5] is not None:
            _view_key, view_offset, view_size = pid[5]
            return _StorageView(storage, int(view_offset), int(view_size))
        return storage


def _materialise(obj: Any, source: str) -> Any:
    """Turn pending tensors into numpy arrays, now that every storage has its data."""
    if isinstance(obj, _PendingTensor):
        st = obj.storage
        base_offset = 0
        if isinstance(st, _StorageView):
            base_offset = st.offset
            st = st.base
        if st.data is None:
            raise TorchFileError(f"{source}: storage {st.key} is referenced but its data is missing")
        flat = st.data[base_offset:]
        if obj.size and any(s == 0 for s in obj.size):
            return np.zeros(obj.size, dtype=st.dtype)
        last = obj.offset + sum((n - 1) * s for n, s in zip(obj.size, obj.stride))
        if obj.offset < 0 or last >= flat.size or any(s < 0 for s in obj.stride):
            raise TorchFileError(
                f"{source}: a tensor of size {obj.size} stride {obj.stride} offset {obj.offset} "
                f"does not fit in storage {st.key} of {flat.size} elements"
            )
        item = flat.itemsize
        view = np.lib.stride_tricks.as_strided(
            flat[obj.offset :], shape=obj.size, strides=tuple(s * item for s in obj.stride)
        )
        return np.array(view, dtype=st.dtype.newbyteorder("="), copy=True)
    if isinstance(obj, dict):
        return {k: _materialise(v, source) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_materialise(v, source) for v in obj)
    return obj


def _read_exact(f: BinaryIO, n: int, source: str, what: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise TorchFileError(f"{source}: file is truncated while reading {what} ({len(data)} of {n} bytes)")
    return data


def _load_pickle(f: BinaryIO, storages: dict[str, _Storage], source: str, what: str) -> Any:
    try:
        return _RestrictedUnpickler(f, storages, source).load()
    except TorchFileError:
        raise
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        IndexError,
        KeyError,
        AttributeError,
        UnicodeDecodeError,
        struct.error,
        MemoryError,
    ) as exc:
        raise TorchFileError(f"{source}: corrupt or truncated {what}: {exc}") from exc


def _read_legacy(f: BinaryIO, source: str) -> Any:
    storages: dict[str, _Storage] = {}
    magic = _load_pickle(f, storages, source, "magic number")
    if magic != _LEGACY_MAGIC:
        raise TorchFileError(f"{source}: not a torch file (bad magic number)")
    protocol = _load_pickle(f, storages, source, "protocol version")
    if protocol != _LEGACY_PROTOCOL:
        raise TorchFileError(f"{source}: unsupported torch legacy protocol version {protocol!r}")
    sys_info = _load_pickle(f, storages, source, "sys info")
    if isinstance(sys_info, dict) and sys_info.get("little_endian") is False:
        raise TorchFileError(f"{source}: written on a big-endian machine; not supported")
    obj = _load_pickle(f, storages, source, "state dict")
    keys = _load_pickle(f, storages, source, "storage key list")
    if not isinstance(keys, list):
        raise TorchFileError(f"{source}: corrupt storage key list ({type(keys).__name__})")
    for key in keys:
        st = storages.get(str(key))
        if st is None:
            raise TorchFileError(f"{source}: storage key {key!r} is listed but no tensor uses it")
        (count,) = struct.unpack("<q", _read_exact(f, 8, source, f"size of storage {key}"))
        if count < 0 or count > 1 << 34:
            raise TorchFileError(f"{source}: storage {key} claims an impossible size {count}")
        raw = _read_exact(f, count * st.dtype.itemsize, source, f"data of storage {key}")
        st.data = np.frombuffer(raw, dtype=st.dtype)
    return _materialise(obj, source)


def _read_zip(path: Path, source: str) -> Any:
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
            if len(pkl) != 1:
                raise TorchFileError(f"{source}: zip file holds no single data.pkl; not a torch file")
            prefix = pkl[0][: -len("data.pkl")]
            storages: dict[str, _Storage] = {}
            obj = _load_pickle(io.BytesIO(zf.read(pkl[0])), storages, source, "data.pkl")
            for key, st in storages.items():
                member = f"{prefix}data/{key}"
                if member not in names:
                    raise TorchFileError(f"{source}: storage {key} is missing from the archive ({member})")
                raw = zf.read(member)
                if len(raw) < st.numel * st.dtype.itemsize:
                    raise TorchFileError(f"{source}: storage {key} is truncated ({len(raw)} bytes)")
                st.data = np.frombuffer(raw[: st.numel * st.dtype.itemsize], dtype=st.dtype)
    except zipfile.BadZipFile as exc:
        raise TorchFileError(f"{source}: corrupt zip archive: {exc}") from exc
    return _materialise(obj, source)


def load_state_dict(path: Path | str) -> dict[str, np.ndarray]:
    """Read a torch state_dict file (legacy or zip layout) into ``{name: numpy array}``.

    Raises TorchFileError when the file is truncated, corrupt, not a torch file, or holds
    anything other than a flat mapping of names to tensors.
    """
    path = Path(path)
    source = str(path)
    try:
        with path.open("rb") as f:
            head = f.read(4)
            if zipfile.is_zipfile(f):
                obj = None
            else:
                f.seek(0)
                if not head:
                    raise TorchFileError(f"{source}: file is empty")
                obj = _read_legacy(f, source)
    except OSError as exc:
        raise TorchFileError(f"{source}: cannot read: {exc.strerror or exc}") from exc
    if obj is None:
        obj = _read_zip(path, source)
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in obj.items()):
        raise TorchFileError(f"{source}: expected a state_dict (names mapped to tensors), got {type(obj).__name__}")
    return dict(obj)
