"""Read PyTorch checkpoints (state dicts) into numpy arrays, without torch.

Two layouts are read:

- the legacy one (`torch.save(..., _use_new_zipfile_serialization=False)`, and every file written
  before torch 1.6): a pickled magic number, protocol version and system info, then the pickled
  object whose tensors refer to storages by persistent id, then the pickled list of storage keys,
  then each storage as an int64 element count followed by its raw bytes, in that key order;
- the zip one (torch >= 1.6 default): `<archive>/data.pkl` plus one `<archive>/data/<key>` entry
  of raw bytes per storage.

Unpickling is restricted to the handful of globals a state dict needs, each mapped to a stand-in
defined here, so a checkpoint cannot run code and torch is never imported.
"""
from __future__ import annotations

import collections
import io
import pickle
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from transfer_flow.storage.errors import StoreError

_LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL_VERSION = 1001

# torch's typed storage classes, as pickled by name, and the element type each holds.
# bfloat16 has no numpy dtype, so a checkpoint holding it is refused rather than misread.
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype("f8"),
    "FloatStorage": np.dtype("f4"),
    "HalfStorage": np.dtype("f2"),
    "LongStorage": np.dtype("i8"),
    "IntStorage": np.dtype("i4"),
    "ShortStorage": np.dtype("i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


@dataclass(frozen=True)
class _StorageType:
    """Stand-in for a `torch.<X>Storage` class: only its element type matters."""

    dtype: np.dtype


@dataclass(frozen=True)
class _StorageRef:
    """Where a tensor's elements live: a storage key plus an element offset (non-zero for legacy views)."""

    key: str
    dtype: np.dtype
    element_offset: int


@dataclass(frozen=True)
class _TensorRef:
    """A tensor whose storage bytes are read after unpickling: legacy files keep them behind the pickle."""

    storage: _StorageRef
    storage_offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    return _TensorRef(storage, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    # An nn.Parameter is its data for reading purposes.
    return data


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(dtype) for name, dtype in _STORAGE_DTYPES.items()},
}


class _StateDictUnpickler(pickle.Unpickler):
    """Resolves only the globals listed above; storages become `_StorageRef`s, noted in `storages`."""

    def __init__(self, file: IO[bytes]):
        super().__init__(file)
        self.storages: dict[str, np.dtype] = {}

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a state dict") from None

    def persistent_load(self, pid: Any) -> _StorageRef:
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        storage_type, key = pid[1:3]
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unexpected storage type {storage_type!r}")
        self.storages.setdefault(str(key), storage_type.dtype)
        view_metadata = pid[5] if len(pid) == 6 else None
        if view_metadata is None:
            return _StorageRef(str(key), storage_type.dtype, 0)
        # Files from torch < 1.0 may refer to a slice of a root storage: (view key, offset, size).
        _view_key, element_offset, _view_size = view_metadata
        return _StorageRef(str(key), storage_type.dtype, int(element_offset))


# The largest tensor a checkpoint may hold: 2**28 elements (1 GiB of float32), far above any CNN layer
# (VGG16's largest, fc6, has 2**26.6). A storage may not be larger either.
MAX_ELEMENTS = 1 << 28


def _as_array(name: str, tensor: _TensorRef, storage_bytes: dict[str, bytes], byteorder: str, path: Path) -> np.ndarray:
    """The tensor's elements, after checking its geometry against its storage: nothing outside is ever read."""
    ref = tensor.storage
    dtype = ref.dtype.newbyteorder(byteorder)
    storage = storage_bytes[ref.key]
    if len(storage) % dtype.itemsize:
        raise StoreError(f"{path}: tensor {name!r} has a storage of {len(storage)} bytes, not whole "
                         f"{ref.dtype} elements")
    available = len(storage) // dtype.itemsize
    shape, stride = tensor.shape, tensor.stride
    offset = ref.element_offset + tensor.storage_offset  # Python integers throughout: no overflow
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (*shape, *stride)) or len(shape) != len(stride):
        raise StoreError(f"{path}: tensor {name!r} has a malformed shape {shape!r} or stride {stride!r}")
    if offset < 0 or any(s < 0 for s in stride) or any(d < 0 for d in shape):
        raise StoreError(f"{path}: tensor {name!r} has a negative offset, size or stride "
                         f"(offset {offset}, shape {shape}, stride {stride})")
    numel = 1
    for d in shape:
        numel *= d
    if numel > MAX_ELEMENTS:
        raise StoreError(f"{path}: tensor {name!r} claims {numel:,} elements (shape {shape}), more than any CNN layer "
                         f"({MAX_ELEMENTS:,})")
    last = offset + sum((d - 1) * s for d, s in zip(shape, stride))
    if numel and last >= available:
        raise StoreError(f"{path}: tensor {name!r} (offset {offset}, shape {shape}, stride {stride}) reaches element "
                         f"{last:,} of a storage holding {available:,}: the checkpoint is damaged or hostile")
    flat = np.frombuffer(storage, dtype=dtype)
    view = np.lib.stride_tricks.as_strided(
        flat[offset:] if numel else flat[:0],
        shape=shape,
        strides=tuple(s * dtype.itemsize for s in stride),
        writeable=False,
    )
    # A writable, contiguous, native-order copy that does not pin the file's bytes.
    return np.array(view, dtype=ref.dtype, order="C", copy=True)


