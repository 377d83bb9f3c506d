"""PEFT trainers and the BitFit and bottleneck adapter ones on a tiny Llama with SmolLM2's real tokenizer: every
kind learns a toy task, exports an artifact the server accepts, predicts what the engine serves, leaves the shared
model untouched, resumes bit-exactly from its checkpoint and fails loudly on divergence or bad data."""

import copy
import dataclasses
import math

import pytest
import torch
from safetensors.torch import load_file

from prefixserve.adapters_store.fingerprint import backbone_fingerprint
from prefixserve.adapters_store.format import decode_artifact
from prefixserve.adapters_store.local_store import LocalStore
from prefixserve.adapters_store.store import check_card
from prefixserve.config import AdapterLimits, CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from prefixserve.engine.llm_engine import LLMEngine
from prefixserve.engine.request import SamplingParams
from prefixserve.errors import TrainingDataError, TrainingFailedError
from prefixserve.models.loader import load_backbone
from prefixserve.training.bitfit import added_biases, artifact_biases, train_bitfit, zero_biases
from prefixserve.training.bottleneck import (
    added_bottlenecks,
    artifact_bottlenecks,
    initial_bottlenecks,
    train_bottleneck,
)
from prefixserve.training.data import encode_examples, format_prompt
from prefixserve.training.evaluate import predict, predict_ids
from prefixserve.training.runner import run_job
from prefixserve.training.spec import Hyperparameters, JobSpec, parse_job_spec
from prefixserve.training.trainers import CHECKPOINT_NAME, learning_rate_at, train_peft

KINDS = ("prompt", "prefix", "ptuning", "lora", "ia3", "bitfit", "adapter")
OWN_TRAINERS = {"bitfit": train_bitfit, "adapter": train_bottleneck}  # kinds peft has no type for
TOY = [{"input": f"word {w}", "output": o} for w, o in [("apple", "yes"), ("sky", "no"), ("grass", "yes"),
                                                         ("snow", "no")]]
UNSEEN = [{"input": w, "output": "?"} for w in ("word moon", "hello there", "1 2 3", "a longer sentence here")]
CHAT = [{"messages": [{"role": "user", "content": "word sky"}, {"role": "assistant", "content": "no"}]}]
HP = {"prompt": Hyperparameters(steps=30, batch_size=4, learning_rate=0.1, num_virtual_tokens=4, eval_max_new_tokens=6),
      "prefix": Hyperparameters(steps=30, batch_size=4, learning_rate=0.1, num_virtual_tokens=4, encoder_hidden=32,
                                eval_max_new_tokens=6),
      "ptuning": Hyperparameters(steps=30, batch_size=4, learning_rate=0.1, num_virtual_tokens=4, encoder_hidden=32,
                                 eval_max_new_tokens=6),
      "lora": Hyperparameters(steps=30, batch_size=4, learning_rate=0.01, rank=4, alpha=8.0, eval_max_new_tokens=6),
      # not peft's defaults, unsorted, and a feedforward target in attention and in the MLP
      "ia3": Hyperparameters(steps=30, batch_size=4, learning_rate=0.1, ia3_targets=("v_proj", "q_proj", "up_proj",
                             "down_proj"), ia3_feedforward=("up_proj", "q_proj"), eval_max_new_tokens=6),
      # unsorted; parts of both fused projections (v of q/k/v, gate of gate/up) and an unfused one
      "bitfit": Hyperparameters(steps=30, batch_size=4, learning_rate=0.05, bitfit_targets=("v_proj", "gate_proj",
                                "o_proj"), eval_max_new_tokens=6),
      # Houlsby's placements, a size and activation not the defaults
      "adapter": Hyperparameters(steps=30, batch_size=4, learning_rate=0.01, bottleneck_size=4,
                                 bottleneck_activation="gelu", eval_max_new_tokens=6)}


def train(backbone, kind, *args, **kwargs):
    """train_peft's signature for every kind of this file: bitfit and adapter have their own trainers."""
    if kind in OWN_TRAINERS:
        kwargs.pop("init_text", None)  # they start at (or, adapter's down, near) zero, not from text
        return OWN_TRAINERS[kind](backbone, *args, **kwargs)
    return train_peft(backbone, kind, *args, **kwargs)


def no_hooks(model) -> bool:
    return not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def record(events):
    return lambda event: events.append(event)


@pytest.fixture(scope="module")
def backbone(tiny_training_backbone):
    return tiny_training_backbone


@pytest.fixture(scope="module")
def toy(backbone):
    return encode_examples(backbone.tokenizer, TOY, 64)


@pytest.fixture(scope="module")
def probe(backbone):
    """Logits of the plain model on a fixed input, its module layout and weights, before any job ran."""
    ids = torch.tensor([backbone.tokenizer(format_prompt("word apple")).input_ids])
    with torch.no_grad():
        logits = backbone.model(input_ids=ids).logits.clone()
    layout = [(name, type(m).__name__) for name, m in backbone.model.named_modules()]
    weights = {name: t.clone() for name, t in backbone.model.state_dict().items()}
    return ids, logits, layout, weights


