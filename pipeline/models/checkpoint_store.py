"""Where a Hugging Face checkpoint is kept, and reading its safetensors a slice at a time.

A checkpoint location is one of:

- a local directory (``/models/llama``), or a kvstore URL: ``file:///models/llama/``,
  ``gs://bucket/llama/``, ``s3://bucket/llama/``, ``http(s)://host/llama/``;
- ``hf://org/name`` or ``hf://org/name@revision``: a Hugging Face Hub repository, brought into
  huggingface_hub's cache by ``snapshot_download`` (only its JSON and safetensors files; the
  cache is reused, and ``HF_HUB_OFFLINE=1`` reads it without any network), then read from there.

Every location is read through one TensorStore kvstore (a local directory through the ``file``
driver): local and remote checkpoints share one code path.

A safetensors file is an 8-byte little-endian header length ``N``, ``N`` bytes of JSON (per
tensor its ``dtype``, ``shape`` and ``data_offsets`` ``[begin, end)`` counted from the end of the
header), then the tensors' raw little-endian bytes, row-major (huggingface/safetensors:
README.md, "Format"). ``read_header`` reads only the header; ``read_slice`` reads, for a slice
of a parameter in our layout, only the byte ranges of the Hugging Face rows it covers, so a host
that holds part of a parameter reads about that part of the file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
import tensorstore as ts

from pipeline.errors import ModelLoadError
from pipeline.models.layouts import Layout

HF_SCHEME = "hf://"
# What snapshot_download brings of a Hub repository: config.json, generation_config.json, the
# tokenizer's JSON files, model.safetensors.index.json and the weights; never pickles.
HUB_PATTERNS = ("*.json", "*.safetensors")
_HUB_LOCATION = re.compile(r"hf://([\w.-]+)/([\w.-]+)(?:@([^/]+))?/?")
# A remote checkpoint that cannot be reached fails after these retries (TensorStore's
# default retries an http request 32 times, up to 32 s apart).
_HTTP_RETRIES = {"max_retries": 3, "initial_delay": "0.2s", "max_delay": "2s"}
# The safetensors library refuses headers over 100 MB (huggingface/safetensors:
# safetensors/src/tensor.rs, MAX_HEADER_SIZE).
_MAX_HEADER_BYTES = 100_000_000
_DTYPES = {"F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
           "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
           "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype("<i8"),
           "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
           "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"),
           "U8": np.dtype("u1"), "BOOL": np.dtype("?")}


@dataclasses.dataclass(frozen=True)
class CheckpointStore:
    """A checkpoint directory opened as a TensorStore kvstore; ``location`` is what the user gave
    (``hf://`` locations are their local snapshot by now, ``hub`` the repository)."""

    location: str
    kvstore: ts.KvStore
    hub: str | None = None

    def url(self, name: str) -> str:
        """``name`` inside the checkpoint, as it is named in messages."""
        return f"{self.hub or self.location.rstrip('/')}/{name}"

    def read(self, name: str, byte_range: slice | None = None) -> bytes | None:
        """The bytes of file ``name`` (or of its ``byte_range``); None when there is no such file.

        Raises:
          ModelLoadError: the file cannot be read (unreachable, refused), naming it.
        """
        try:
            result = self.kvstore.read(name, byte_range=byte_range).result()
        except ValueError as err:  # TensorStore reports I/O failures as ValueError
            raise ModelLoadError(f"{self.url(name)}: could not be read ({err})") from err
        return None if result.state == "missing" else result.value

    def read_ranges(self, name: str, ranges: list[tuple[int, int]], what: str) -> list[bytes]:
        """The bytes ``[begin, end)`` of each of ``ranges`` of file ``name``, requested as one
        TensorStore batch (which merges nearby ranges into one request).

        Raises:
          ModelLoadError: a range cannot be read or lies past the file's end (``what``: which
            tensor, for the message).
        """
        batch = ts.Batch()
        futures = [self.kvstore.read(name, byte_range=slice(begin, end), batch=batch)
                   for begin, end in ranges]
        batch.submit()
        chunks = []
        for (begin, end), future in zip(ranges, futures):
            past_end = ModelLoadError(f"{self.url(name)}: {what}: bytes {begin}..{end} lie past "
                                      f"the end of the file (truncated?)")
            try:
                result = future.result()
            except ValueError as err:
                if "OUT_OF_RANGE" in str(err):  # TensorStore's status code for a short file
                    raise past_end from err
                raise ModelLoadError(f"{self.url(name)}: {what}: bytes {begin}..{end} could not "
                                     f"be read ({err})") from err
            if result.state == "missing" or len(result.value) != end - begin:
                raise past_end
            chunks.append(result.value)
        return chunks

    def names(self) -> list[str] | None:
        """The files directly in the checkpoint, or None when its kvstore cannot list (http)."""
        try:
            keys = self.kvstore.list().result()
        except ValueError:
            return None
        return sorted(key.decode() for key in keys if b"/" not in key)


def open_checkpoint(location: str | os.PathLike) -> CheckpointStore:
    """The checkpoint at ``location`` (see the module docstring for the accepted forms).

    Raises:
      ModelLoadError: a local path that is not a directory, a URL TensorStore has no kvstore
        for, or a Hub repository that cannot be fetched (nor found in the cache when offline).
    """
    location = os.fspath(location)
    hub = None
    if location.startswith(HF_SCHEME):
        hub, location = location, _hub_snapshot(location)
    if "://" in location:
        try:
            spec = ts.KvStore.Spec(location).to_json()
        except ValueError as err:
            raise ModelLoadError(
                f"model path {location!r} is not a checkpoint location TensorStore reads ({err}); "
                f"expected a local directory, gs://, s3://, http(s)://, file:// or "
                f"hf://org/name[@revision]") from None
    else:
        if not Path(location).is_dir():
            raise ModelLoadError(f"model path {location!r}: expected a checkpoint directory")
        spec = {"driver": "file", "path": os.path.abspath(location)}
    spec["path"] = spec.get("path", "").rstrip("/") + "/"
    context = ts.Context({"http_request_retries": _HTTP_RETRIES})
    return CheckpointStore(location, ts.KvStore.open(spec, context=context).result(), hub)


def _hub_snapshot(location: str) -> str:
    """The local snapshot directory of Hub location ``hf://org/name[@revision]``."""
    match = _HUB_LOCATION.fullmatch(location)
    if match is None:
        raise ModelLoadError(f"model path {location!r}: expected hf://org/name or "
                             f"hf://org/name@revision")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    org, name, revision = match.groups()
    try:
        return snapshot_download(f"{org}/{name}", revision=revision,
                                 allow_patterns=list(HUB_PATTERNS))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as err:
        raise ModelLoadError(
            f"model path {location!r}: could not be fetched from the Hugging Face Hub nor found "
            f"in its cache ({type(err).__name__}: {err}); with HF_HUB_OFFLINE=1 the repository "
            f"must already be in the cache (HF_HUB_CACHE)") from err


@dataclasses.dataclass(frozen=True)
class StoredTensor:
    """One tensor of a safetensors file: where its bytes are and how to read them."""

    name: str
    file: str
    dtype: np.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset of its first element in ``file``


def read_header(store: CheckpointStore, file: str) -> dict[str, StoredTensor]:
    """The tensors of safetensors file ``file``, from its header alone (two small reads).

    Raises:
      ModelLoadError: no such file, or not a readable safetensors file (truncated or malformed
        header, an unknown dtype, offsets that disagree with a shape), naming the file.
    """
    def bad(why: str) -> ModelLoadError:
        return ModelLoadError(f"{store.url(file)}: not a readable safetensors file ({why})")

    head = store.read(file, slice(0, 8))
    if head is None:
        raise ModelLoadError(f"{store.url(file)}: no such file")
    if len(head) < 8:
        raise bad(f"{len(head)} bytes, shorter than the 8-byte header length")
    (length,) = struct.unpack("<Q", head)
    if not 0 < length <= _MAX_HEADER_BYTES:
        raise bad(f"header length {length}, expected 1 to {_MAX_HEADER_BYTES} bytes")
    try:
        (text,) = store.read_ranges(file, [(8, 8 + length)], f"its {length}-byte header")
    except ModelLoadError as err:  # say what the file is not, then why
        raise bad(str(err).removeprefix(f"{store.url(file)}: ")) from None
    try:
        header = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise bad(f"its header is not JSON: {err}") from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape = _DTYPES[entry["dtype"]], tuple(int(n) for n in entry["shape"])
            begin, end = (int(n) for n in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as err:
            raise bad(f"tensor {name!r}: expected a known dtype, a shape and data_offsets, "
                      f"got {entry!r} ({type(err).__name__}: {err})") from None
        if end - begin != int(np.prod(shape)) * dtype.itemsize or begin < 0:
            raise bad(f"tensor {name!r}: data_offsets {[begin, end]} do not hold a "
                      f"{entry['dtype']} tensor of shape {list(shape)}")
        tensors[name] = StoredTensor(name, file, dtype, shape, 8 + length + begin)
    return tensors


def read_tensor_bytes(store: CheckpointStore, tensor: StoredTensor) -> bytes:
    """All of ``tensor``'s raw bytes."""
    nbytes = int(np.prod(tensor.shape)) * tensor.dtype.itemsize
    (data,) = store.read_ranges(tensor.file, [(tensor.begin, tensor.begin + nbytes)],
                                f"tensor {tensor.name!r}")
    return data


def read_slice(store: CheckpointStore, tensor: StoredTensor, layout: Layout, shape: tuple,
               index: tuple[slice, ...]) -> np.ndarray:
    """``layout.to_ours(whole tensor, shape)[index]``, reading only the tensor's bytes it needs.

    ``index`` (a slice per axis of our ``shape``, as ``jax.make_array_from_callback`` passes)
    is mapped back through the layout to the Hugging Face rows and columns it covers: the rows
    are read as one byte range when whole, else each row's covered part (one TensorStore batch,
    which merges ranges only a few KiB apart). Layouts are views (transposes and reshapes), so
    each of our axes follows one Hugging Face axis in increasing order.
    """
    hf_shape = tensor.shape
    # For each Hugging Face axis, its coordinate at each position of our slice, as an open grid:
    # axes of the slice that do not move along that Hugging Face axis are collapsed to length 1.
    grids = []
    for axis, size in enumerate(hf_shape):
        along = np.arange(size).reshape([size if a == axis else 1 for a in range(len(hf_shape))])
        ours = layout.to_ours(np.broadcast_to(along, hf_shape), shape)[index]
        grids.append(np.array(ours[tuple(slice(None) if stride else slice(0, 1)
                                         for stride in ours.strides)]))
    if not grids:  # a scalar
        return np.frombuffer(read_tensor_bytes(store, tensor), tensor.dtype).reshape(())
    first, last = int(grids[0].min()), int(grids[0].max())
    row_items = int(np.prod(hf_shape[1:]))
    strides = [int(np.prod(hf_shape[axis + 1:])) for axis in range(1, len(hf_shape))]
    within = sum((g * s for g, s in zip(grids[1:], strides)), np.zeros((), np.int64))
    lo, hi = int(within.min()), int(within.max()) + 1
    item = tensor.dtype.itemsize
    what = f"tensor {tensor.name!r}"
    if lo == 0 and hi == row_items:
        ranges = [(tensor.begin + first * row_items * item,
                   tensor.begin + (last + 1) * row_items * item)]
    else:
        ranges = [(tensor.begin + (row * row_items + lo) * item,
                   tensor.begin + (row * row_items + hi) * item)
                  for row in range(first, last + 1)]
    data = b"".join(store.read_ranges(tensor.file, ranges, what))
    rows = np.frombuffer(data, tensor.dtype).reshape(last + 1 - first, hi - lo)
    if rows.size == int(np.prod(hf_shape)) and all(
            len(range(*part.indices(n))) == n for part, n in zip(index, shape)):
        return layout.to_ours(rows.reshape(hf_shape), shape)  # the whole tensor: a view
    return rows[grids[0] - first, within - lo]
