"""PEFT adapters made by peft itself, for parity tests: one factory per served configuration; and
references for the kinds peft has no type for (BitFit: `BiasHooks`, bottleneck adapters:
`BottleneckHooks`), called as a PeftModel is."""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import pytest
import torch
from peft import (
    IA3Config,
    LoraConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    PromptTuningInit,
    TaskType,
    get_peft_model,
)

from prefixserve.training.adapter_guard import library_versions

CAUSAL = TaskType.CAUSAL_LM
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def peft_configs(tokenizer_dir: Path) -> dict[str, object]:
    return {
        "prefix": PrefixTuningConfig(task_type=CAUSAL, num_virtual_tokens=5),
        "prefix-projection": PrefixTuningConfig(task_type=CAUSAL, num_virtual_tokens=7, prefix_projection=True,
                                                encoder_hidden_size=48),
        "prompt-random": PromptTuningConfig(task_type=CAUSAL, num_virtual_tokens=6,
                                            prompt_tuning_init=PromptTuningInit.RANDOM),
        "prompt-text": PromptTuningConfig(task_type=CAUSAL, num_virtual_tokens=8,
                                          prompt_tuning_init=PromptTuningInit.TEXT,
                                          prompt_tuning_init_text="Classify the review as positive or negative:",
                                          tokenizer_name_or_path=str(tokenizer_dir)),
        "ptuning-mlp": PromptEncoderConfig(task_type=CAUSAL, num_virtual_tokens=4, encoder_hidden_size=48,
                                           encoder_reparameterization_type="MLP"),
        "ptuning-lstm": PromptEncoderConfig(task_type=CAUSAL, num_virtual_tokens=3, encoder_hidden_size=48,
                                            encoder_reparameterization_type="LSTM"),
        "lora-attention": LoraConfig(task_type=CAUSAL, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                     init_lora_weights=False),
        "lora-all-linear": LoraConfig(task_type=CAUSAL, r=8, lora_alpha=16, target_modules=ALL_LINEAR,
                                      use_rslora=True, init_lora_weights=False),
        # beside ranks 4 and 8: ranks 1..64 share the LoRA pool unpadded, in separate rank buckets
        "lora-rank64": LoraConfig(task_type=CAUSAL, r=64, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                          "o_proj"],
                                  init_lora_weights=False),
        # peft's default for Llama (k, v outputs; down_proj's input), and inputs of fused parts (q of
        # q/k/v, up of gate/up) beside outputs of the others
        "ia3-default": IA3Config(task_type=CAUSAL, target_modules=["k_proj", "v_proj", "down_proj"],
                                 feedforward_modules=["down_proj"]),
        "ia3-fused-inputs": IA3Config(task_type=CAUSAL, target_modules=["q_proj", "o_proj", "gate_proj", "up_proj"],
                                      feedforward_modules=["q_proj", "up_proj"]),
    }


def make_peft_adapter(base, config, out_dir: Path, seed: int) -> PeftModel:
    """Create the adapter on a copy of `base` with random non-zero weights, save it with peft, and
    load it back the way a user would: the saved folder is what we import and the loaded model is the
    reference."""
    torch.manual_seed(seed)
    # LoRA and IA3 inject layers into the model they wrap; prompt learning leaves the base untouched, so
    # those adapters share it (a SmolLM2 copy per adapter would cost 0.5 GB each).
    own_base = (lambda: copy.deepcopy(base)) if isinstance(config, (LoraConfig, IA3Config)) else (lambda: base)
    model = get_peft_model(own_base(), copy.deepcopy(config))
    with torch.no_grad():  # P-tuning / projection encoders start near zero: make them matter
        for name, p in model.named_parameters():
            if p.requires_grad and "lora_" not in name:
                p.add_(torch.randn_like(p) * 0.5)
    model.save_pretrained(out_dir)
    return PeftModel.from_pretrained(own_base(), out_dir).eval()


class OutputHooks:
    """A reference for a kind peft has no type for: the transformers model with forward hooks that
    change chosen modules' outputs (`_hooks`). The hooks are on only while this reference is called, so
    the base it shares with other references (and plain-backbone ones) is the bare model between calls.
    Called and disabled (`disable_adapter`) as a PeftModel is, so the helpers below take either."""

    adapter_type: str

    def __init__(self, base):
        self.base, self.enabled = base, True

    def _hooks(self) -> list[tuple[str, object]]:
        """(module path, hook(module, args, output) -> new output)."""
        raise NotImplementedError

    def __call__(self, **inputs):
        handles = []
        try:
            for path, hook in self._hooks() if self.enabled else []:
                handles.append(self.base.get_submodule(path).register_forward_hook(hook))
            return self.base(**inputs)
        finally:
            for handle in handles:
                handle.remove()

    @contextlib.contextmanager
    def disable_adapter(self):
        self.enabled = False
        try:
            yield
        finally:
            self.enabled = True