@pytest.fixture(scope="module")
def trained(backbone, toy, probe, tmp_path_factory):
    """One short job per kind (trained on first use and shared by the tests of that kind)."""
    results = {}

    def get(kind):
        if kind not in results:
            events, work_dir = [], tmp_path_factory.mktemp(f"job-{kind}")
            result = train(backbone, kind, toy, toy, HP[kind], 0, record(events), work_dir, init_text="yes no",
                           labels=("yes", "no"))
            results[kind] = result, events, work_dir
        return results[kind]
    return get


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    """The server's own loader and engine over the same directory."""
    served = load_backbone(ModelConfig(source=str(tiny_model_dir)))
    engine = LLMEngine(served, EngineConfig(cache=CacheConfig(num_pages=64), scheduler=SchedulerConfig(
        max_num_seqs=16, max_num_batched_tokens=256)))
    yield engine
    engine.close()


def test_fingerprint_and_arch_match_the_server(backbone, tiny_model_dir):
    served = load_backbone(ModelConfig(source=str(tiny_model_dir)))
    assert backbone.fingerprint == backbone_fingerprint(served)
    assert backbone.arch == served.arch
    assert backbone.eos_token_ids == served.eos_token_ids == {backbone.tokenizer.eos_token_id}
    assert not any(p.requires_grad for p in backbone.model.parameters()) and not backbone.model.training


@pytest.mark.parametrize("kind", KINDS)
def test_kind_learns_the_toy_task_and_exports_a_servable_artifact(kind, trained, backbone, probe):
    result, events, work_dir = trained(kind)
    assert [e.step for e in events][-1] == 30 and events[-1].eta_s == 0
    first, last = events[0].loss, events[-1].loss
    assert last < first / 2, f"{kind}: loss {first:.2f} -> {last:.2f}"
    assert result.kind == ("prompt" if kind == "ptuning" else kind)
    artifact = decode_artifact(result.artifact, expected_fingerprint=backbone.fingerprint, limits=backbone.limits,
                               arch=backbone.arch)
    assert artifact.kind == result.kind
    assert result.metrics["eval_loss"] < first / 2 and 0 <= result.metrics["exact_match"] <= 1
    assert all(math.isfinite(v) for v in result.metrics.values())
    assert (work_dir / CHECKPOINT_NAME).is_file()
    assert (work_dir / "peft" / "adapter_model.safetensors").is_file() == (kind not in OWN_TRAINERS)
    # The shared model is exactly as before: same modules, hooks and weights, frozen, bitwise the same logits.
    ids, logits, layout, weights = probe
    assert [(name, type(m).__name__) for name, m in backbone.model.named_modules()] == layout
    assert not hasattr(backbone.model, "peft_config") and no_hooks(backbone.model)
    state = backbone.model.state_dict()
    assert list(state) == list(weights) and all(torch.equal(state[name], w) for name, w in weights.items())
    assert not any(p.requires_grad for p in backbone.model.parameters()) and not backbone.model.training
    with torch.no_grad():
        assert torch.equal(backbone.model(input_ids=ids).logits, logits)


@pytest.mark.parametrize("kind", KINDS)
def test_engine_serves_what_evaluation_predicted(kind, trained, backbone, engine):
    from peft import PeftModel

    from prefixserve.training.trainers import wrapped

    result, _, work_dir = trained(kind)
    task = f"acme/{kind}"
    engine.register_adapter(task, result.artifact)
    examples = TOY + UNSEEN + CHAT
    encoded = encode_examples(backbone.tokenizer, examples, 64)
    # A tenant sends the text prompt; the engine's tokenization is the trainer's.
    assert engine.make_request(format_prompt(TOY[0]["input"]), task=task).prompt_token_ids == encoded[0].prompt_ids
    max_new = HP[kind].eval_max_new_tokens
    completions = engine.generate([e.prompt_ids for e in encoded], SamplingParams(max_new_tokens=max_new,
                                                                                   temperature=0),
                                  tasks=[task] * len(encoded))
    eos = backbone.eos_token_ids
    if kind == "bitfit":  # what its evaluation ran: the decoded artifact's biases hooked onto the backbone
        decoded = decode_artifact(result.artifact, expected_fingerprint=backbone.fingerprint, limits=backbone.limits,
                                  arch=backbone.arch)
        exported_model = added_biases(backbone.model, artifact_biases(decoded))
    elif kind == "adapter":  # likewise the decoded bottlenecks
        decoded = decode_artifact(result.artifact, expected_fingerprint=backbone.fingerprint, limits=backbone.limits,
                                  arch=backbone.arch)
        exported_model = added_bottlenecks(backbone.model, artifact_bottlenecks(decoded), decoded.config["activation"])
    else:
        exported_model = wrapped(backbone.model, lambda m: PeftModel.from_pretrained(m, work_dir / "peft"))
    with exported_model as exported:
        ids = predict_ids(exported, encoded, max_new, eos)
        texts = predict(exported, backbone.tokenizer, encoded, max_new, eos)
    assert [[t for t in c.token_ids if t not in eos] for c in completions] == ids
    assert [c.text for c in completions] == texts
    served_em = sum(c.text.strip() == e.output_text.strip() for c, e in zip(completions, encoded[:4])) / 4
    assert served_em == result.metrics["exact_match"]


