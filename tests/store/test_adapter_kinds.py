"""Kind behaviour the engine relies on: IPT decoding, LoRA scaling, virtual-token counts."""

import math

import pytest
import torch
from store_cases import TINY_ARCH, valid_parts

from prefixserve.adapters_store import KINDS, get_kind
from prefixserve.adapters_store.kinds import AdapterKind, lora_features
from prefixserve.errors import AdapterError


def test_every_kind_is_a_registered_class():
    assert set(KINDS) == {"prefix", "prompt", "subspace", "intrinsic", "lora"}
    assert all(issubclass(k, AdapterKind) and KINDS[k.name] is k for k in KINDS.values())


def test_subspace_decode_is_linear_tanh_linear():
    config, tensors = valid_parts("subspace")
    z = torch.randn(config["intrinsic_dim"])
    prompt = get_kind("subspace").decode(tensors, z, config)
    hidden = torch.tanh(tensors["decoder.0.weight"] @ z + tensors["decoder.0.bias"])
    expected = (tensors["decoder.2.weight"] @ hidden + tensors["decoder.2.bias"]).view(4, TINY_ARCH.hidden_size)
    assert prompt.shape == (4, 64) and prompt.dtype == torch.float32
    torch.testing.assert_close(prompt, expected)
    with pytest.raises(AdapterError, match=r"z of shape \[5\], found \[6\]"):
        get_kind("subspace").decode(tensors, torch.randn(6), config)


def test_subspace_decode_of_half_weights_is_fp32():
    config, tensors = valid_parts("subspace", dtype=torch.bfloat16)
    assert get_kind("subspace").decode(tensors, torch.ones(5), config).dtype == torch.float32


def test_subspace_may_carry_its_source_vectors_in_its_dimension():
    config, tensors = valid_parts("subspace")
    subspace = get_kind("subspace")
    subspace.validate(config, {**tensors, "source_vectors": torch.randn(3, 5)}, TINY_ARCH, None)
    with pytest.raises(AdapterError, match=r"expected source_vectors of shape \[\*, 5\], found \[3, 4\]"):
        subspace.validate(config, {**tensors, "source_vectors": torch.randn(3, 4)}, TINY_ARCH, None)
    with pytest.raises(AdapterError, match=r"source_vectors \(optional\).*unexpected \['sources'\]"):
        subspace.validate(config, {**tensors, "sources": torch.randn(3, 5)}, TINY_ARCH, None)


def test_intrinsic_must_match_its_subspace_dim():
    subspace_config, _ = valid_parts("subspace")
    _, tensors = valid_parts("intrinsic")
    get_kind("intrinsic").check_subspace(tensors, subspace_config)
    with pytest.raises(AdapterError, match="intrinsic_dim 7, found 5"):
        get_kind("intrinsic").check_subspace(tensors, {**subspace_config, "intrinsic_dim": 7})


@pytest.mark.parametrize("use_rslora, expected", [(False, 16 / 4), (True, 16 / math.sqrt(4))])
def test_lora_scaling(use_rslora, expected):
    assert get_kind("lora").scaling({"rank": 4, "alpha": 16.0, "use_rslora": use_rslora}) == expected


def test_num_virtual_tokens():
    assert [get_kind(k).num_virtual_tokens(valid_parts(k)[0]) for k in ("prefix", "prompt", "subspace")] == [4] * 3
    assert get_kind("lora").num_virtual_tokens(valid_parts("lora")[0]) == 0
    assert get_kind("intrinsic").num_virtual_tokens(valid_parts("intrinsic")[0]) is None  # the subspace decides


def test_lora_features_follow_gqa_shapes():
    assert lora_features(TINY_ARCH) == {"q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32),
                                        "o_proj": (64, 64), "gate_proj": (64, 128), "up_proj": (64, 128),
                                        "down_proj": (128, 64)}


def test_lora_may_adapt_a_subset_of_layers_and_targets():
    config, tensors = valid_parts("lora")
    subset = {n: t for n, t in tensors.items() if (n.startswith("layers.1.") and ".q_proj." in n) or ".v_proj." in n}
    get_kind("lora").validate({**config, "targets": ["q_proj", "v_proj"]}, subset, TINY_ARCH, None)
