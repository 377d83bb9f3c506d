"""Kind behaviour the engine relies on: IPT decoding, LoRA scaling, virtual-token counts."""

import math

import pytest
import torch
from store_cases import TINY_ARCH, valid_parts

from prefixserve.adapters_store import KINDS, get_kind
from prefixserve.adapters_store.kinds import AdapterKind, lora_features
from prefixserve.errors import AdapterError


def test_every_kind_is_a_registered_class():
    assert set(KINDS) == {"prefix", "prompt", "subspace", "intrinsic", "lora", "ia3", "bitfit", "adapter"}
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


def test_ia3_vectors_say_where_they_multiply():
    config, tensors = valid_parts("ia3")
    vectors = get_kind("ia3").vectors(config, tensors)
    assert {(target, mode) for _, target, mode in vectors} == {("k_proj", "scale_out"), ("v_proj", "scale_out"),
                                                               ("down_proj", "scale_in")}
    assert vectors[(1, "down_proj", "scale_in")].shape == (TINY_ARCH.intermediate_size,)  # down_proj's input


IA3_REFUSED = {
    # id: (config changes, tensors edit, message regex)
    "feedforward_not_a_target": ({"feedforward": ["down_proj", "q_proj"]}, None,
                                 r"feedforward to be among targets .*found \['down_proj', 'q_proj'\]"),
    "unsorted_targets": ({"targets": ["v_proj", "k_proj", "down_proj"]}, None, r"targets as a sorted list"),
    "unknown_target": ({"targets": ["down_proj", "k_proj", "lm_head"]}, None,
                       r"found \['down_proj', 'k_proj', 'lm_head'\]"),
    "targets_disagree": ({"targets": ["down_proj", "k_proj"]}, None,
                         r"config targets to list the scaled projections \['down_proj', 'k_proj', 'v_proj'\]"),
    # an output-sized vector on a feedforward target (down_proj scales its 128 inputs, not its 64 outputs)
    "wrong_side": ({}, lambda t: {**t, "layers.0.down_proj.ia3": torch.ones(64)},
                   r"layers.0.down_proj.ia3 of shape \[128\], found \[64\]"),
    "layer_out_of_range": ({}, lambda t: {**t, "layers.7.k_proj.ia3": torch.ones(32)}, r"layer indices 0..1"),
    "leading_zero": ({}, lambda t: {**t, "layers.01.k_proj.ia3": torch.ones(32)},
                     r"unexpected \['layers.01.k_proj.ia3'\]"),
    "stray_tensor": ({}, lambda t: {**t, "layers.0.k_proj.lora_a": torch.ones(2, 64)},
                     r"unexpected \['layers.0.k_proj.lora_a'\]"),
}


@pytest.mark.parametrize("case", sorted(IA3_REFUSED))
def test_ia3_refuses_what_it_cannot_serve(case):
    changes, edit, message = IA3_REFUSED[case]
    config, tensors = valid_parts("ia3")
    with pytest.raises(AdapterError, match=message):
        get_kind("ia3").validate({**config, **changes}, edit(tensors) if edit else tensors, TINY_ARCH, None)


def test_bitfit_biases_shift_outputs_of_the_layers_that_have_them():
    config, tensors = valid_parts("bitfit")
    vectors = get_kind("bitfit").vectors(tensors)
    assert {mode for _, _, mode in vectors} == {"shift_out"}
    assert {target for layer, target, _ in vectors if layer == 1} == {"q_proj", "down_proj"}
    assert vectors[(0, "gate_proj", "shift_out")].shape == (TINY_ARCH.intermediate_size,)  # gate_proj's output
    assert vectors[(1, "down_proj", "shift_out")] is tensors["layers.1.down_proj.bias"]
    assert get_kind("bitfit").num_virtual_tokens(config) == 0


def test_bitfit_may_shift_one_projection_of_one_layer():
    get_kind("bitfit").validate({"targets": ["v_proj"]}, {"layers.1.v_proj.bias": torch.zeros(32)}, TINY_ARCH, None)


BITFIT_REFUSED = {
    # id: (config changes, tensors edit, message regex)
    "unsorted_targets": ({"targets": ["v_proj", "k_proj"]}, None, r"bitfit: expected targets as a sorted list of "
                                                                  r"distinct names from \['q_proj', .*found "
                                                                  r"\['v_proj', 'k_proj'\]"),
    "repeated_target": ({"targets": ["down_proj", "down_proj"]}, None, r"targets as a sorted list of distinct"),
    "unknown_target": ({"targets": ["lm_head"]}, None, r"targets as a sorted list .*found \['lm_head'\]"),
    "target_not_a_string": ({"targets": [1]}, None, r"targets as a sorted list .*found \[1\]"),
    "targets_not_a_list": ({"targets": "q_proj"}, None, r"config 'targets' of type list, found 'q_proj'"),
    "extra_config": ({"feedforward": []}, None, r"bitfit: expected config keys \['targets'\], found \['feedforward', "
                                                r"'targets'\]"),
    "targets_disagree": ({"targets": ["down_proj", "q_proj"]}, None,
                         r"config targets to list the shifted projections \['down_proj', 'gate_proj', 'k_proj', "
                         r"'o_proj', 'q_proj', 'up_proj', 'v_proj'\], found \['down_proj', 'q_proj'\]"),
    # an input-sized bias (down_proj's 128 inputs, not its 64 outputs): biases are added to outputs
    "input_sized": ({}, lambda t: {**t, "layers.0.down_proj.bias": torch.zeros(128)},
                    r"layers.0.down_proj.bias of shape \[64\], found \[128\]"),
    "a_matrix": ({}, lambda t: {**t, "layers.0.k_proj.bias": torch.zeros(32, 1)},
                 r"layers.0.k_proj.bias of shape \[32\], found \[32, 1\]"),
    "layer_out_of_range": ({}, lambda t: {**t, "layers.2.q_proj.bias": torch.zeros(64)},
                           r"layer indices 0..1, found 'layers.2.q_proj.bias'"),
    "layer_with_a_leading_zero": ({}, lambda t: {**t, "layers.01.q_proj.bias": torch.zeros(64)},
                                  r"unexpected \['layers.01.q_proj.bias'\]"),
    "stray_tensor": ({}, lambda t: {**t, "layers.0.k_proj.ia3": torch.ones(32)},
                     r"unexpected \['layers.0.k_proj.ia3'\]"),
    "lm_head_bias": ({}, lambda t: {**t, "lm_head.bias": torch.zeros(49152)}, r"unexpected \['lm_head.bias'\]"),
    "no_biases": ({}, lambda t: {}, r"bitfit: expected tensors named layers.<i>.<target>.bias, found \[\]"),
}