def test_engine_serves_the_adapters_log_probabilities(trained, backbone, engine):
    """Closer than greedy tokens (which a small difference in the math leaves alone on this model): every prompt
    token's log-probability as the engine serves the trained adapter is the decoded artifact's under the hooks."""
    result = trained("adapter")[0]
    engine.register_adapter("acme/adapter-logprobs", result.artifact)
    encoded = encode_examples(backbone.tokenizer, TOY + UNSEEN, 64)
    prompts = [e.prompt_ids + e.output_ids for e in encoded]
    completions = engine.generate(prompts, SamplingParams(max_new_tokens=1, temperature=0, prompt_logprobs=0),
                                  tasks=["acme/adapter-logprobs"] * len(prompts))
    decoded = decode_artifact(result.artifact, expected_fingerprint=backbone.fingerprint, limits=backbone.limits,
                              arch=backbone.arch)

    def prompt_logprobs(ids: list[int]) -> torch.Tensor:
        log_probs = torch.log_softmax(backbone.model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
        return log_probs[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]  # [len(ids) - 1]
    with torch.no_grad():
        plain = [prompt_logprobs(ids) for ids in prompts]
        with added_bottlenecks(backbone.model, artifact_bottlenecks(decoded), decoded.config["activation"]):
            hooked = [prompt_logprobs(ids) for ids in prompts]
    for completion, expected, backbone_only in zip(completions, hooked, plain):
        served = torch.tensor(completion.prompt_logprobs[1:])
        assert torch.allclose(served, expected, atol=1e-4), (served - expected).abs().max()
        assert (served - backbone_only).abs().max() > 1e-2  # the adapter moved them: the check can tell


def test_ia3_artifact_scales_the_requested_projections(trained, backbone):
    """peft's vectors land where the engine applies them: an input-sized one for a feedforward target
    (its input is scaled), an output-sized one for the rest, in every layer."""
    artifact = decode_artifact(trained("ia3")[0].artifact, expected_fingerprint=backbone.fingerprint,
                               limits=backbone.limits, arch=backbone.arch)
    assert artifact.config == {"targets": ["down_proj", "q_proj", "up_proj", "v_proj"],
                               "feedforward": ["q_proj", "up_proj"]}
    arch = backbone.arch  # up_proj is [hidden -> intermediate], down_proj the other way, v_proj narrower
    assert arch.intermediate_size != arch.hidden_size != arch.num_kv_heads * arch.head_dim
    expected = {"q_proj": arch.hidden_size, "up_proj": arch.hidden_size, "v_proj": arch.num_kv_heads * arch.head_dim,
                "down_proj": arch.hidden_size}
    assert {name: tuple(t.shape) for name, t in artifact.tensors.items()} == {
        f"layers.{i}.{target}.ia3": (size,) for i in range(arch.num_layers)
        for target, size in expected.items()}
    assert all(not torch.equal(t, torch.ones_like(t)) for t in artifact.tensors.values())  # trained away from 1


def test_bitfit_artifact_shifts_the_requested_projections(trained, backbone):
    """One trained bias per requested projection in every layer, each the size of that projection's output
    (gate_proj's intermediate-sized, v_proj's narrower than o_proj's)."""
    artifact = decode_artifact(trained("bitfit")[0].artifact, expected_fingerprint=backbone.fingerprint,
                               limits=backbone.limits, arch=backbone.arch)
    assert artifact.kind == "bitfit" and artifact.config == {"targets": ["gate_proj", "o_proj", "v_proj"]}
    arch = backbone.arch
    assert arch.intermediate_size != arch.hidden_size != arch.num_kv_heads * arch.head_dim
    expected = {"v_proj": arch.num_kv_heads * arch.head_dim, "gate_proj": arch.intermediate_size,
                "o_proj": arch.hidden_size}
    assert {name: tuple(t.shape) for name, t in artifact.tensors.items()} == {
        f"layers.{i}.{target}.bias": (size,) for i in range(arch.num_layers) for target, size in expected.items()}
    assert all(t.dtype == torch.float32 and t.abs().max() > 0 for t in artifact.tensors.values())  # trained from 0


def test_bitfit_starts_as_the_backbone_on_every_projection(backbone, probe):
    """By default every projection of every layer gets a bias, and at zero the task is the backbone bitwise."""
    from prefixserve.adapters_store.kinds import LORA_TARGETS

    biases = zero_biases(backbone, Hyperparameters().bitfit_targets)
    assert sorted(biases) == sorted((i, t) for i in range(backbone.arch.num_layers) for t in LORA_TARGETS)
    ids, logits = probe[0], probe[1]
    with torch.no_grad(), added_biases(backbone.model, biases):
        assert not no_hooks(backbone.model)
        assert torch.equal(backbone.model(input_ids=ids).logits, logits)
    assert no_hooks(backbone.model)


def test_adapter_artifact_holds_a_trained_bottleneck_per_layer_and_placement(trained, backbone):
    """down [size, hidden], up [hidden, size] and their biases after attention and the MLP of every layer,
    all trained away from their start (up from zero, down from its seeded random draw)."""
    artifact = decode_artifact(trained("adapter")[0].artifact, expected_fingerprint=backbone.fingerprint,
                               limits=backbone.limits, arch=backbone.arch)
    assert artifact.kind == "adapter"
    assert artifact.config == {"size": 4, "placements": ["attention", "mlp"], "activation": "gelu"}
    hidden, layers = backbone.arch.hidden_size, backbone.arch.num_layers
    shapes = {"down": (4, hidden), "down_bias": (4,), "up": (hidden, 4), "up_bias": (hidden,)}
    assert {name: tuple(t.shape) for name, t in artifact.tensors.items()} == {
        f"layers.{i}.{p}.{part}": shape for i in range(layers) for p in ("attention", "mlp")
        for part, shape in shapes.items()}
    start = initial_bottlenecks(backbone, 4, ("attention", "mlp"), seed=0)
    weights = artifact_bottlenecks(artifact)
    assert sorted(weights) == sorted(start)
    for key, parts in weights.items():
        for trained_part, start_part in zip(parts, start[key]):
            assert trained_part.dtype == torch.float32 and not torch.equal(trained_part, start_part.detach())


def test_adapter_starts_as_the_backbone_and_its_hooks_change_the_output(backbone, probe):
    """By default a bottleneck follows attention and the MLP of every layer; at its start (up and its bias
    zero) the task is the backbone bitwise, and the hooks do reach the output once up is not zero."""
    hp = Hyperparameters()
    weights = initial_bottlenecks(backbone, hp.bottleneck_size, hp.bottleneck_placements, seed=3)
    layers = backbone.arch.num_layers
    assert sorted(weights) == sorted((i, p) for i in range(layers) for p in ("attention", "mlp"))
    assert all(parts[0].abs().max() > 0 for parts in weights.values())  # down drawn, not zero
    again = initial_bottlenecks(backbone, hp.bottleneck_size, hp.bottleneck_placements, seed=3)
    assert all(torch.equal(weights[key][0], again[key][0]) for key in weights)  # the seed alone decides it
    ids, logits = probe[0], probe[1]
    with torch.no_grad(), added_bottlenecks(backbone.model, weights, hp.bottleneck_activation):
        assert not no_hooks(backbone.model)
        assert torch.equal(backbone.model(input_ids=ids).logits, logits)
        weights[(layers - 1, "mlp")][2].fill_(0.1)  # up of the last MLP's bottleneck
        assert not torch.allclose(backbone.model(input_ids=ids).logits, logits)
    assert no_hooks(backbone.model)


def test_resume_from_checkpoint_gives_the_same_artifact(backbone, toy, tmp_path):
    hp = Hyperparameters(steps=12, batch_size=2, learning_rate=0.05, num_virtual_tokens=3, encoder="lstm",
                         encoder_hidden=16, warmup_steps=3, decay="cosine")  # the schedule resumes too
    whole = train_peft(backbone, "ptuning", toy, [], hp, 5, lambda e: None, tmp_path / "whole")

    def stop_at_7(event):
        if event.step == 7:
            raise KeyboardInterrupt("worker killed")
    with pytest.raises(KeyboardInterrupt):
        train_peft(backbone, "ptuning", toy, [], hp, 5, stop_at_7, tmp_path / "resumed")
    checkpoint = load_file(tmp_path / "resumed" / CHECKPOINT_NAME)
    assert any("lstm_head" in name for name in checkpoint)  # the encoder PEFT's export drops
    assert any(name.startswith("adam.exp_avg_sq.") for name in checkpoint)
    events = []
    resumed = train_peft(backbone, "ptuning", toy, [], hp, 5, record(events), tmp_path / "resumed")
    assert events[0].step == 7  # continued after the step-6 checkpoint, not from scratch
    assert resumed.artifact == whole.artifact
    # Another job's checkpoint (a different seed) is not resumed.
    events = []
    train_peft(backbone, "ptuning", toy, [], hp, 6, record(events), tmp_path / "resumed")
    assert events[0].step == 1
    # Nor is a damaged one: the job starts over instead of failing.
    (tmp_path / "resumed" / CHECKPOINT_NAME).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    events = []
    again = train_peft(backbone, "ptuning", toy, [], hp, 5, record(events), tmp_path / "resumed")
    assert again.artifact == whole.artifact
    assert events[0].step == 1


def test_ia3_resumes_from_checkpoint_to_the_same_artifact(backbone, toy, probe, tmp_path):
    hp = Hyperparameters(steps=12, batch_size=2, learning_rate=0.05, warmup_steps=3, decay="cosine")  # peft's targets
    whole = train_peft(backbone, "ia3", toy, [], hp, 5, lambda e: None, tmp_path / "whole")

    def stop_at_7(event):
        if event.step == 7:
            raise KeyboardInterrupt("worker killed")
    with pytest.raises(KeyboardInterrupt):
        train_peft(backbone, "ia3", toy, [], hp, 5, stop_at_7, tmp_path / "resumed")
    assert not hasattr(backbone.model, "peft_config")  # the killed job's vectors were unloaded
    checkpoint = load_file(tmp_path / "resumed" / CHECKPOINT_NAME)
    params = sorted(name for name in checkpoint if name.startswith("param."))
    assert len(params) == 3 * backbone.arch.num_layers and all(".ia3_l." in name for name in params)
    assert any(name.startswith("adam.exp_avg_sq.") for name in checkpoint)
    events = []
    resumed = train_peft(backbone, "ia3", toy, [], hp, 5, record(events), tmp_path / "resumed")
    assert events[0].step == 7  # continued after the step-6 checkpoint, not from scratch
    assert resumed.artifact == whole.artifact
    state = backbone.model.state_dict()
    assert all(torch.equal(state[name], w) for name, w in probe[3].items())


def test_bitfit_resumes_from_checkpoint_to_the_same_artifact(backbone, toy, probe, tmp_path):
    hp = Hyperparameters(steps=12, batch_size=2, learning_rate=0.05, warmup_steps=3, decay="cosine",
                         bitfit_targets=("q_proj", "down_proj"))
    whole = train_bitfit(backbone, toy, [], hp, 5, lambda e: None, tmp_path / "whole")

    def stop_at_7(event):
        if event.step == 7:
            raise KeyboardInterrupt("worker killed")
    with pytest.raises(KeyboardInterrupt):
        train_bitfit(backbone, toy, [], hp, 5, stop_at_7, tmp_path / "resumed")
    # The killed job's hooks are gone: the shared model answers bitwise as before any job.
    assert no_hooks(backbone.model)
    ids, logits, _, weights = probe
    with torch.no_grad():
        assert torch.equal(backbone.model(input_ids=ids).logits, logits)
    checkpoint = load_file(tmp_path / "resumed" / CHECKPOINT_NAME)
    assert sorted(name for name in checkpoint if name.startswith("param.")) == sorted(
        f"param.layers.{i}.{t}.bias" for i in range(backbone.arch.num_layers) for t in ("q_proj", "down_proj"))
    assert any(name.startswith("adam.exp_avg_sq.") for name in checkpoint)
    events = []
    resumed = train_bitfit(backbone, toy, [], hp, 5, record(events), tmp_path / "resumed")
    assert events[0].step == 7  # continued after the step-6 checkpoint, not from scratch
    assert resumed.artifact == whole.artifact
    state = backbone.model.state_dict()
    assert all(torch.equal(state[name], w) for name, w in weights.items()) and no_hooks(backbone.model)


def test_adapter_resumes_from_checkpoint_to_the_same_artifact(backbone, toy, probe, tmp_path):
    hp = Hyperparameters(steps=12, batch_size=2, learning_rate=0.05, warmup_steps=3, decay="cosine",
                         bottleneck_size=3, bottleneck_placements=("mlp",), bottleneck_activation="tanh")  # Pfeiffer
    whole = train_bottleneck(backbone, toy, [], hp, 5, lambda e: None, tmp_path / "whole")

    def stop_at_7(event):
        if event.step == 7:
            raise KeyboardInterrupt("worker killed")
    with pytest.raises(KeyboardInterrupt):
        train_bottleneck(backbone, toy, [], hp, 5, stop_at_7, tmp_path / "resumed")
    # The killed job's hooks are gone: the shared model answers bitwise as before any job.
    assert no_hooks(backbone.model)
    ids, logits, _, weights = probe
    with torch.no_grad():
        assert torch.equal(backbone.model(input_ids=ids).logits, logits)
    checkpoint = load_file(tmp_path / "resumed" / CHECKPOINT_NAME)
    assert sorted(name for name in checkpoint if name.startswith("param.")) == sorted(
        f"param.layers.{i}.mlp.{part}" for i in range(backbone.arch.num_layers)
        for part in ("down", "down_bias", "up", "up_bias"))
    assert any(name.startswith("adam.exp_avg_sq.") for name in checkpoint)
    events = []
    resumed = train_bottleneck(backbone, toy, [], hp, 5, record(events), tmp_path / "resumed")
    assert events[0].step == 7  # continued after the step-6 checkpoint, not from scratch
    assert resumed.artifact == whole.artifact
    assert train_bottleneck(backbone, toy, [], hp, 6, lambda e: None, tmp_path / "seed6").artifact != whole.artifact
    state = backbone.model.state_dict()
    assert all(torch.equal(state[name], w) for name, w in weights.items()) and no_hooks(backbone.model)


def test_learning_rate_schedule_warms_up_then_decays_to_a_tenth():
    hp = Hyperparameters(steps=10, learning_rate=1.0, warmup_steps=4, decay="cosine")
    rates = [learning_rate_at(hp, step) for step in range(1, 11)]
    assert rates[:5] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])
    assert rates[-1] == pytest.approx(0.1) and all(a > b for a, b in zip(rates[4:], rates[5:]))
    constant = dataclasses.replace(hp, decay="constant")
    assert [learning_rate_at(constant, step) for step in (4, 5, 10)] == [1.0, 1.0, 1.0]
    assert learning_rate_at(Hyperparameters(steps=3, learning_rate=0.5, warmup_steps=0, decay="cosine"), 1) == 0.5
    assert learning_rate_at(Hyperparameters(steps=1, learning_rate=0.5, warmup_steps=0, decay="cosine"), 1) == 0.5


