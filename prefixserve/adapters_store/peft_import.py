"""Import a Hugging Face PEFT adapter as our artifact.

Accepts an adapter directory, or a .tar / .tar.gz / .tgz / .zip of one (as a path or bytes; the
files may sit under one top-level folder). Exactly two files are read, straight from the archive
into memory and bounded: adapter_config.json and adapter_model.safetensors. Nothing is extracted
to disk and a pickled adapter_model.bin is never unpickled.

Layouts (checked against peft 0.21 and in tests against peft itself):
- PREFIX_TUNING saves `prompt_embeddings` [P, L*2*Hkv*D], the prefix after any projection MLP; the
  last dim is (layer, key/value, kv head, head dim), per peft's PeftModel.get_prompt.
- PROMPT_TUNING and P_TUNING save `prompt_embeddings` [P, hidden]: for P-tuning it is the prompt
  encoder's output (peft runs the MLP/LSTM at save time), i.e. what the model is fed.
- LORA saves `base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}.lora_{A|B}.weight`,
  A: [r, in_features], B: [out_features, r]; delta W = scaling * B @ A.
- IA3 saves `base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}.ia3_l`: [out_features, 1]
  (scales the output) or, for feedforward_modules, [1, in_features] (scales the input).
"""

from __future__ import annotations

import io
import json
import re
import tarfile
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, BinaryIO, TypeVar
from zlib import error as zlib_error

import torch

from prefixserve.adapters_store.format import (
    check_header_dtypes,
    decode_artifact,
    encode_artifact,
    load_tensors,
    read_safetensors_header,
)
from prefixserve.adapters_store.kinds import LORA_TARGETS
from prefixserve.errors import AdapterError

if TYPE_CHECKING:
    from prefixserve.config import AdapterLimits
    from prefixserve.models.llama import LlamaArch

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLED_NAME = "adapter_model.bin"
MAX_ARCHIVE_ENTRIES = 256  # a PEFT adapter is a handful of files; beyond this it is not one
# Listing a tar.gz decompresses every member it skips, so the declared sizes of all members are
# bounded too (the adapter's files plus a README and the like), not only the two we read.
ARCHIVE_SLACK_FACTOR = 2
_Entry = TypeVar("_Entry")
# What a damaged, encrypted or exotic archive raises while being listed or read (never an AdapterError).
_ARCHIVE_ERRORS = (zipfile.BadZipFile, tarfile.TarError, zlib_error, EOFError, OSError, RuntimeError,
                   NotImplementedError)