@pytest.mark.parametrize("case", sorted(BITFIT_REFUSED))
def test_bitfit_refuses_what_it_cannot_serve(case):
    changes, edit, message = BITFIT_REFUSED[case]
    config, tensors = valid_parts("bitfit")
    with pytest.raises(AdapterError, match=message):
        get_kind("bitfit").validate({**config, **changes}, edit(tensors) if edit else tensors, TINY_ARCH, None)


def test_bitfit_without_an_arch_checks_only_what_the_artifact_says():
    config, tensors = valid_parts("bitfit")
    wide = {**tensors, "layers.9.q_proj.bias": torch.zeros(7)}  # any layer, any size, still a vector
    get_kind("bitfit").validate(config, wide, None, None)
    with pytest.raises(AdapterError, match=r"layers.0.q_proj.bias of shape \[\*\], found \[2, 32\]"):
        get_kind("bitfit").validate(config, {**tensors, "layers.0.q_proj.bias": torch.zeros(2, 32)}, None, None)


def test_lora_refuses_a_layer_named_twice():
    config, tensors = valid_parts("lora")
    twice = {**tensors, "layers.01.q_proj.lora_a": tensors["layers.1.q_proj.lora_a"],
             "layers.01.q_proj.lora_b": tensors["layers.1.q_proj.lora_b"]}
    with pytest.raises(AdapterError, match=r"unexpected \['layers.01.q_proj.lora_a', 'layers.01.q_proj.lora_b'\]"):
        get_kind("lora").validate(config, twice, TINY_ARCH, None)


def test_bottleneck_weights_are_read_per_layer_and_placement():
    config, tensors = valid_parts("adapter")
    weights = get_kind("adapter").weights(tensors)
    assert set(weights) == {(0, "attention"), (0, "mlp"), (1, "mlp")}
    down, down_bias, up, up_bias = weights[(1, "mlp")]
    assert down is tensors["layers.1.mlp.down"] and up_bias is tensors["layers.1.mlp.up_bias"]
    assert (down.shape, down_bias.shape, up.shape) == ((3, 64), (3,), (64, 3))
    assert get_kind("adapter").num_virtual_tokens(config) == 0


BOTTLENECK_REFUSALS = {
    "size_zero": ({"size": 0}, None, r"adapter: expected size >= 1, found 0"),
    "unknown_activation": ({"activation": "swish"}, None,
                           r"adapter: expected activation among \['gelu', 'relu', 'silu', 'tanh'\], found 'swish'"),
    "unknown_placement": ({"placements": ["attention", "output"]}, None,
                          r"adapter: expected placements as a sorted list of distinct names from \['attention', "
                          r"'mlp'\], found \['attention', 'output'\]"),
    "placements_not_found": ({"placements": ["mlp"]}, None,
                             r"adapter: expected config placements to list the placements \['attention', 'mlp'\], "
                             r"found \['mlp'\]"),
    "wrong_size": ({"size": 4}, None, r"layers.0.attention.down of shape \[4, 64\], found \[3, 64\]"),
    "up_transposed": ({}, lambda t: {**t, "layers.1.mlp.up": t["layers.1.mlp.up"].T.contiguous()},
                      r"layers.1.mlp.up of shape \[64, 3\], found \[3, 64\]"),
    "missing_bias": ({}, lambda t: {k: v for k, v in t.items() if k != "layers.1.mlp.down_bias"},
                     r"missing \['layers.1.mlp.down_bias'\]"),
    "layer_out_of_range": ({}, lambda t: {**t, "layers.2.mlp.down": torch.ones(3, 64)}, r"layer indices 0..1"),
    "leading_zero": ({}, lambda t: {**t, "layers.01.mlp.down": torch.ones(3, 64)},
                     r"unexpected \['layers.01.mlp.down'\]"),
    "size_not_int": ({"size": 3.0}, None, r"config 'size' of type int, found 3.0"),
}


@pytest.mark.parametrize("case", BOTTLENECK_REFUSALS.values(), ids=BOTTLENECK_REFUSALS.keys())
def test_bottleneck_refuses_what_it_cannot_serve(case):
    changes, edit, message = case
    config, tensors = valid_parts("adapter")
    with pytest.raises(AdapterError, match=message):
        get_kind("adapter").validate({**config, **changes}, edit(tensors) if edit else tensors, TINY_ARCH, None)
