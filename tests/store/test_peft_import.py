"""PEFT import, checked against peft itself: the artifact holds exactly what peft feeds the model."""

import pytest
import torch
from peft import (
    IA3Config,
    LoHaConfig,
    LoraConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    PromptTuningInit,
    TaskType,
)
from safetensors.torch import load_file, save_file
from store_cases import TINY_ARCH, edit_adapter_config, hf_fingerprint, save_peft
from transformers import AutoTokenizer, DynamicCache

from prefixserve.adapters_store import decode_artifact, get_kind, import_peft
from prefixserve.config import AdapterLimits
from prefixserve.errors import AdapterError
from prefixserve.models.llama import LlamaArch
from prefixserve.models.tiny import tiny_hf_model

# peft warns about the odd adapters built here on purpose (lora_bias on bias-free layers, ...)
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
LIMITS = AdapterLimits()
CAUSAL_LM = TaskType.CAUSAL_LM
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL_LINEAR = ATTENTION + ["gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def fingerprint(tiny_hf):
    return hf_fingerprint(tiny_hf)


def import_and_decode(source, fingerprint, limits=LIMITS, arch=TINY_ARCH):
    data = import_peft(source, arch=arch, fingerprint=fingerprint, limits=limits)
    return decode_artifact(data, expected_fingerprint=fingerprint, limits=limits, arch=arch)


@pytest.mark.parametrize("projection", [False, True], ids=["plain", "projection"])
def test_prefix_tuning_becomes_the_kv_prefix_peft_uses(projection, tmp_path, fingerprint):
    config = PrefixTuningConfig(task_type=CAUSAL_LM, num_virtual_tokens=5, prefix_projection=projection,
                                encoder_hidden_size=24)
    trained = save_peft(tmp_path, config)
    artifact = import_and_decode(tmp_path, fingerprint)
    assert (artifact.kind, artifact.config, artifact.fingerprint) == ("prefix", {"num_virtual_tokens": 5}, fingerprint)
    keys, values = artifact.tensors["keys"], artifact.tensors["values"]  # [L, P, Hkv, D]
    assert keys.shape == values.shape == (2, 5, 2, 16)
    loaded = PeftModel.from_pretrained(tiny_hf_model(), tmp_path)
    for peft_model in (trained, loaded):  # the projection MLP's output is what was saved and is served
        cache = peft_model.get_prompt(batch_size=1)
        for i in range(TINY_ARCH.num_layers):
            assert torch.equal(cache.layers[i].keys[0].transpose(0, 1), keys[i])  # [Hkv, P, D] -> [P, Hkv, D]
            assert torch.equal(cache.layers[i].values[0].transpose(0, 1), values[i])


@torch.inference_mode()
def test_prefix_sits_in_the_kv_cache_as_is_and_tokens_start_at_position_p(tmp_path, fingerprint):
    save_peft(tmp_path, PrefixTuningConfig(task_type=CAUSAL_LM, num_virtual_tokens=3))
    artifact = import_and_decode(tmp_path, fingerprint)
    ids = torch.tensor([[5, 6, 7, 8]])
    expected = PeftModel.from_pretrained(tiny_hf_model(), tmp_path)(input_ids=ids, attention_mask=torch.ones_like(ids))

    def base_logits(**kwargs):
        cache = DynamicCache()
        for i in range(TINY_ARCH.num_layers):  # no RoPE applied to the prefix: it is stored post-RoPE
            cache.update(artifact.tensors["keys"][i].transpose(0, 1)[None],
                         artifact.tensors["values"][i].transpose(0, 1)[None], i)
        mask = torch.ones(1, 3 + 4)  # the prefix's P=3 slots and the 4 tokens
        return tiny_hf_model()(input_ids=ids, past_key_values=cache, attention_mask=mask, **kwargs).logits

    torch.testing.assert_close(base_logits(), expected.logits, rtol=0, atol=1e-5)  # positions P..P+T-1
    assert not torch.allclose(base_logits(position_ids=torch.arange(4)[None]), expected.logits, atol=1e-3)


SOFT_PROMPTS = {
    "prompt_random": PromptTuningConfig(task_type=CAUSAL_LM, num_virtual_tokens=6,
                                        prompt_tuning_init=PromptTuningInit.RANDOM),
    "ptuning_mlp": PromptEncoderConfig(task_type=CAUSAL_LM, num_virtual_tokens=6, encoder_hidden_size=32,
                                       encoder_reparameterization_type="MLP"),
    "ptuning_lstm": PromptEncoderConfig(task_type=CAUSAL_LM, num_virtual_tokens=6, encoder_hidden_size=32,
                                        encoder_reparameterization_type="LSTM"),
}


@pytest.mark.parametrize("case", sorted(SOFT_PROMPTS))
@torch.inference_mode()
def test_soft_prompt_is_what_peft_feeds_the_model(case, tmp_path, fingerprint):
    trained = save_peft(tmp_path, SOFT_PROMPTS[case])
    artifact = import_and_decode(tmp_path, fingerprint)
    embeddings = artifact.tensors["embeddings"]  # [P, hidden]
    assert (artifact.kind, artifact.config, embeddings.shape) == ("prompt", {"num_virtual_tokens": 6}, (6, 64))
    # P-tuning: the MLP/LSTM encoder's output, as the training-mode model computes it each step
    assert torch.equal(embeddings, trained.get_prompt(batch_size=1)[0])
    loaded = PeftModel.from_pretrained(tiny_hf_model(), tmp_path)
    assert torch.equal(embeddings, loaded.get_prompt(batch_size=1)[0])
    ids = torch.tensor([[9, 10, 11]])
    base = tiny_hf_model()
    inputs_embeds = torch.cat([embeddings[None], base.model.embed_tokens(ids)], dim=1)  # [1, P + T, hidden]
    torch.testing.assert_close(base(inputs_embeds=inputs_embeds).logits,
                               loaded(input_ids=ids, attention_mask=torch.ones_like(ids)).logits, rtol=0, atol=1e-5)


def test_prompt_tuning_text_init_starts_from_the_text_embeddings(tmp_path, smollm2_dir):
    # TEXT init needs a real tokenizer: a tiny model with SmolLM2's vocabulary size and its tokenizer
    text = "Say whether the review is positive"
    config = PromptTuningConfig(task_type=CAUSAL_LM, num_virtual_tokens=10, prompt_tuning_init=PromptTuningInit.TEXT,
                                prompt_tuning_init_text=text, tokenizer_name_or_path=str(smollm2_dir))
    save_peft(tmp_path, config, vocab_size=49152)
    base = tiny_hf_model(vocab_size=49152)
    arch, fingerprint = LlamaArch.from_hf_config(base.config), hf_fingerprint(base)
    artifact = import_and_decode(tmp_path, fingerprint, arch=arch)
    token_ids = AutoTokenizer.from_pretrained(smollm2_dir)(text)["input_ids"]
    token_ids = (token_ids * 10)[:10]  # peft repeats the text to fill the virtual tokens
    assert torch.equal(artifact.tensors["embeddings"], base.model.embed_tokens.weight[token_ids].detach())
    assert torch.equal(artifact.tensors["embeddings"],
                       PeftModel.from_pretrained(base, tmp_path).get_prompt(batch_size=1)[0])


def _projection(model, layer: int, target: str) -> torch.nn.Module:
    block = model.model.layers[layer]
    return getattr(block.self_attn if target in ATTENTION else block.mlp, target)


@pytest.mark.parametrize("targets, use_rslora", [(ATTENTION, False), ("all-linear", True)], ids=["attn", "all_rslora"])
@torch.inference_mode()
def test_lora_delta_equals_peft_merge(targets, use_rslora, tmp_path, fingerprint):
    config = LoraConfig(task_type=CAUSAL_LM, r=4, lora_alpha=12, target_modules=targets, use_rslora=use_rslora,
                        init_lora_weights=False)
    trained = save_peft(tmp_path, config)
    artifact = import_and_decode(tmp_path, fingerprint)
    expected_targets = sorted(ALL_LINEAR if targets == "all-linear" else ATTENTION)
    assert artifact.config == {"rank": 4, "alpha": 12.0, "use_rslora": use_rslora, "targets": expected_targets}
    scaling = get_kind("lora").scaling(artifact.config)
    assert scaling == _projection(trained.base_model.model, 0, "q_proj").scaling["default"]
    base, merged = tiny_hf_model(), PeftModel.from_pretrained(tiny_hf_model(), tmp_path).merge_and_unload()
    for layer in range(TINY_ARCH.num_layers):
        for target in ALL_LINEAR:
            delta = _projection(merged, layer, target).weight - _projection(base, layer, target).weight
            if target not in expected_targets:
                assert not delta.any()
                continue
            lora_a = artifact.tensors[f"layers.{layer}.{target}.lora_a"]  # [r, in]
            lora_b = artifact.tensors[f"layers.{layer}.{target}.lora_b"]  # [out, r]
            torch.testing.assert_close(delta, scaling * lora_b @ lora_a, rtol=1e-4, atol=1e-5)


def test_lora_on_some_layers_only(tmp_path, fingerprint):
    save_peft(tmp_path, LoraConfig(task_type=CAUSAL_LM, r=2, target_modules=["v_proj", "down_proj"],
                                   layers_to_transform=[1], init_lora_weights=False))
    artifact = import_and_decode(tmp_path, fingerprint)
    assert sorted(artifact.tensors) == ["layers.1.down_proj.lora_a", "layers.1.down_proj.lora_b",
                                        "layers.1.v_proj.lora_a", "layers.1.v_proj.lora_b"]
    assert artifact.config["targets"] == ["down_proj", "v_proj"]


@pytest.mark.parametrize("targets, feedforward", [(["k_proj", "v_proj", "down_proj"], ["down_proj"]),
                                                  (r".*\.(q_proj|up_proj|o_proj)", r".*\.(q_proj|up_proj)")],
                         ids=["default", "regex_inputs"])
@torch.inference_mode()
def test_ia3_vectors_are_what_peft_multiplies(targets, feedforward, tmp_path, fingerprint):
    config = IA3Config(task_type=CAUSAL_LM, target_modules=targets, feedforward_modules=feedforward)
    trained = save_peft(tmp_path, config)
    # trained vectors, not peft's ones: a transposed or misplaced vector must show
    saved = {k: torch.rand_like(v) + 0.5 for k, v in load_file(tmp_path / "adapter_model.safetensors").items()}
    save_file(saved, tmp_path / "adapter_model.safetensors")
    artifact = import_and_decode(tmp_path, fingerprint)
    inputs = ["down_proj"] if isinstance(feedforward, list) else ["q_proj", "up_proj"]
    assert artifact.config == {"targets": sorted(targets if isinstance(targets, list) else ["q_proj", "up_proj",
                                                                                              "o_proj"]),
                               "feedforward": inputs}
    for layer in range(TINY_ARCH.num_layers):
        for target in artifact.config["targets"]:
            module = _projection(trained.base_model.model, layer, target)
            assert module.is_feedforward == (target in inputs)
            part = "self_attn" if target in ATTENTION else "mlp"
            expected = saved[f"base_model.model.model.layers.{layer}.{part}.{target}.ia3_l"].flatten()
            features = module.in_features if module.is_feedforward else module.out_features
            assert artifact.tensors[f"layers.{layer}.{target}.ia3"].shape == (features,)
            torch.testing.assert_close(artifact.tensors[f"layers.{layer}.{target}.ia3"], expected, rtol=0, atol=0)


def _ia3(**options):
    return IA3Config(task_type=CAUSAL_LM, target_modules=["k_proj", "v_proj", "down_proj"],
                     feedforward_modules=["down_proj"], **options)


def _lora(**options):
    return LoraConfig(task_type=CAUSAL_LM, r=4, target_modules=ATTENTION, init_lora_weights=False, **options)


def _saved(config, **model_overrides):
    def make(path):
        save_peft(path, config, **model_overrides)
        return path
    return make


def _edited(config, **changes):
    """Saved by peft, then adapter_config.json edited: options peft itself would not write."""
    return lambda path: edit_adapter_config(_saved(config)(path), **changes)


def _with_nan(path):
    save_peft(path, _lora())
    weights = load_file(path / "adapter_model.safetensors")
    weights["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"][0, 0] = float("nan")
    save_file(weights, path / "adapter_model.safetensors")
    return path


PREFIX = PrefixTuningConfig(task_type=CAUSAL_LM, num_virtual_tokens=2)
REFUSED = {
    # id: (make(tmp_path) -> adapter dir, limits, message regex)
    "dora": (_saved(_lora(use_dora=True)), LIMITS, r"use_dora unset, found True: DoRA"),
    "dora_weights": (_edited(_lora(use_dora=True), use_dora=False), LIMITS,
                     r"found 8 others, e.g. 'base_model.model.model.layers.0.self_attn.k_proj.lora_magnitude_vector'"),
    "bias": (_saved(_lora(bias="lora_only")), LIMITS, r"bias 'none', found 'lora_only'"),
    "lora_bias": (_saved(_lora(lora_bias=True)), LIMITS, r"lora_bias unset, found True"),
    "modules_to_save": (_saved(_lora(modules_to_save=["embed_tokens"])), LIMITS,
                        r"no modules_to_save .*found \['embed_tokens'\]"),
    "rank_pattern": (_saved(_lora(rank_pattern={"q_proj": 8})), LIMITS, r"rank_pattern unset, found \{'q_proj': 8\}"),
    "alpha_pattern": (_saved(_lora(alpha_pattern={"v_proj": 32})), LIMITS, r"alpha_pattern unset"),
    "embed_tokens_target": (_saved(LoraConfig(task_type=CAUSAL_LM, target_modules=["q_proj", "embed_tokens"],
                                              init_lora_weights=False)), LIMITS,
                            r"target_modules among \['q_proj'.*found \['embed_tokens'\]"),
    "lm_head_target": (_saved(LoraConfig(task_type=CAUSAL_LM, target_modules=["lm_head"], init_lora_weights=False)),
                       LIMITS, r"found \['lm_head'\]"),
    "embed_tokens_by_regex": (_saved(LoraConfig(task_type=CAUSAL_LM, target_modules=r".*embed_tokens",
                                                init_lora_weights=False)), LIMITS,
                              r"found 3 others, e.g. .*'base_model.model.model.embed_tokens.lora_embedding_A'"),
    "fan_in_fan_out": (_edited(_lora(), fan_in_fan_out=True), LIMITS, r"fan_in_fan_out unset, found True"),
    "pissa": (_edited(_lora(), init_lora_weights="pissa_niter_4"), LIMITS,
              r"found 'pissa_niter_4': re-save with save_pretrained\(path_initial_model_for_weight_conversion"),
    "seq_cls": (_edited(_lora(), task_type="SEQ_CLS"), LIMITS, r"task_type CAUSAL_LM .*found 'SEQ_CLS'"),
    "loha": (_saved(LoHaConfig(task_type=CAUSAL_LM, target_modules=["q_proj"])), LIMITS,
             r"type \['IA3', 'LORA', 'PREFIX_TUNING', 'PROMPT_TUNING', 'P_TUNING'\], found 'LOHA'"),
    "ia3_fan_in_fan_out": (_edited(_ia3(), fan_in_fan_out=True), LIMITS, r"fan_in_fan_out unset, found True"),
    "ia3_feedforward_disagrees": (_edited(_ia3(), feedforward_modules=["down_proj", "k_proj"]), LIMITS,
                                  r"feedforward_modules \['down_proj', 'k_proj'\] to be shaped \[1, in_features\] "
                                  r"and only theirs, found that shape on \['down_proj'\]"),
    "ia3_lm_head": (_saved(IA3Config(task_type=CAUSAL_LM, target_modules=["v_proj", "lm_head"],
                                     feedforward_modules=[])), LIMITS,
                    r"only IA3 vectors .* in decoder layers, found 2 others, e.g. 'base_model.model.lm_head"),
    "ia3_other_hidden": (_saved(_ia3(), hidden_size=128), LIMITS,
                         r"layers\.\d\.[kv]_proj\.ia3 of shape \[32\], found \[64\]"),
    "ia3_modules_to_save": (_saved(_ia3(modules_to_save=["lm_head"])), LIMITS, r"no modules_to_save"),
    "nan": (_with_nan, LIMITS, r"finite values in tensor 'layers.0.k_proj.lora_a', found 1 NaN/Inf"),
    # finite in float64 (where JSON and Python hold it), but alpha / r overflows the engine's float32
    "lora_alpha_overflows": (_edited(_lora(), lora_alpha=1e308), LIMITS,
                             r"scaling \(alpha 1e\+308 / rank 4\) to be finite in float32 .*found 2\.5e\+307, "
                             r"which overflows"),
    "rank_over_limit": (_saved(_lora()), AdapterLimits(max_lora_rank=2), r"rank 1..2, found 4"),
    "too_many_virtual_tokens": (_saved(SOFT_PROMPTS["ptuning_mlp"]), AdapterLimits(max_virtual_tokens=5),
                                r"num_virtual_tokens 1..5, found 6"),
    "prefix_other_depth": (_saved(PREFIX, num_hidden_layers=3), LIMITS, r"backbone of 2 layers, found num_layers 3"),
    "prefix_other_kv_heads": (_saved(PREFIX, num_key_value_heads=4), LIMITS,
                              r"token_dim 32 for this backbone, found 64"),
    "prompt_other_hidden": (_saved(SOFT_PROMPTS["prompt_random"], hidden_size=128), LIMITS,
                            r"token_dim 64 for this backbone, found 128"),
    "lora_other_hidden": (_saved(_lora(), hidden_size=128), LIMITS, r"lora_a of shape \[4, 64\], found \[4, 128\]"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_unservable_adapter_is_refused(case, tmp_path, fingerprint):
    make, limits, message = REFUSED[case]
    adapter_dir = make(tmp_path)
    with pytest.raises(AdapterError, match=message):
        import_peft(adapter_dir, arch=TINY_ARCH, fingerprint=fingerprint, limits=limits)