def test_the_schedule_reaches_the_optimizer(backbone, toy, tmp_path):
    hp = Hyperparameters(steps=2, batch_size=2, learning_rate=0.05, num_virtual_tokens=2)
    constant = train_peft(backbone, "prompt", toy, [], hp, 0, lambda e: None, tmp_path / "constant")
    warm = train_peft(backbone, "prompt", toy, [], dataclasses.replace(hp, warmup_steps=5), 0, lambda e: None,
                      tmp_path / "warm")
    assert warm.artifact != constant.artifact


def test_divergence_fails_without_an_artifact(backbone, toy, tmp_path):
    poisoned = copy.deepcopy(backbone.model)
    with torch.no_grad():  # a token every prompt ends with ("Answer") now embeds to inf: the loss is NaN
        poisoned.get_input_embeddings().weight[toy[0].prompt_ids[-2]] = float("inf")
    broken = dataclasses.replace(backbone, model=poisoned)
    for kind in ("lora", "ia3", "bitfit", "adapter", "prompt"):
        with pytest.raises(TrainingFailedError, match="diverged at step 1: the loss is nan"):
            train(broken, kind, toy, toy, HP[kind], 0, lambda e: None, tmp_path / kind)
        assert not (tmp_path / kind / "peft").exists()
    # LoRA and IA3 were unloaded and BitFit's and the adapter's hooks removed even though the jobs failed
    assert not hasattr(poisoned, "peft_config") and no_hooks(poisoned)


