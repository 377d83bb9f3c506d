"""The artifact format: canonical bytes, stable versions, and every refusal with its message."""

import hashlib
import json

import pytest
import torch
from store_cases import TINY_ARCH, hf_fingerprint, raw_artifact, raw_metadata, valid_parts

from prefixserve.adapters_store import (
    KINDS,
    artifact_version,
    backbone_fingerprint,
    decode_artifact,
    encode_artifact,
    get_kind,
)
from prefixserve.adapters_store.fingerprint import FINGERPRINT_FIELDS
from prefixserve.config import AdapterLimits
from prefixserve.errors import AdapterError, InvalidRequestError
from prefixserve.models.llama import LlamaArch
from prefixserve.models.tiny import tiny_hf_model, tiny_llama_config

LIMITS = AdapterLimits()


@pytest.fixture(scope="module")
def fingerprint(tiny_hf):
    return hf_fingerprint(tiny_hf)


def decode(data, fingerprint, limits=LIMITS, arch=TINY_ARCH):
    return decode_artifact(data, expected_fingerprint=fingerprint, limits=limits, arch=arch)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_round_trip_is_canonical(kind, fingerprint):
    config, tensors = valid_parts(kind)
    data = encode_artifact(kind, config, tensors, fingerprint)
    artifact = decode(data, fingerprint)
    assert (artifact.kind, artifact.config, artifact.fingerprint) == (kind, config, fingerprint)
    assert artifact.tensors.keys() == tensors.keys()
    assert all(torch.equal(artifact.tensors[n], tensors[n]) for n in tensors)
    assert artifact.version == hashlib.sha256(data).hexdigest() == artifact_version(data)
    assert artifact.num_bytes == len(data)
    # re-encoding what was decoded, or the same content in another dict order, gives the same bytes
    assert encode_artifact(artifact.kind, artifact.config, artifact.tensors, artifact.fingerprint) == data
    reordered = dict(reversed(list(tensors.items())))
    assert encode_artifact(kind, dict(reversed(list(config.items()))), reordered,
                           dict(reversed(list(fingerprint.items())))) == data


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_kept(dtype, fingerprint):
    config, tensors = valid_parts("prompt", dtype=dtype)
    artifact = decode(encode_artifact("prompt", config, tensors, fingerprint), fingerprint)
    assert artifact.tensors["embeddings"].dtype == dtype
    assert torch.equal(artifact.tensors["embeddings"], tensors["embeddings"])


def test_version_changes_with_any_value(fingerprint):
    config, tensors = valid_parts("prefix")
    before = encode_artifact("prefix", config, tensors, fingerprint)
    tensors["values"][1, 2, 0, 3] += 1e-3
    assert artifact_version(encode_artifact("prefix", config, tensors, fingerprint)) != artifact_version(before)


def test_metadata_holds_kind_config_and_backbone(fingerprint):
    from prefixserve.adapters_store.format import read_safetensors_header

    config, tensors = valid_parts("lora")
    metadata, _ = read_safetensors_header(encode_artifact("lora", config, tensors, fingerprint))
    assert metadata["format_version"] == "1" and metadata["kind"] == "lora"
    assert json.loads(metadata["config"]) == config and json.loads(metadata["backbone"]) == fingerprint


def test_fingerprint_of_backbone_matches_the_hf_model(tiny_backbone, tiny_hf, fingerprint):
    assert backbone_fingerprint(tiny_backbone) == fingerprint
    assert set(fingerprint) == set(FINGERPRINT_FIELDS)
    assert fingerprint["num_kv_heads"] == 2 and fingerprint["head_dim"] == 16


def test_same_shapes_other_weights_is_refused(fingerprint):
    other = hf_fingerprint(tiny_hf_model(seed=1))
    assert {k for k in FINGERPRINT_FIELDS if other[k] != fingerprint[k]} == {"embedding_sha256"}
    data = encode_artifact("prompt", *valid_parts("prompt"), other)
    with pytest.raises(AdapterError, match="made for another backbone: embedding_sha256: expected") as e:
        decode(data, fingerprint)
    assert fingerprint["embedding_sha256"] in e.value.message and other["embedding_sha256"] in e.value.message