def import_peft(source: Path | bytes, *, arch: LlamaArch, fingerprint: dict, limits: AdapterLimits,
                dtype: torch.dtype = torch.float32) -> bytes:
    """Convert a PEFT adapter (directory, archive path or archive bytes) into artifact bytes that
    decode_artifact accepts for this backbone and an engine computing in `dtype`; AdapterError says
    what does not fit (e.g. a lora_alpha whose scaling overflows float32)."""
    config_bytes, weights_bytes = read_adapter_files(source, limits)
    try:
        peft_config = json.loads(config_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(f"expected {CONFIG_NAME} to be JSON, found invalid JSON ({e})") from None
    except RecursionError:  # e.g. 100,000 nested arrays: json.loads recurses once per level
        raise AdapterError(f"expected {CONFIG_NAME} to be a flat JSON object, found JSON nested too deeply "
                           f"to parse") from None
    if not isinstance(peft_config, dict):
        raise AdapterError(f"expected {CONFIG_NAME} to be a JSON object, found {type(peft_config).__name__}")
    _, entries = read_safetensors_header(weights_bytes)
    check_header_dtypes(entries)
    tensors = load_tensors(weights_bytes)
    peft_type = peft_config.get("peft_type")
    convert = _CONVERTERS.get(peft_type)
    if convert is None:
        raise AdapterError(f"expected a PEFT adapter of type {sorted(_CONVERTERS)}, found {peft_type!r}")
    _check_common(peft_config)
    kind, config, tensors = convert(peft_config, tensors, arch)
    data = encode_artifact(kind, config, tensors, fingerprint)
    decode_artifact(data, expected_fingerprint=fingerprint, limits=limits, arch=arch, dtype=dtype)  # as uploads
    return data


# ---- conversions -------------------------------------------------------------------------------

def _check_common(cfg: dict) -> None:
    if cfg.get("task_type") not in (None, "CAUSAL_LM"):
        raise AdapterError(f"expected a PEFT adapter with task_type CAUSAL_LM (we serve generation), "
                           f"found {cfg['task_type']!r}")
    if cfg.get("modules_to_save"):
        raise AdapterError(f"expected no modules_to_save (fully trained copies of base modules are not served), "
                           f"found {cfg['modules_to_save']}")


def _prompt_embeddings(cfg: dict, tensors: dict, arch: LlamaArch, token_dim: int) -> tuple[int, torch.Tensor]:
    """Shared checks of the prompt-learning types; returns P and prompt_embeddings [P, width]."""
    if cfg.get("num_transformer_submodules", 1) != 1:
        raise AdapterError(f"expected num_transformer_submodules 1 (decoder-only), "
                           f"found {cfg['num_transformer_submodules']}")
    if cfg.get("num_layers") != arch.num_layers:
        raise AdapterError(f"expected an adapter for a backbone of {arch.num_layers} layers, "
                           f"found num_layers {cfg.get('num_layers')}")
    if cfg.get("token_dim") != token_dim:
        raise AdapterError(f"expected token_dim {token_dim} for this backbone, found {cfg.get('token_dim')}")
    if set(tensors) != {"prompt_embeddings"}:
        raise AdapterError(f"expected exactly the tensor 'prompt_embeddings', found {sorted(tensors)[:8]}")
    num_tokens, embeddings = cfg.get("num_virtual_tokens"), tensors["prompt_embeddings"]
    if embeddings.ndim != 2 or embeddings.shape[0] != num_tokens:
        raise AdapterError(f"expected prompt_embeddings of shape [{num_tokens}, ...] (num_virtual_tokens rows), "
                           f"found {list(embeddings.shape)}")
    return num_tokens, embeddings


def _convert_prefix(cfg: dict, tensors: dict, arch: LlamaArch):
    num_layers, num_kv_heads, head_dim = arch.num_layers, arch.num_kv_heads, arch.head_dim
    # peft sizes the prefix by KV heads on GQA models: token_dim = Hkv * D, num_attention_heads = Hkv
    num_tokens, flat = _prompt_embeddings(cfg, tensors, arch, token_dim=num_kv_heads * head_dim)
    if cfg.get("num_attention_heads") != num_kv_heads:
        raise AdapterError(f"expected num_attention_heads {num_kv_heads} (the backbone's KV heads), "
                           f"found {cfg.get('num_attention_heads')}")
    if flat.shape[1] != num_layers * 2 * num_kv_heads * head_dim:
        raise AdapterError(f"expected prompt_embeddings of width {num_layers * 2 * num_kv_heads * head_dim} "
                           f"(layers x 2 x kv heads x head dim), found {flat.shape[1]}")
    kv = flat.view(num_tokens, num_layers, 2, num_kv_heads, head_dim)  # [P, L, k/v, Hkv, D]
    keys = kv[:, :, 0].permute(1, 0, 2, 3)  # [L, P, Hkv, D]
    values = kv[:, :, 1].permute(1, 0, 2, 3)  # [L, P, Hkv, D]
    return "prefix", {"num_virtual_tokens": num_tokens}, {"keys": keys, "values": values}


def _convert_prompt(cfg: dict, tensors: dict, arch: LlamaArch):
    num_tokens, embeddings = _prompt_embeddings(cfg, tensors, arch, token_dim=arch.hidden_size)
    return "prompt", {"num_virtual_tokens": num_tokens}, {"embeddings": embeddings}  # [P, hidden]


# A decoder layer's projection as peft names it: groups (layer, attention target, MLP target).
_PEFT_PROJECTION = (r"base_model\.model\.(?:model\.)?layers\.(\d+)\."
                    r"(?:self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))")
_LORA_KEY = re.compile(_PEFT_PROJECTION + r"\.lora_(A|B)\.weight")
# Options that change what the adapter computes, or need base weights we do not have: refused.
_UNSERVED_LORA_OPTIONS = {
    "use_dora": "DoRA rescales each weight by a learned magnitude, which the batched LoRA op does not do",
    "lora_bias": "a bias on lora_B is not served",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D-style transposed weights) is not served",
    "layer_replication": "layer replication builds a deeper model than the backbone",
    "trainable_token_indices": "trainable token embeddings are not served",
    "alora_invocation_tokens": "activated LoRA (aLoRA) applies weights only after invocation tokens",
    "use_qalora": "QA-LoRA pools input features and is not served",
    "target_parameters": "LoRA on raw parameters (target_parameters) is not served",
    "use_bdlora": "block-diagonal LoRA is not served",
    "monteclora_config": "MonteCLoRA samples its weights and is not served",
    "arrow_config": "Arrow routing between adapters is not served",
    "kasa_config": "KaSA changes the base weights and inserts a learned diagonal",
    "rank_pattern": "per-module ranks (rank_pattern) are not served; every module must use r",
    "alpha_pattern": "per-module alphas (alpha_pattern) are not served; every module must use lora_alpha",
}
# These initialisations rewrite the base weights, so the adapter alone is not a delta on our backbone
# unless it was saved with path_initial_model_for_weight_conversion (which resets the field to True).
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def _convert_lora(cfg: dict, tensors: dict, arch: LlamaArch):
    for option, reason in _UNSERVED_LORA_OPTIONS.items():
        if cfg.get(option):
            raise AdapterError(f"expected {option} unset, found {cfg[option]!r}: {reason}")
    if cfg.get("bias", "none") != "none":
        raise AdapterError(f"expected bias 'none', found {cfg['bias']!r}: trained base-model biases are not served")
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.startswith(_BASE_REWRITING_INITS):
        raise AdapterError(f"expected init_lora_weights that leaves the base weights untouched, found {init!r}: "
                           "re-save with save_pretrained(path_initial_model_for_weight_conversion=...)")
    targets = cfg.get("target_modules")
    if isinstance(targets, list):
        unserved = sorted({str(t).rsplit(".", 1)[-1] for t in targets} - set(LORA_TARGETS))
        if unserved:
            raise AdapterError(f"expected target_modules among {list(LORA_TARGETS)}, found {unserved}")
    rank, alpha, use_rslora = cfg.get("r"), cfg.get("lora_alpha"), cfg.get("use_rslora", False)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise AdapterError(f"expected a numeric lora_alpha, found {alpha!r}")
    if not isinstance(use_rslora, bool):
        raise AdapterError(f"expected use_rslora true or false, found {use_rslora!r}")
    unserved = sorted(key for key in tensors if not _LORA_KEY.fullmatch(key))
    if unserved:
        raise AdapterError(f"expected only LoRA A/B weights of {list(LORA_TARGETS)} in decoder layers, "
                           f"found {len(unserved)} others, e.g. {', '.join(repr(k) for k in unserved[:3])}")
    lora: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        match = _LORA_KEY.fullmatch(key)
        layer, target, side = match[1], match[2] or match[3], match[4].lower()
        lora[f"layers.{layer}.{target}.lora_{side}"] = tensor  # A: [r, in], B: [out, r]
    config = {"rank": rank, "alpha": float(alpha), "use_rslora": use_rslora,
              "targets": sorted({name.split(".")[2] for name in lora})}
    return "lora", config, lora