def spec(kind="prompt", **fields) -> JobSpec:
    raw = {"task": "acme/t", "kind": kind, "examples": TOY, "eval_fraction": 0.5,
           "hyperparameters": {"steps": 2, "batch_size": 2, "num_virtual_tokens": 2, "max_length": 32}}
    return parse_job_spec({**raw, **fields})


def test_run_job_reports_baselines_a_card_and_progress_evals(backbone, tmp_path):
    events = []
    job = spec(hyperparameters={"steps": 2, "batch_size": 2, "num_virtual_tokens": 2, "eval_every": 1},
               instruction="Answer yes or no.")
    result = run_job(job, backbone, LocalStore(tmp_path / "store"), record(events), tmp_path / "job")
    metrics = result.metrics
    baselines = {f"{name}_exact_match" for name in ("zero_shot", "instruction", "k_shot", "majority")}
    assert {"train_loss", "eval_loss", "exact_match", "label_accuracy", *baselines} <= set(metrics)
    assert metrics["best_baseline_exact_match"] == max(metrics[key] for key in baselines)
    assert metrics["lift_over_best_baseline"] == metrics["exact_match"] - metrics["best_baseline_exact_match"]
    assert result.kind == "prompt"
    assert [e.step for e in events] == [1, 2] and set(events[0].eval_metrics) >= {"exact_match", "eval_loss"}
    card = result.card
    assert card["kind"] == "prompt" and card["metrics"] == metrics and card["seed"] == 0
    assert (card["num_train"], card["num_eval"], card["instruction_given"]) == (2, 2, True)
    assert card["num_parameters"] == 2 * backbone.model.config.hidden_size  # 2 virtual tokens
    assert card["hyperparameters"]["steps"] == 2 and metrics[f"{card['best_baseline']}_exact_match"] == max(
        metrics[key] for key in baselines)
    assert card["baselines_skipped"] == {}