def test_other_shapes_name_every_differing_field(fingerprint):
    arch = LlamaArch.from_hf_config(tiny_llama_config(num_hidden_layers=3))
    other = hf_fingerprint(tiny_hf_model(num_hidden_layers=3))
    data = encode_artifact("prefix", *valid_parts("prefix", arch=arch), other)
    with pytest.raises(AdapterError, match="num_layers: expected 2, found 3; embedding_sha256"):
        decode(data, fingerprint)
    # without an expected fingerprint the shapes still have to fit the arch
    with pytest.raises(AdapterError, match=r"expected keys of shape \[2, 4, 2, 16\], found \[3, 4, 2, 16\]"):
        decode(data, None)


def test_adapter_error_is_a_400():
    assert issubclass(AdapterError, InvalidRequestError) and AdapterError.status_code == 400


def _header_only(fingerprint, header: dict) -> bytes:
    text = json.dumps({"__metadata__": raw_metadata("intrinsic", valid_parts("intrinsic")[0], fingerprint),
                       **header}).encode()
    return len(text).to_bytes(8, "little") + text + bytes(4)


def _valid(fingerprint, kind="prefix"):
    return encode_artifact(kind, *valid_parts(kind), fingerprint)


def _raw(fingerprint, kind, config=None, tensors=None, meta=None):
    """Artifact bytes with decode's checks bypassed; `meta` overrides metadata strings (None drops one)."""
    default_config, default_tensors = valid_parts(kind)
    config = default_config if config is None else config
    tensors = default_tensors if tensors is None else tensors
    return raw_artifact(tensors, raw_metadata(kind, config, fingerprint, meta))


def _with(kind, config_changes=None, tensor_changes=None, drop=()):
    config, tensors = valid_parts(kind)
    config.update(config_changes or {})
    tensors.update(tensor_changes or {})
    for name in drop:
        tensors.pop(name, None)
        config.pop(name, None)
    return config, tensors