class BiasHooks(OutputHooks):
    """BitFit's reference: each bias added to its projection's output."""

    adapter_type = "BITFIT"

    def __init__(self, base, biases: dict[tuple[int, str], torch.Tensor]):
        super().__init__(base)
        self.biases = biases  # (layer, target) -> [out_features]

    def _hooks(self):
        return [(f"model.layers.{layer}.{'self_attn' if target in ATTENTION else 'mlp'}.{target}",
                 lambda module, args, output, bias=bias: output + bias)
                for (layer, target), bias in self.biases.items()]


class BottleneckHooks(OutputHooks):
    """Bottleneck adapters' reference, written from the papers' definition (Houlsby et al. 2019): the
    attention block's output (its o_proj's) and the MLP's (its down_proj's) y become
    y + up(act(down(y) + down_bias)) + up_bias, in fp32."""

    adapter_type = "ADAPTER"

    def __init__(self, base, weights: dict[tuple[int, str], tuple[torch.Tensor, ...]], activation: str):
        super().__init__(base)
        self.weights = weights  # (layer, placement) -> (down [r, hidden], down_bias [r], up [hidden, r], up_bias)
        self.activation = {"gelu": torch.nn.functional.gelu, "relu": torch.relu, "silu": torch.nn.functional.silu,
                           "tanh": torch.tanh}[activation]

    def _hooks(self):
        def adds(down, down_bias, up, up_bias):
            def hook(module, args, output):
                y = output.float()
                h = self.activation(y @ down.float().T + down_bias.float())
                return (y + h @ up.float().T + up_bias.float()).to(output.dtype)
            return hook

        return [(f"model.layers.{layer}.{'self_attn.o_proj' if placement == 'attention' else 'mlp.down_proj'}",
                 adds(*tensors)) for (layer, placement), tensors in self.weights.items()]


def bitfit_case(base, fingerprint: dict, scale: float, seed: int = 91) -> tuple[bytes, BiasHooks]:
    """A random BitFit task: (artifact bytes, its reference). Every projection has a bias in even layers,
    only q_proj (a part of the fused q/k/v) and down_proj in odd ones, so the other rows read the pool's
    identity; biases ~ N(0, scale)."""
    from prefixserve.adapters_store.format import encode_artifact

    g, biases = torch.Generator().manual_seed(seed), {}
    for layer, block in enumerate(base.model.layers):
        targets = ALL_LINEAR if layer % 2 == 0 else ["q_proj", "down_proj"]
        for target in targets:
            linear = getattr(block.self_attn if target in ("q_proj", "k_proj", "v_proj", "o_proj") else block.mlp,
                             target)
            biases[(layer, target)] = torch.randn(linear.out_features, generator=g) * scale
    tensors = {f"layers.{layer}.{target}.bias": bias for (layer, target), bias in biases.items()}
    artifact = encode_artifact("bitfit", {"targets": sorted(ALL_LINEAR)}, tensors, fingerprint)
    return artifact, BiasHooks(base, biases)


def bottleneck_case(base, fingerprint: dict, scale: float, size: int = 6, activation: str = "gelu",
                    seed: int = 93) -> tuple[bytes, BottleneckHooks]:
    """A random bottleneck-adapter task: (artifact bytes, its reference). Houlsby placements (after
    attention and after the MLP) in even layers, Pfeiffer's (after the MLP only) in odd ones; every
    tensor ~ N(0, scale), biases included, so none of them can be dropped unseen."""
    from prefixserve.adapters_store.format import encode_artifact

    g, weights = torch.Generator().manual_seed(seed), {}
    hidden = base.config.hidden_size
    for layer in range(base.config.num_hidden_layers):
        for placement in ("attention", "mlp") if layer % 2 == 0 else ("mlp",):
            weights[(layer, placement)] = tuple(torch.randn(shape, generator=g) * scale for shape in
                                                ((size, hidden), (size,), (hidden, size), (hidden,)))
    tensors = {f"layers.{layer}.{placement}.{part}": tensor for (layer, placement), parts in weights.items()
               for part, tensor in zip(("down", "down_bias", "up", "up_bias"), parts)}
    artifact = encode_artifact("adapter", {"size": size, "placements": ["attention", "mlp"],
                                           "activation": activation}, tensors, fingerprint)
    return artifact, BottleneckHooks(base, weights, activation)