def test_run_job_trains_ia3_with_the_whole_context_and_cards_it(backbone, tmp_path):
    # num_virtual_tokens beyond the context fails a prompt job (below); ia3 puts no tokens in front, ignores it
    job = spec("ia3", hyperparameters={"steps": 2, "batch_size": 2, "num_virtual_tokens": 300, "max_length": 32,
                                       "ia3_targets": ["o_proj", "gate_proj"], "ia3_feedforward": []})
    result = run_job(job, backbone, LocalStore(tmp_path / "store"), lambda e: None, tmp_path / "job")
    assert result.kind == "ia3" and result.card["kind"] == "ia3"
    assert list(result.card["hyperparameters"]["ia3_targets"]) == ["o_proj", "gate_proj"]
    arch = backbone.arch  # o_proj's output is hidden-sized, gate_proj's intermediate-sized
    assert result.card["num_parameters"] == arch.num_layers * (arch.hidden_size + arch.intermediate_size)
    assert result.metrics["lift_over_best_baseline"] == result.metrics["exact_match"] - result.metrics[
        "best_baseline_exact_match"]


def test_run_job_trains_bitfit_with_progress_evals_and_cards_it(backbone, tmp_path):
    events = []
    job = spec("bitfit", hyperparameters={"steps": 2, "batch_size": 2, "max_length": 32, "eval_every": 1,
                                          "bitfit_targets": ["o_proj", "gate_proj"]})
    result = run_job(job, backbone, LocalStore(tmp_path / "store"), record(events), tmp_path / "job")
    assert result.kind == "bitfit" and result.card["kind"] == "bitfit"
    assert list(result.card["hyperparameters"]["bitfit_targets"]) == ["o_proj", "gate_proj"]
    arch = backbone.arch  # o_proj's output is hidden-sized, gate_proj's intermediate-sized
    assert result.card["num_parameters"] == arch.num_layers * (arch.hidden_size + arch.intermediate_size)
    assert set(events[0].eval_metrics) >= {"exact_match", "eval_loss"}  # evaluated with the live biases
    assert result.metrics["lift_over_best_baseline"] == result.metrics["exact_match"] - result.metrics[
        "best_baseline_exact_match"]
    assert no_hooks(backbone.model)