L, P, Hkv, D, HIDDEN = 2, 4, 2, 16, 64
BAD_ARTIFACTS = {
    # id: (build(fingerprint) -> bytes, limits, message regex)
    "oversize": (_valid, AdapterLimits(max_artifact_bytes=512), r"at most 512 bytes, found \d+"),
    "not_safetensors": (lambda fp: b"PK\x03\x04 this is a zip, not tensors", LIMITS, r"safetensors header of at most"),
    "too_short": (lambda fp: b"abc", LIMITS, r"8-byte header length \+ JSON header\), found 3 bytes"),
    "header_not_json": (lambda fp: (9).to_bytes(8, "little") + b"{not json", LIMITS, r"found invalid JSON"),
    "header_not_object": (lambda fp: (2).to_bytes(8, "little") + b"[]", LIMITS, r"JSON object, found list"),
    "header_dtype_not_string": (lambda fp: _header_only(fp, {"x": {"dtype": ["F32"], "shape": [1],
                                                                   "data_offsets": [0, 4]}}), LIMITS,
                                r"tensor 'x' in one of \['BF16', 'F16', 'F32'\], found \['F32'\]"),
    "header_entry_incomplete": (lambda fp: _header_only(fp, {"x": {"dtype": "F32"}}), LIMITS,
                                r"tensor entry 'x' with dtype, shape and data_offsets"),
    "truncated_body": (lambda fp: _valid(fp)[:-7], LIMITS, r"well-formed safetensors body"),
    "no_format_version": (lambda fp: _raw(fp, "prefix", meta={"format_version": None}), LIMITS,
                          r"format_version 1, found None"),
    "future_format_version": (lambda fp: _raw(fp, "prefix", meta={"format_version": "2"}), LIMITS,
                              r"format_version 1, found '2'"),
    "unknown_kind": (lambda fp: _raw(fp, "prefix", meta={"kind": "loha"}), LIMITS,
                     r"kind among \['adapter', 'bitfit', 'ia3', 'intrinsic', 'lora', 'prefix', 'prompt', "
                     r"'subspace'\], found "
                     r"'loha'"),
    "no_config": (lambda fp: _raw(fp, "prefix", meta={"config": None}), LIMITS,
                  r"expected artifact metadata 'config', found keys \['backbone', 'format_version', 'kind'\]"),
    "config_not_json": (lambda fp: _raw(fp, "prefix", meta={"config": "{oops"}), LIMITS, r"'config' to be JSON"),
    "config_not_object": (lambda fp: _raw(fp, "prefix", meta={"config": "[4]"}), LIMITS,
                          r"'config' to be a JSON object, found list"),
    "config_nan": (lambda fp: _raw(fp, "lora", meta={"config": '{"alpha": NaN}'}), LIMITS, r"NaN is not a finite"),
    "no_backbone": (lambda fp: _raw(fp, "prefix", meta={"backbone": None}), LIMITS,
                    r"expected artifact metadata 'backbone'"),
    "unexpected_tensor": (lambda fp: _raw(fp, "prompt", tensors={**valid_parts("prompt")[1], "foo": torch.ones(1)}),
                          LIMITS, r"unexpected \['foo'\]"),
    "missing_tensor": (lambda fp: _raw(fp, "prefix", tensors={"keys": valid_parts("prefix")[1]["keys"]}), LIMITS,
                       r"missing \['values'\]"),
    "wrong_kv_heads": (lambda fp: _raw(fp, "prefix", tensors={"keys": torch.ones(L, P, 4, D),
                                                               "values": torch.ones(L, P, 4, D)}),
                       LIMITS, r"expected keys of shape \[2, 4, 2, 16\], found \[2, 4, 4, 16\]"),
    "prefix_len_vs_config": (lambda fp: _raw(fp, "prefix", config={"num_virtual_tokens": 5}), LIMITS,
                             r"keys of shape \[2, 5, 2, 16\], found \[2, 4, 2, 16\]"),
    "prompt_hidden": (lambda fp: _raw(fp, "prompt", tensors={"embeddings": torch.ones(P, 32)}), LIMITS,
                      r"embeddings of shape \[4, 64\], found \[4, 32\]"),
    "nan": (lambda fp: _raw(fp, "prompt", tensors={"embeddings": torch.ones(P, HIDDEN).index_fill_(
        0, torch.tensor([2]), float("nan"))}), LIMITS, r"finite values in tensor 'embeddings', found 64 NaN/Inf"),
    "inf": (lambda fp: _raw(fp, "intrinsic", tensors={"z": torch.tensor([1.0, float("-inf")])}), LIMITS,
            r"finite values in tensor 'z', found 1 NaN/Inf"),
    "float64": (lambda fp: _raw(fp, "intrinsic", tensors={"z": torch.ones(5, dtype=torch.float64)}), LIMITS,
                r"tensor 'z' in one of \['BF16', 'F16', 'F32'\], found 'F64'"),
    "int64": (lambda fp: _raw(fp, "intrinsic", tensors={"z": torch.ones(5, dtype=torch.int64)}), LIMITS,
              r"found 'I64'"),
    "too_many_virtual_tokens": (_valid, AdapterLimits(max_virtual_tokens=3), r"num_virtual_tokens 1..3, found 4"),
    "zero_virtual_tokens": (lambda fp: _raw(fp, "prompt", config={"num_virtual_tokens": 0},
                                            tensors={"embeddings": torch.ones(0, HIDDEN)}), LIMITS,
                            r"num_virtual_tokens 1..512, found 0"),
    "rank_over_limit": (lambda fp: _valid(fp, "lora"), AdapterLimits(max_lora_rank=2), r"rank 1..2, found 4"),
    "bottleneck_over_limit": (lambda fp: _valid(fp, "adapter"), AdapterLimits(max_bottleneck_size=2),
                              r"adapter: expected size 1..2, found 3"),
    "intrinsic_dim_over_limit": (lambda fp: _valid(fp, "intrinsic"), AdapterLimits(max_intrinsic_dim=3),
                                 r"intrinsic dim 1..3, found 5"),
    "subspace_dim_over_limit": (lambda fp: _valid(fp, "subspace"), AdapterLimits(max_intrinsic_dim=3),
                                r"subspace: expected intrinsic dim 1..3, found 5"),
    "config_missing_key": (lambda fp: _raw(fp, "lora", config=_with("lora", drop=["use_rslora"])[0]), LIMITS,
                           r"config keys \['alpha', 'rank', 'targets', 'use_rslora'\], found \['alpha', 'rank'"),
    "config_extra_key": (lambda fp: _raw(fp, "prompt", config={"num_virtual_tokens": 4, "init": "text"}), LIMITS,
                         r"config keys \['num_virtual_tokens'\], found \['init', 'num_virtual_tokens'\]"),
    "config_bool_for_int": (lambda fp: _raw(fp, "prompt", config={"num_virtual_tokens": True}), LIMITS,
                            r"config 'num_virtual_tokens' of type int, found True"),
    "config_str_for_bool": (lambda fp: _raw(fp, "lora", config=_with("lora", {"use_rslora": "yes"})[0]), LIMITS,
                            r"config 'use_rslora' of type bool, found 'yes'"),
    "lora_missing_b": (lambda fp: _raw(fp, "lora", tensors=_with("lora", drop=["layers.1.v_proj.lora_b"])[1]),
                       LIMITS, r"missing \['layers.1.v_proj.lora_b'\]"),
    "lora_wrong_fan_in": (lambda fp: _raw(fp, "lora", tensors=_with(
        "lora", tensor_changes={"layers.0.down_proj.lora_a": torch.ones(4, 64)})[1]), LIMITS,
        r"layers.0.down_proj.lora_a of shape \[4, 128\], found \[4, 64\]"),
    "lora_rank_vs_config": (lambda fp: _raw(fp, "lora", config=_with("lora", {"rank": 2})[0]), LIMITS,
                            r"lora_a of shape \[2, \d+\], found \[4, \d+\]"),
    "lora_layer_out_of_range": (lambda fp: _raw(fp, "lora", tensors=_with("lora", tensor_changes={
        "layers.2.q_proj.lora_a": torch.ones(4, 64), "layers.2.q_proj.lora_b": torch.ones(64, 4)})[1]), LIMITS,
        r"layer indices 0..1, found 'layers.2.q_proj"),
    "lora_unknown_target": (lambda fp: _raw(fp, "lora", config=_with("lora", {"targets": ["lm_head"]})[0]), LIMITS,
                            r"targets as a sorted list of distinct names from \['q_proj'.*found \['lm_head'\]"),
    "lora_targets_vs_tensors": (lambda fp: _raw(fp, "lora", config=_with("lora", {"targets": ["q_proj"]})[0]),
                                LIMITS, r"config targets to list the adapted projections \['down_proj'.*"
                                        r"found \['q_proj'\]"),
    "lora_bad_name": (lambda fp: _raw(fp, "lora", tensors={"lm_head.lora_a": torch.ones(4, 64)}), LIMITS,
                      r"tensors named layers.<i>.<target>.lora_a / lora_b, found \['lm_head.lora_a'\]"),
    "intrinsic_version_not_hex": (lambda fp: _raw(fp, "intrinsic", config={"subspace_version": "task-v1"}), LIMITS,
                                  r"sha256 hex digest .*found 'task-v1'"),
    "subspace_wrong_out": (lambda fp: _raw(fp, "subspace", tensors=_with("subspace", tensor_changes={
        "decoder.2.weight": torch.ones(3 * HIDDEN, 8), "decoder.2.bias": torch.ones(3 * HIDDEN)})[1]), LIMITS,
        r"decoder.2.weight of shape \[256, 8\], found \[192, 8\]"),
}