@torch.inference_mode()
def peft_greedy(model: PeftModel | OutputHooks, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """PEFT's greedy tokens: PeftModel's own forward over the whole sequence at every step. Not
    `PeftModel.generate`, whose cache handling is where upgrades break (transformers 5.24 with peft 0.21
    dropped prefixes and soft prompts there); the forward is what defines each kind's output."""
    require_reference_uses_adapter(model, prompt_ids)
    ids = list(prompt_ids)
    for _ in range(max_new_tokens):
        ids.append(int(peft_last_logits(model, ids).argmax()))
    return ids[len(prompt_ids):]


@torch.inference_mode()
def peft_last_logits(model: PeftModel | OutputHooks, token_ids: list[int]) -> torch.Tensor:
    ids = torch.tensor([token_ids])
    return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1]


@torch.inference_mode()
def require_reference_uses_adapter(model: PeftModel | OutputHooks, token_ids: list[int]) -> None:
    """Fail as "reference broken" (not as a parity mismatch) when the reference's output is the bare
    backbone's: then the installed transformers/peft pair ignores the adapter (or its hooks), and the
    engine's output cannot be judged against it."""
    with_adapter = peft_last_logits(model, token_ids)
    with model.disable_adapter():
        without = peft_last_logits(model, token_ids)
    if torch.equal(with_adapter, without):
        kind = model.adapter_type if isinstance(model, OutputHooks) else \
            model.peft_config[model.active_adapter].peft_type.value
        # the reference's class, but PeftModel rather than peft's subclass name
        reference = type(model).__name__ if isinstance(model, OutputHooks) else "PeftModel"
        pytest.fail(f"reference broken: {reference} ignores its {kind} adapter with "
                    f"{library_versions()}; the parity tests need a reference that applies it (see "
                    f"requirements.lock)", pytrace=False)


def ipt_artifacts(hidden: int, fingerprint: dict, d: int = 6, decoder_hidden: int = 32, num_tokens: int = 5,
                  seed: int = 77):
    """A random IPT subspace and an intrinsic task decoded through it: (subspace artifact bytes, intrinsic
    artifact bytes, decoder tensors, z, subspace config)."""
    from prefixserve.adapters_store.format import artifact_version, encode_artifact

    g = torch.Generator().manual_seed(seed)
    decoder = {"decoder.0.weight": torch.randn(decoder_hidden, d, generator=g) * 0.5,
               "decoder.0.bias": torch.randn(decoder_hidden, generator=g) * 0.1,
               "decoder.2.weight": torch.randn(num_tokens * hidden, decoder_hidden, generator=g) * 0.5,
               "decoder.2.bias": torch.randn(num_tokens * hidden, generator=g) * 0.1}
    config = {"intrinsic_dim": d, "num_virtual_tokens": num_tokens, "decoder_hidden": decoder_hidden}
    subspace = encode_artifact("subspace", config, decoder, fingerprint)
    z = torch.randn(d, generator=g) * 0.02 * 50  # IPT inits z ~ N(0, 0.02); trained vectors are larger
    intrinsic = encode_artifact("intrinsic", {"subspace_version": artifact_version(subspace)}, {"z": z}, fingerprint)
    return subspace, intrinsic, decoder, z, config


def intrinsic_case(base, fingerprint: dict, d: int = 6, decoder_hidden: int = 32, num_tokens: int = 5, seed: int = 77):
    """An IPT task: (subspace artifact bytes, intrinsic artifact bytes, the peft reference), where the
    reference is PROMPT_TUNING holding decoder(z) as its soft prompt."""
    from prefixserve.adapters_store.kinds import get_kind

    subspace, intrinsic, decoder, z, config = ipt_artifacts(base.config.hidden_size, fingerprint, d, decoder_hidden,
                                                            num_tokens, seed)
    reference = get_peft_model(base, PromptTuningConfig(task_type=CAUSAL, num_virtual_tokens=num_tokens,
                                                        prompt_tuning_init=PromptTuningInit.RANDOM))
    with torch.no_grad():
        reference.prompt_encoder["default"].embedding.weight.copy_(get_kind("subspace").decode(decoder, z, config))
    return subspace, intrinsic, reference.eval()
