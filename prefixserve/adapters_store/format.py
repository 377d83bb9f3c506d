"""The task-artifact format: one safetensors file; its metadata holds the kind, the kind's config
and the fingerprint of the backbone it was made for. An artifact's version is the sha256 of its
bytes, so encoding is canonical: the same content always gives the same bytes.

Metadata (all strings): format_version, kind, config (JSON), backbone (JSON fingerprint).
decode_artifact is the one gate every artifact passes before it is stored or served.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from prefixserve.adapters_store.artifact import Artifact
from prefixserve.adapters_store.fingerprint import fingerprint_differences
from prefixserve.adapters_store.finite import all_finite, check_finite_in_dtype
from prefixserve.adapters_store.kinds import get_kind
from prefixserve.errors import AdapterError

if TYPE_CHECKING:
    from prefixserve.config import AdapterLimits
    from prefixserve.models.llama import LlamaArch

FORMAT_VERSION = 1
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_MAX_HEADER_BYTES = 100 << 20  # safetensors' own bound on the JSON header


def artifact_version(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def encode_artifact(kind: str, config: dict, tensors: dict[str, torch.Tensor], fingerprint: dict) -> bytes:
    """Canonical artifact bytes. Checks what needs no backbone (kind, config, names, dtypes, finite);
    decode_artifact checks the rest against a backbone and limits."""
    kind_cls = get_kind(kind)
    # clone: safetensors refuses views that share storage (e.g. keys and values sliced from one tensor)
    tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
    _check_tensor_values(tensors)
    kind_cls.validate(config, tensors, None, None)
    metadata = {"format_version": str(FORMAT_VERSION), "kind": kind,
                "config": _canonical_json("config", config), "backbone": _canonical_json("backbone", fingerprint)}
    return _canonical_header(save_safetensors(tensors, metadata=metadata))


def _canonical_header(data: bytes) -> bytes:
    """safetensors lays tensors out in a fixed order but writes metadata in hash-map order, which
    changes from call to call; rewrite the header with sorted metadata so equal content hashes equal."""
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + header_len])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    header = {"__metadata__": header.pop("__metadata__"), **header}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads the header to 8 bytes so tensor data stays aligned
    return len(text).to_bytes(8, "little") + text + data[8 + header_len:]


def decode_artifact(
    data: bytes, *, expected_fingerprint: dict | None, limits: AdapterLimits, arch: LlamaArch | None,
    dtype: torch.dtype = torch.float32,
) -> Artifact:
    """Parse and fully validate artifact bytes, or raise AdapterError (nothing is half-accepted).
    expected_fingerprint None skips the backbone match; arch None skips the backbone shapes; `dtype`
    is the engine's (every tensor and derived value must stay finite in it and in float32)."""
    if len(data) > limits.max_artifact_bytes:
        raise AdapterError(f"expected an artifact of at most {limits.max_artifact_bytes} bytes, found {len(data)}")
    metadata, entries = read_safetensors_header(data)
    version = metadata.get("format_version")
    if version != str(FORMAT_VERSION):
        raise AdapterError(f"expected artifact metadata format_version {FORMAT_VERSION!s}, found {version!r}")
    kind_cls = get_kind(metadata.get("kind", "<missing>"))
    config = _parse_json_object(metadata, "config")
    fingerprint = _parse_json_object(metadata, "backbone")
    if expected_fingerprint is not None:
        differences = fingerprint_differences(expected_fingerprint, fingerprint)
        if differences:
            raise AdapterError("artifact was made for another backbone: " + "; ".join(differences))
    check_header_dtypes(entries)
    tensors = load_tensors(data)
    _check_tensor_values(tensors)
    kind_cls.validate(config, tensors, arch, limits)
    check_finite_in_dtype(kind_cls.name, {**tensors, **kind_cls.derived_values(config, tensors)}, dtype)
    return Artifact(kind=kind_cls.name, config=config, tensors=tensors, fingerprint=fingerprint,
                    version=artifact_version(data), num_bytes=len(data))