_IA3_KEY = re.compile(_PEFT_PROJECTION + r"\.ia3_l")


def _convert_ia3(cfg: dict, tensors: dict, arch: LlamaArch):
    if cfg.get("fan_in_fan_out"):
        raise AdapterError(f"expected fan_in_fan_out unset, found {cfg['fan_in_fan_out']!r}: Conv1D-style "
                           f"transposed weights are not served")
    unserved = sorted(key for key in tensors if not _IA3_KEY.fullmatch(key))
    if unserved:
        raise AdapterError(f"expected only IA3 vectors (ia3_l) of {list(LORA_TARGETS)} in decoder layers, "
                           f"found {len(unserved)} others, e.g. {', '.join(repr(k) for k in unserved[:3])}")
    vectors, feedforward = {}, set()
    for key, tensor in tensors.items():
        match = _IA3_KEY.fullmatch(key)
        layer, target = match[1], match[2] or match[3]
        # peft shapes the vector by where it multiplies: [1, in] before the matmul, [out, 1] after it
        if tensor.ndim != 2 or 1 not in tensor.shape:
            raise AdapterError(f"expected {key} of shape [1, in_features] or [out_features, 1], found "
                               f"{list(tensor.shape)}")
        if tensor.shape[0] == 1 and tensor.shape[1] != 1:
            feedforward.add(target)
        vectors[f"layers.{layer}.{target}.ia3"] = tensor.reshape(-1)
    declared = cfg.get("feedforward_modules")
    if isinstance(declared, list):  # a regex string is peft's other form: the shapes above say the same
        listed = {str(t).rsplit(".", 1)[-1] for t in declared} & {name.split(".")[2] for name in vectors}
        if listed != feedforward:
            raise AdapterError(f"expected the vectors of feedforward_modules {sorted(listed)} to be shaped "
                               f"[1, in_features] and only theirs, found that shape on {sorted(feedforward)}")
    targets = sorted({name.split(".")[2] for name in vectors})
    return "ia3", {"targets": targets, "feedforward": sorted(feedforward)}, vectors