@pytest.mark.parametrize("case", sorted(BAD_ARTIFACTS))
def test_bad_artifact_is_refused_with_expected_and_found(case, fingerprint):
    build, limits, message = BAD_ARTIFACTS[case]
    with pytest.raises(AdapterError, match=message):
        decode(build(fingerprint), fingerprint, limits=limits)


def test_decode_without_arch_still_checks_consistency(fingerprint):
    data = _raw(fingerprint, "prefix", tensors={"keys": torch.ones(L, P, Hkv, D), "values": torch.ones(L, P, 1, D)})
    with pytest.raises(AdapterError, match=r"values of the same shape as keys \[2, 4, 2, 16\], found \[2, 4, 1, 16\]"):
        decode(data, None, arch=None)
    assert decode(_valid(fingerprint, "lora"), None, arch=None).kind == "lora"


@pytest.mark.parametrize("kind, config, tensors, message", [
    ("loha", {}, {}, r"kind among .* found 'loha'"),
    ("bitfit", {"targets": []}, {}, r"layers.<i>.<target>.bias, found \[\]"),
    ("ia3", {"targets": [], "feedforward": []}, {}, r"layers.<i>.<target>.ia3, found \[\]"),
    ("adapter", {"size": 1, "placements": [], "activation": "relu"}, {}, r"layers.<i>.<placement>.down .*, found \[\]"),
    ("prompt", {"num_virtual_tokens": 1}, {"embeddings": torch.full((1, 64), float("nan"))}, r"NaN/Inf"),
    ("intrinsic", {"subspace_version": "ab" * 32}, {"z": torch.ones(3, dtype=torch.int32)}, r"found torch.int32"),
    ("prompt", {"num_virtual_tokens": 1, "note": object()}, {"embeddings": torch.ones(1, 64)}, r"config keys"),
    ("lora", {"rank": 1, "alpha": 1.0, "use_rslora": False, "targets": []}, {}, r"lora_a / lora_b, found \[\]"),
])
def test_encode_refuses_what_decode_would(kind, config, tensors, message, fingerprint):
    with pytest.raises(AdapterError, match=message):
        encode_artifact(kind, config, tensors, fingerprint)