def test_run_job_trains_an_adapter_and_cards_it(backbone, tmp_path):
    job = spec("adapter", hyperparameters={"steps": 2, "batch_size": 2, "max_length": 32, "bottleneck_size": 3,
                                           "bottleneck_placements": ["mlp"]})
    result = run_job(job, backbone, LocalStore(tmp_path / "store"), lambda e: None, tmp_path / "job")
    assert result.kind == "adapter" and result.card["kind"] == "adapter"
    hp = result.card["hyperparameters"]
    assert (hp["bottleneck_size"], list(hp["bottleneck_placements"]), hp["bottleneck_activation"]) == (3, ["mlp"],
                                                                                                         "relu")
    assert hp["learning_rate"] == 1e-3  # the kind's default
    hidden = backbone.arch.hidden_size  # down, its bias, up, its bias per layer
    assert result.card["num_parameters"] == backbone.arch.num_layers * (3 * hidden + 3 + hidden * 3 + hidden)
    assert result.metrics["lift_over_best_baseline"] == result.metrics["exact_match"] - result.metrics[
        "best_baseline_exact_match"]
    assert no_hooks(backbone.model)


def test_the_instruction_is_validated(tmp_path):
    with pytest.raises(TrainingDataError, match="expected 'instruction' to be non-empty text of at most 2048"):
        spec(instruction="   ")
    with pytest.raises(TrainingDataError, match="non-empty text"):
        spec(instruction=["Answer"])
    with pytest.raises(TrainingDataError, match="non-empty text"):
        spec(instruction="x" * 2049)
    with pytest.raises(TrainingDataError, match="no 'instruction' for a subspace job"):
        parse_job_spec({"task": "acme/s", "kind": "subspace", "sources": [{"task": "acme/p", "examples": TOY}],
                        "instruction": "Answer yes or no."})
    assert spec(instruction="Answer yes or no.").instruction == "Answer yes or no."


def test_run_job_bad_data_names_the_example(backbone, tmp_path):
    store = LocalStore(tmp_path / "store")
    long = [*TOY, {"input": "x", "output": "many words " * 20}]
    with pytest.raises(TrainingDataError, match=r"examples\[4\]: expected prompt \+ output of at most max_length=32"):
        run_job(spec(examples=long), backbone, store, lambda e: None, tmp_path / "job")
    with pytest.raises(TrainingDataError, match="expected 'kind' among"):
        run_job(dataclasses.replace(spec(), kind="dora"), backbone, store, lambda e: None, tmp_path / "job")
    too_many_tokens = spec(hyperparameters={"num_virtual_tokens": 300})
    with pytest.raises(TrainingDataError, match="num_virtual_tokens below the backbone's context of 256"):
        run_job(too_many_tokens, backbone, store, lambda e: None, tmp_path / "job")
    with pytest.raises(TrainingDataError, match="hyperparameters.rank of at most 64"):
        run_job(spec("lora", hyperparameters={"rank": 128}), backbone, store, lambda e: None, tmp_path / "job")
    with pytest.raises(TrainingDataError, match=r"hyperparameters.targets among .* found \['lm_head'\]"):
        run_job(spec("lora", hyperparameters={"targets": ["q_proj", "lm_head"]}), backbone, store, lambda e: None,
                tmp_path / "job")
    # A spec built in code, not parsed: the trainer refuses what the server could not scale.
    unparsed = dataclasses.replace(spec("ia3"), hyperparameters=Hyperparameters(ia3_targets=("q_proj", "lm_head")))
    with pytest.raises(TrainingDataError, match=r"hyperparameters.ia3_targets among .* found \['lm_head'\]"):
        run_job(unparsed, backbone, store, lambda e: None, tmp_path / "job")
    unparsed = dataclasses.replace(spec("bitfit"), hyperparameters=Hyperparameters(bitfit_targets=("lm_head",)))
    with pytest.raises(TrainingDataError, match=r"hyperparameters.bitfit_targets among .* found \['lm_head'\]"):
        run_job(unparsed, backbone, store, lambda e: None, tmp_path / "job")
    unparsed = dataclasses.replace(spec("bitfit"), hyperparameters=Hyperparameters(bitfit_targets=()))
    with pytest.raises(TrainingDataError, match=r"hyperparameters.bitfit_targets to name at least one projection"):
        run_job(unparsed, backbone, store, lambda e: None, tmp_path / "job")
    unparsed = dataclasses.replace(spec("adapter"), hyperparameters=Hyperparameters(
        bottleneck_placements=("mlp", "attention")))
    with pytest.raises(TrainingDataError, match=r"hyperparameters.bottleneck_placements a non-empty sorted list"):
        run_job(unparsed, backbone, store, lambda e: None, tmp_path / "job")
    unparsed = dataclasses.replace(spec("adapter"), hyperparameters=Hyperparameters(bottleneck_activation="swish"))
    with pytest.raises(TrainingDataError, match=r"hyperparameters.bottleneck_activation one of 'gelu'"):
        run_job(unparsed, backbone, store, lambda e: None, tmp_path / "job")
    # What this server would refuse to load is refused before training, not after.
    narrow = dataclasses.replace(backbone, limits=AdapterLimits(max_bottleneck_size=8))
    with pytest.raises(TrainingDataError, match=r"hyperparameters.bottleneck_size of at most 8 \(the server's limit\), "
                                                r"found 16"):
        run_job(spec("adapter"), narrow, store, lambda e: None, tmp_path / "job")
    assert no_hooks(backbone.model)
    assert store.list_tasks() == {}