_CONVERTERS: dict[str, Callable] = {"PREFIX_TUNING": _convert_prefix, "PROMPT_TUNING": _convert_prompt,
                                    "P_TUNING": _convert_prompt, "LORA": _convert_lora, "IA3": _convert_ia3}


# ---- reading the two files, bounded ------------------------------------------------------------

@dataclass
class _Member:
    name: str  # posix path inside the adapter source
    size: int
    read: Callable[[int], bytes]  # read(at_most) -> bytes


def read_adapter_files(source: Path | bytes, limits: AdapterLimits) -> tuple[bytes, bytes]:
    """(adapter_config.json, adapter_model.safetensors) bytes from a directory or an archive."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _read_archive(io.BytesIO(bytes(source)), limits)
    path = Path(source)
    if path.is_dir():
        return _pick(_directory_members(path), limits)
    if path.is_file():
        with path.open("rb") as f:
            return _read_archive(f, limits)
    raise AdapterError(f"expected a PEFT adapter directory or archive at {str(path)!r}, found nothing there")


def _read_archive(f: BinaryIO, limits: AdapterLimits) -> tuple[bytes, bytes]:
    try:
        if zipfile.is_zipfile(f):
            f.seek(0)
            with zipfile.ZipFile(f) as archive:
                return _pick(_bounded(_zip_members(archive.infolist(), archive), limits), limits)
        f.seek(0)
        with tarfile.open(fileobj=f, mode="r:*") as archive:
            return _pick(_bounded(_tar_members(archive), limits), limits)
    except _ARCHIVE_ERRORS as e:
        raise AdapterError(f"expected a PEFT adapter directory or a .tar, .tar.gz/.tgz or .zip of one, "
                           f"found an unreadable archive ({type(e).__name__}: {e})") from None


def _tar_members(archive: tarfile.TarFile) -> Iterator[_Member]:
    for info in _capped(archive):  # lazily, so a huge archive is refused after MAX_ARCHIVE_ENTRIES headers
        if info.isdir():
            continue
        _check_member_name(info.name)
        if not info.isreg():  # symlinks, hard links, devices, fifos could point anywhere
            raise AdapterError(f"expected only regular files in the archive, found {info.name!r} "
                               f"(a link or special file)")
        yield _Member(info.name, info.size, lambda n, info=info: archive.extractfile(info).read(n))


def _zip_members(infos: list[zipfile.ZipInfo], archive: zipfile.ZipFile) -> Iterator[_Member]:
    for info in _capped(infos):
        if info.is_dir():
            continue
        _check_member_name(info.filename)
        file_type = (info.external_attr >> 16) & 0o170000  # unix mode bits; 0 when made without them
        if file_type not in (0, 0o100000):
            raise AdapterError(f"expected only regular files in the archive, found {info.filename!r} "
                               f"(a link or special file)")
        yield _Member(info.filename, info.file_size, lambda n, info=info: archive.open(info).read(n))


def _capped(entries: Iterable[_Entry]) -> Iterator[_Entry]:
    """Every entry counts against the cap: folders, links and anything else cost a header read (and,
    in a .tar.gz, decompression) just as files do, so skipping them uncounted would let an archive of
    200,000 empty folders through."""
    for count, entry in enumerate(entries, start=1):
        if count > MAX_ARCHIVE_ENTRIES:
            raise AdapterError(f"expected an archive of at most {MAX_ARCHIVE_ENTRIES} entries (files, folders and "
                               f"links together), found more")
        yield entry


def _bounded(members: Iterable[_Member], limits: AdapterLimits) -> list[_Member]:
    taken, total = [], 0
    max_total = ARCHIVE_SLACK_FACTOR * limits.max_artifact_bytes
    for member in members:
        taken.append(member)
        total += member.size
        if total > max_total:
            raise AdapterError(f"expected an archive of at most {max_total} bytes uncompressed, found more")
    return taken


def _directory_members(path: Path) -> list[_Member]:
    # A local directory is the operator's own (e.g. a Hugging Face snapshot whose files are symlinks
    # into its blob store), so links are followed here; only uploaded archives are untrusted.
    files = [p for p in path.iterdir() if p.is_file()]
    files += [p for sub in path.iterdir() if sub.is_dir() for p in sub.iterdir() if p.is_file()]

    def reader(p: Path) -> Callable[[int], bytes]:
        def read(n: int) -> bytes:
            with p.open("rb") as f:
                return f.read(n)
        return read

    return [_Member(p.relative_to(path).as_posix(), p.stat().st_size, reader(p)) for p in files]


def _check_member_name(name: str) -> None:
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name) or ".." in parts:
        raise AdapterError(f"expected relative member paths inside the archive, found {name!r}")


def _pick(members: list[_Member], limits: AdapterLimits) -> tuple[bytes, bytes]:
    """The adapter's two files, at the top or under one folder, read with a byte bound."""
    by_name = {PurePosixPath(m.name).as_posix(): m for m in members}  # "./a" and "a" are one name
    if len(by_name) != len(members):  # tar allows repeats; which copy counts would be a guess
        raise AdapterError("expected each file once in the archive, found a name repeated")
    configs = [name for name in by_name if PurePosixPath(name).name == CONFIG_NAME]
    if len(configs) != 1:
        raise AdapterError(f"expected one {CONFIG_NAME} (at the top or under one folder), found {len(configs)} "
                           f"among {sorted(by_name)[:10]}")
    folder = PurePosixPath(configs[0]).parent
    if len(folder.parts) > 1:
        raise AdapterError(f"expected {CONFIG_NAME} at the top or under one folder, found {configs[0]!r}")
    weights = by_name.get((folder / WEIGHTS_NAME).as_posix())
    if weights is None:
        if (folder / PICKLED_NAME).as_posix() in by_name:
            raise AdapterError(f"expected {WEIGHTS_NAME}, found only the pickled {PICKLED_NAME}, which is never "
                               f"unpickled: re-save the adapter with safetensors, e.g. "
                               f"PeftModel.from_pretrained(base, path).save_pretrained(out, safe_serialization=True)")
        raise AdapterError(f"expected {(folder / WEIGHTS_NAME).as_posix()} next to {configs[0]}, found none")
    config = by_name[configs[0]]
    total = config.size + weights.size
    if total > limits.max_artifact_bytes:
        raise AdapterError(f"expected {CONFIG_NAME} and {WEIGHTS_NAME} of at most {limits.max_artifact_bytes} bytes "
                           f"together, found {total}")
    return _read_bounded(config, limits.max_artifact_bytes), _read_bounded(weights, limits.max_artifact_bytes)


def _read_bounded(member: _Member, max_bytes: int) -> bytes:
    try:
        data = member.read(max_bytes + 1)  # one byte more: an archive header that lies about the size is caught
    except _ARCHIVE_ERRORS as e:
        raise AdapterError(f"expected a readable {member.name!r}, found an error reading it ({e})") from None
    if len(data) > max_bytes:
        raise AdapterError(f"expected {member.name!r} of at most {max_bytes} bytes, found more")
    return data