def test_encode_refuses_a_fingerprint_that_is_not_json(fingerprint):
    with pytest.raises(AdapterError, match="backbone to be JSON-serialisable"):
        encode_artifact("prompt", *valid_parts("prompt"), {**fingerprint, "when": object()})


def test_get_kind_lists_known_kinds():
    assert get_kind("lora") is KINDS["lora"]
    with pytest.raises(AdapterError, match=r"among \['adapter', 'bitfit', 'ia3', 'intrinsic', 'lora', 'prefix', "
                                           r"'prompt', 'subspace'\]"):
        get_kind("LoRA")


def _valid_with(kind, config_changes=None, tensor_changes=None, dtype=torch.float32):
    """(kind, config, tensors) of a valid artifact with some config values or tensors replaced."""
    config, tensors = valid_parts(kind, dtype=dtype)
    return kind, config | (config_changes or {}), tensors | (tensor_changes or {})


def _overflowing_source_vectors():
    config, tensors = valid_parts("subspace")
    hidden_dec, d = tensors["decoder.0.weight"].shape
    # tanh(1) * 1e38 summed over the hidden units overflows float32, whatever z is
    tensors |= {"decoder.0.weight": torch.zeros(hidden_dec, d), "decoder.0.bias": torch.ones(hidden_dec),
                "decoder.2.weight": torch.full_like(tensors["decoder.2.weight"], 1e38),
                "source_vectors": torch.ones(2, d)}
    return "subspace", config, tensors


# Finite as stored, not finite once the engine computes with it (the lora_alpha 1e308, and kin).
OVERFLOWING = {
    "lora_alpha": (_valid_with("lora", {"alpha": 1e308}), torch.float32,
                   r"lora: expected scaling \(alpha 1e\+308 / rank 4\) to be finite in float32 .*found 2\.5e\+307, "
                   r"which overflows"),
    "rslora_alpha": (_valid_with("lora", {"alpha": 1e300, "use_rslora": True}), torch.float32,
                     r"scaling \(alpha 1e\+300 / sqrt\(rank 4\)\) to be finite in float32 .*found 5e\+299"),
    "lora_in_float16": (_valid_with("lora", {"alpha": 1e6}), torch.float16,
                        r"scaling .* finite in float16 .*found 250000"),
    "prompt_in_float16": (_valid_with("prompt", tensor_changes={"embeddings": torch.full((4, 64), 1e5)}), torch.float16,
                          r"prompt: expected embeddings to be finite in float16 .*found 256 of its 256 values "
                          r"overflow \(largest magnitude 100000\)"),
    "prefix_in_bfloat16": (_valid_with("prefix", tensor_changes={"keys": torch.full((L, P, Hkv, D), 3.4e38)}),
                           torch.bfloat16, r"prefix: expected keys to be finite in bfloat16"),
    "subspace_source_vectors": (_overflowing_source_vectors(), torch.float32,
                                r"subspace: expected the soft prompt decoded from source_vectors\[0\] to be finite "
                                r"in float32"),
}


@pytest.mark.parametrize("case", sorted(OVERFLOWING))
def test_values_that_overflow_in_the_engines_dtype_are_refused(case, fingerprint):
    (kind, config, tensors), dtype, message = OVERFLOWING[case]
    data = encode_artifact(kind, config, tensors, fingerprint)
    with pytest.raises(AdapterError, match=message):
        decode_artifact(data, expected_fingerprint=fingerprint, limits=LIMITS, arch=TINY_ARCH, dtype=dtype)


def test_values_that_fit_the_engines_dtype_are_accepted(fingerprint):
    data = encode_artifact(*_valid_with("prompt", tensor_changes={"embeddings": torch.full((4, 64), 1e5)}), fingerprint)
    assert decode(data, fingerprint).kind == "prompt"  # 1e5 is an ordinary float32
    artifact = decode(encode_artifact(*_valid_with("lora", {"alpha": 1e30}), fingerprint), fingerprint)
    assert get_kind("lora").scaling(artifact.config) == 2.5e29