def _tensors_of(obj: Any, path: Path) -> dict[str, _TensorRef]:
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, _TensorRef) for k, v in obj.items()):
        raise StoreError(f"{path} is a torch checkpoint but not a state dict (a flat mapping of names to tensors)")
    return dict(obj)


def _load_legacy(file: IO[bytes], path: Path) -> dict[str, np.ndarray]:
    if _StateDictUnpickler(file).load() != _LEGACY_MAGIC_NUMBER:
        raise StoreError(f"{path} is not a torch checkpoint (wrong magic number)")
    protocol_version = _StateDictUnpickler(file).load()
    if protocol_version != _LEGACY_PROTOCOL_VERSION:
        raise StoreError(f"{path}: unsupported legacy torch protocol version {protocol_version!r}")
    sys_info = _StateDictUnpickler(file).load()
    byteorder = "<" if sys_info.get("little_endian", True) else ">"
    unpickler = _StateDictUnpickler(file)
    tensors = _tensors_of(unpickler.load(), path)
    storage_keys = _StateDictUnpickler(file).load()
    storage_bytes: dict[str, bytes] = {}
    for key in storage_keys:
        dtype = unpickler.storages[key]
        numel = int(np.frombuffer(_read_exactly(file, 8, path), dtype=f"{byteorder}i8")[0])
        if not 0 <= numel <= MAX_ELEMENTS:
            raise StoreError(f"{path}: storage {key} claims {numel:,} elements: truncated or not a checkpoint")
        storage_bytes[key] = _read_exactly(file, numel * dtype.itemsize, path)
    return {name: _as_array(name, t, storage_bytes, byteorder, path) for name, t in tensors.items()}


def _load_zip(archive: zipfile.ZipFile, path: Path) -> dict[str, np.ndarray]:
    pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
    if len(pickles) != 1:
        raise StoreError(f"{path} is a zip file but not a torch checkpoint (no single */data.pkl)")
    prefix = pickles[0][: -len("data.pkl")]
    byteorder_entry = prefix + "byteorder"
    # Files written before torch 2.1 carry no byteorder entry; they were little-endian in practice.
    byteorder = "<"
    if byteorder_entry in archive.namelist() and archive.read(byteorder_entry).strip() == b"big":
        byteorder = ">"
    unpickler = _StateDictUnpickler(io.BytesIO(archive.read(pickles[0])))
    tensors = _tensors_of(unpickler.load(), path)
    storage_bytes = {}
    for key, dtype in unpickler.storages.items():
        entry = archive.getinfo(f"{prefix}data/{key}")
        if entry.file_size > MAX_ELEMENTS * dtype.itemsize:  # read nothing that large (a zip bomb, say)
            raise StoreError(f"{path}: storage {key} holds {entry.file_size:,} bytes, more than any CNN layer")
        storage_bytes[key] = archive.read(entry)
    return {name: _as_array(name, t, storage_bytes, byteorder, path) for name, t in tensors.items()}


def _read_exactly(file: IO[bytes], size: int, path: Path) -> bytes:
    data = file.read(size)
    if len(data) != size:
        raise StoreError(f"{path} is truncated or not a checkpoint: expected {size} more bytes, got {len(data)}")
    return data


def load_legacy_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Read a torch state dict file (legacy or zip layout) as {name: numpy array}, in file order.

    Raises StoreError when the file is not such a checkpoint, refers to anything but tensors
    (code, modules, custom classes), is truncated, or gives a tensor a geometry (offset, shape, stride)
    that reaches outside its storage or beyond MAX_ELEMENTS.
    """
    path = Path(path)
    try:
        with path.open("rb") as file:
            starts_as_zip = file.read(4) == b"PK\x03\x04"
        if starts_as_zip and not zipfile.is_zipfile(path):
            raise StoreError(f"{path} is truncated or not a checkpoint (a damaged zip file)")
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                return _load_zip(archive, path)
        with path.open("rb") as file:
            return _load_legacy(file, path)
    except StoreError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, KeyError, TypeError, AttributeError, IndexError,
            zipfile.BadZipFile, zlib.error, MemoryError, RecursionError) as error:
        raise StoreError(f"{path} is truncated or not a checkpoint (a torch state dict): "
                         f"{(str(error).splitlines() or [type(error).__name__])[0][:200]}") from error