def read_safetensors_header(data: bytes) -> tuple[dict[str, str], dict[str, dict]]:
    """(metadata, tensor entries) from the 8-byte little-endian header length + JSON header.
    Read by hand so that a malformed file is refused with a message before any tensor is built."""
    if len(data) < 8:
        raise AdapterError(f"expected a safetensors file (8-byte header length + JSON header), found {len(data)} bytes")
    header_len = int.from_bytes(data[:8], "little")
    if header_len > min(len(data) - 8, _MAX_HEADER_BYTES):
        raise AdapterError(f"expected a safetensors header of at most {min(len(data) - 8, _MAX_HEADER_BYTES)} bytes, "
                           f"found a declared length of {header_len}: not a safetensors file or truncated")
    try:
        header = json.loads(data[8:8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(f"expected a JSON safetensors header, found invalid JSON ({e})") from None
    except RecursionError:  # json.loads recurses once per nesting level
        raise AdapterError("expected a JSON safetensors header, found JSON nested too deeply to parse") from None
    if not isinstance(header, dict):
        raise AdapterError(f"expected the safetensors header to be a JSON object, found {type(header).__name__}")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise AdapterError("expected safetensors __metadata__ to map strings to strings, found another structure")
    for name, entry in header.items():
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
            raise AdapterError(f"expected tensor entry {name!r} with dtype, shape and data_offsets, found {entry!r}")
    return metadata, header


def check_header_dtypes(entries: dict[str, dict]) -> None:
    for name, entry in entries.items():
        if not isinstance(entry["dtype"], str) or entry["dtype"] not in SAFETENSORS_DTYPES:
            raise AdapterError(f"expected tensor {name!r} in one of {sorted(SAFETENSORS_DTYPES)}, "
                               f"found {entry['dtype']!r}")


def load_tensors(data: bytes) -> dict[str, torch.Tensor]:
    """Tensors of safetensors bytes (call read_safetensors_header / check_header_dtypes first)."""
    try:
        return load_safetensors(data)  # safetensors parses offsets itself; never pickle
    except Exception as e:  # the Rust parser raises its own SafetensorError for any malformed byte
        raise AdapterError(f"expected a well-formed safetensors body, found: {e}") from None


def _check_tensor_values(tensors: dict[str, torch.Tensor]) -> None:
    for name, t in tensors.items():
        if t.dtype not in SAFETENSORS_DTYPES.values():
            raise AdapterError(f"expected tensor {name!r} in float32, float16 or bfloat16, found {t.dtype}")
    if all_finite(tensors.values()):
        return
    for name, t in tensors.items():
        if not bool(torch.isfinite(t).all()):
            num_bad = int((~torch.isfinite(t)).sum())
            raise AdapterError(f"expected finite values in tensor {name!r}, found {num_bad} NaN/Inf")


def _canonical_json(field: str, value: dict) -> str:
    if not isinstance(value, dict):
        raise AdapterError(f"expected {field} to be a JSON object, found {type(value).__name__}")
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise AdapterError(f"expected {field} to be JSON-serialisable without NaN/Inf, found: {e}") from None


def _parse_json_object(metadata: dict[str, str], field: str) -> dict:
    if field not in metadata:
        raise AdapterError(f"expected artifact metadata {field!r}, found keys {sorted(metadata)}")
    try:
        value = json.loads(metadata[field], parse_constant=_refuse_constant)
    except (json.JSONDecodeError, ValueError, RecursionError) as e:  # RecursionError: nested too deeply
        raise AdapterError(f"expected artifact metadata {field!r} to be JSON, found invalid JSON ({e})") from None
    if not isinstance(value, dict):
        raise AdapterError(f"expected artifact metadata {field!r} to be a JSON object, found {type(value).__name__}")
    return value


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a finite number")