def test_run_job_ipt_sources_must_be_published_prompt_tasks(backbone, trained, tmp_path):
    store = LocalStore(tmp_path / "store")
    subspace = {"task": "acme/sub", "kind": "subspace",
                "sources": [{"task": "acme/p", "examples": TOY}, {"task": "acme/l", "examples": TOY}]}
    with pytest.raises(TrainingDataError, match=r"sources\[0\]: expected task 'acme/p' to have a published adapter"):
        run_job(parse_job_spec(subspace), backbone, store, lambda e: None, tmp_path / "job")
    store.put("acme/p", trained("prompt")[0].artifact, "prompt")
    store.put("acme/l", trained("lora")[0].artifact, "lora")
    with pytest.raises(TrainingDataError, match=r"sources\[1\]: expected task 'acme/l' to hold a prompt-tuned"):
        run_job(parse_job_spec(subspace), backbone, store, lambda e: None, tmp_path / "job")
    intrinsic = spec("intrinsic", hyperparameters={"subspace": "acme/p"})
    with pytest.raises(TrainingDataError, match="expected task 'acme/p' to hold a subspace artifact, found kind"):
        run_job(intrinsic, backbone, store, lambda e: None, tmp_path / "job")


def test_a_subspace_jobs_card_keeps_aggregates_not_one_entry_per_source(backbone, trained, tmp_path):
    store = LocalStore(tmp_path / "store")
    for name in ("acme/p", "acme/q"):
        store.put(name, trained("prompt")[0].artifact, "prompt")
    job = parse_job_spec({"task": "acme/sub", "kind": "subspace",
                          "sources": [{"task": "acme/p", "examples": TOY}, {"task": "acme/q", "examples": TOY}],
                          "eval_fraction": 0.5,
                          "hyperparameters": {"steps": 2, "batch_size": 2, "num_virtual_tokens": 4, "max_length": 32,
                                              "intrinsic_dim": 2, "decoder_hidden": 8}})
    result = run_job(job, backbone, store, lambda e: None, tmp_path / "job")
    assert any("/" in name for name in result.metrics)  # the job's record has each source's scores
    card = result.card
    assert card["kind"] == "subspace" and card["num_sources"] == 2 and "num_train" not in card
    assert card["metrics"] == {k: v for k, v in result.metrics.items() if "/" not in k} and card["metrics"]
    check_card(card)  # what the store accepts


@pytest.mark.slow
def test_prompt_tuning_smollm2_beats_every_baseline(smollm2_dir, tmp_path):
    """A tenant's job on the real backbone: made-up words -> yes/no is near chance for SmolLM2, which
    zero-shot answers in its own words and with 4 examples in the prompt guesses; a short prompt-tuning
    job learns the task's answers."""
    from prefixserve.training.backbone import load_training_backbone
    from prefixserve.training.tasks import build_task

    backbone = load_training_backbone(ModelConfig(source=str(smollm2_dir)))
    task = build_task("made_up_yes_no")
    job = parse_job_spec({"task": "acme/yes-no", "kind": "prompt", "examples": task.train,
                          "eval_examples": task.eval[:32], "instruction": task.instruction,
                          "hyperparameters": {"steps": 60, "batch_size": 4, "learning_rate": 0.03,
                                              "num_virtual_tokens": 4, "eval_max_new_tokens": 3,
                                              "init_text": task.instruction}})
    events = []
    result = run_job(job, backbone, LocalStore(tmp_path / "store"), record(events), tmp_path / "job")
    metrics = result.metrics
    assert events[-1].loss < events[0].loss / 2
    assert metrics["exact_match"] >= metrics["zero_shot_exact_match"] + 0.25, metrics
    # Measured 0.84 against the best baseline's 0.53 (4-shot): a margin of 10 of the 32 examples.
    assert metrics["lift_over_best_baseline"] >= 0.15, metrics
    assert metrics["label_accuracy"] >= metrics["exact_match"]
