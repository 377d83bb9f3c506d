"""Intrinsic Prompt Tuning on a tiny random Llama with SmolLM2's tokenizer: the soft-prompt loss and
greedy decoding match what peft and the engine compute; MSF learns a subspace whose published decoder
reproduces its reconstructions; IST trains only z; the engine serves IPT tasks as evaluated."""

import copy

import pytest
import torch
from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model

from prefixserve.adapters_store.format import artifact_version, decode_artifact, encode_artifact
from prefixserve.adapters_store.kinds import SubspaceKind
from prefixserve.config import CacheConfig, EngineConfig, ModelConfig
from prefixserve.engine.llm_engine import LLMEngine
from prefixserve.engine.request import SamplingParams
from prefixserve.errors import TrainingDataError, TrainingFailedError
from prefixserve.models import load_backbone
from prefixserve.training.data import collate, encode_examples
from prefixserve.training.evaluate import evaluate, output_nll
from prefixserve.training.ipt import START_BATCH, SubspaceSource, fit_autoencoder, train_intrinsic, train_subspace
from prefixserve.training.soft_prompt import evaluate_soft_prompt, greedy_with_soft_prompt, soft_prompt_loss
from prefixserve.training.spec import Hyperparameters
from prefixserve.training.tasks import build_task
from prefixserve.training.trainers import batch_indices

NUM_TOKENS, HIDDEN, MAX_NEW = 4, 64, 5
SOURCE_TASKS = ("made_up_color", "word_size", "starts_with_vowel")
HP = Hyperparameters(steps=30, learning_rate=1e-2, batch_size=6, num_virtual_tokens=NUM_TOKENS, intrinsic_dim=3,
                     decoder_hidden=24, mse_weight=200.0, eval_max_new_tokens=MAX_NEW)


def task_examples(backbone, name, num_train=24, num_eval=6):
    task = build_task(name, num_train=num_train, num_eval=num_eval)
    tok = backbone.tokenizer
    return encode_examples(tok, task.train, 64), encode_examples(tok, task.eval, 64)


def make_sources(backbone, num_tokens=NUM_TOKENS):
    g = torch.Generator().manual_seed(3)
    sources = []
    for name in SOURCE_TASKS:
        train, eval_ = task_examples(backbone, name)
        sources.append(SubspaceSource(name, torch.randn(num_tokens, HIDDEN, generator=g) * 0.5, train, eval_))
    return sources


def weights_digest(model) -> float:
    return float(sum(p.double().sum() for p in model.parameters()))


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return LLMEngine(load_backbone(ModelConfig(source=str(tiny_model_dir))),
                     EngineConfig(cache=CacheConfig(num_pages=64)))


@pytest.fixture(scope="module")
def msf(tiny_training_backbone):
    sources, events = make_sources(tiny_training_backbone), []
    result = train_subspace(tiny_training_backbone, sources, HP, seed=1, progress=events.append)
    return sources, result, events


def engine_greedy(engine, prompts, task, stop=()):
    params = SamplingParams(max_new_tokens=MAX_NEW, temperature=0, stop_token_ids=tuple(stop))
    return [c.token_ids for c in engine.generate(prompts, params, tasks=[task] * len(prompts))]


def test_soft_prompt_loss_equals_peft_prompt_tuning(tiny_training_backbone):
    backbone = tiny_training_backbone
    train, _ = task_examples(backbone, "letter_count", num_train=5)
    prompt = torch.randn(NUM_TOKENS, HIDDEN, generator=torch.Generator().manual_seed(5))
    ours = soft_prompt_loss(backbone.model, prompt, train)
    per_example = soft_prompt_loss(backbone.model, prompt, train, per_example=True)
    peft_model = get_peft_model(copy.deepcopy(backbone.model), PromptTuningConfig(
        task_type=TaskType.CAUSAL_LM, num_virtual_tokens=NUM_TOKENS, prompt_tuning_init=PromptTuningInit.RANDOM))
    with torch.no_grad():
        peft_model.prompt_encoder["default"].embedding.weight.copy_(prompt)
        nll, count = output_nll(peft_model, collate(train, pad_id=0))
        singles = [output_nll(peft_model, collate([e], pad_id=0)) for e in train]
        reference = evaluate(peft_model, backbone.tokenizer, train, MAX_NEW, None, backbone.eos_token_ids)
    assert float(ours) == pytest.approx(float(nll) / count, rel=1e-5)
    assert per_example.tolist() == pytest.approx([float(n) / c for n, c in singles], rel=1e-5)
    scores = evaluate_soft_prompt(backbone.model, backbone.tokenizer, prompt, train, MAX_NEW, backbone.eos_token_ids,
                                  batch_size=2)  # chunks of unequal token counts
    assert scores["eval_loss"] == pytest.approx(reference["eval_loss"], rel=1e-5)
    assert scores["exact_match"] == reference["exact_match"]
    assert float(soft_prompt_loss(backbone.model, prompt * 3, train)) != pytest.approx(float(ours), rel=1e-3)


def test_greedy_with_soft_prompt_matches_engine_for_prompt_artifact(tiny_training_backbone, engine):
    backbone = tiny_training_backbone
    prompt = torch.randn(6, HIDDEN, generator=torch.Generator().manual_seed(9)) * 0.7
    engine.register_adapter("t/prompt", encode_artifact("prompt", {"num_virtual_tokens": 6}, {"embeddings": prompt},
                                                        engine.adapters.fingerprint))
    prompts = [backbone.tokenizer(t).input_ids for t in ("fox", "a much longer prompt here\nAnswer:", "x y")]
    served = engine_greedy(engine, prompts, "t/prompt")
    ours = greedy_with_soft_prompt(backbone.model, prompt, prompts, MAX_NEW,
                                   backbone.eos_token_ids)
    assert ours == served
    assert all(len(t) == MAX_NEW for t in ours)
    # Stop one row early on a token it emits (as if it were EOS) while the padded others run on.
    stop = served[1][1]
    served = engine_greedy(engine, prompts, "t/prompt", stop=[stop])
    ours = greedy_with_soft_prompt(backbone.model, prompt, prompts, MAX_NEW,
                                   backbone.eos_token_ids | {stop})
    assert ours == served
    assert len(ours[1]) == 2 and ours[1][-1] == stop and any(len(t) == MAX_NEW for t in ours)


def spread(sources) -> float:
    """MSE of the sources' mean prompt as their reconstruction: where MSF starts from."""
    prompts = torch.stack([s.soft_prompt for s in sources])
    return float((prompts - prompts.mean(0)).pow(2).mean())


def test_msf_objective_reduces_loss_and_reconstruction_error(tiny_training_backbone):
    backbone = tiny_training_backbone
    sources, events = make_sources(backbone), []
    # without the MSE-only warm-up: the paper's joint objective alone must make the progress
    ae, _, lm_loss = fit_autoencoder(backbone, sources, HP, seed=1, progress=events.append, reconstruction_steps=0)
    assert events[-1].step == HP.steps and events[-1].loss < 0.5 * events[0].loss
    with torch.no_grad():
        prompts = torch.stack([s.soft_prompt for s in sources])
        assert float((ae(prompts) - prompts).pow(2).mean()) < 0.25 * spread(sources)
    assert 0 < lm_loss < events[0].loss


def test_msf_publishes_a_subspace_that_reconstructs_its_sources(msf):
    sources, result, events = msf
    assert result.kind == "subspace"
    assert events[-1].step == HP.steps
    # the warm-up fits the sources; the LM term then pulls against the MSE (hard on a random backbone)
    assert result.metrics["reconstruction_mse"] < 0.05 * spread(sources)
    for s in sources:
        assert 0.0 <= result.metrics[f"{s.task}/exact_match_reconstructed"] <= 1.0
    assert set(result.source_vectors) == set(SOURCE_TASKS)
    vectors = torch.tensor(list(result.source_vectors.values()))  # [N, d]
    assert vectors.shape == (len(SOURCE_TASKS), HP.intrinsic_dim)
    # standardized, so IST's N(0, 0.02) start sits among the sources
    assert vectors.mean(0).abs().max() < 1e-4 and (vectors.std(0, unbiased=False) - 1).abs().max() < 1e-4


def test_published_decoder_reproduces_the_autoencoder(tiny_training_backbone, msf):
    backbone = tiny_training_backbone
    sources, result, _ = msf
    artifact = decode_artifact(result.artifact, expected_fingerprint=backbone.fingerprint, limits=backbone.limits,
                               arch=backbone.arch)
    assert artifact.config == {"intrinsic_dim": 3, "num_virtual_tokens": NUM_TOKENS, "decoder_hidden": 24}
    # the sources' vectors travel with the subspace (IST's candidate starting points), in source order
    assert torch.equal(artifact.tensors["source_vectors"],
                       torch.tensor([result.source_vectors[s.task] for s in sources]))
    # The same seed trains the same autoencoder: its reconstructions are the ones the published subspace decodes.
    ae, _, _ = fit_autoencoder(backbone, make_sources(backbone), HP, seed=1, progress=lambda e: None)
    with torch.no_grad():
        for source in sources:
            z = torch.tensor(result.source_vectors[source.task])
            recon = ae(source.soft_prompt.unsqueeze(0))[0]  # [P, hidden]
            served = SubspaceKind.decode(artifact.tensors, z, artifact.config)
            assert (served - recon).abs().max() <= 1e-5


def test_ist_trains_only_z_and_the_engine_serves_what_was_evaluated(tiny_training_backbone, engine, msf):
    backbone = tiny_training_backbone
    _, subspace_result, _ = msf
    subspace = decode_artifact(subspace_result.artifact, expected_fingerprint=backbone.fingerprint,
                               limits=backbone.limits, arch=backbone.arch)
    decoder_before = {k: v.clone() for k, v in subspace.tensors.items()}
    model_before = weights_digest(backbone.model)
    train, eval_ = task_examples(backbone, "word_temperature", num_eval=8)
    hp = Hyperparameters(steps=25, learning_rate=0.2, batch_size=4, eval_max_new_tokens=MAX_NEW)
    events = []
    result = train_intrinsic(backbone, subspace, subspace.version, train, eval_, hp, seed=2, progress=events.append)

    assert all(torch.equal(subspace.tensors[k], v) for k, v in decoder_before.items())
    assert weights_digest(backbone.model) == model_before
    assert events[-1].step == hp.steps
    intrinsic = decode_artifact(result.artifact, expected_fingerprint=backbone.fingerprint, limits=backbone.limits,
                                arch=backbone.arch)
    assert result.kind == intrinsic.kind == "intrinsic"
    assert intrinsic.config == {"subspace_version": artifact_version(subspace_result.artifact)}
    paper_init = torch.randn(3, generator=torch.Generator().manual_seed(2)) * 0.02  # the seeded N(0, 0.02) draw
    start_index = int(result.metrics["start_source"])
    start = paper_init if start_index < 0 else subspace.tensors["source_vectors"][start_index]
    with torch.no_grad():  # the whole train set, not the noisy per-batch progress losses
        losses = [float(soft_prompt_loss(backbone.model, SubspaceKind.decode(subspace.tensors, z, subspace.config),
                                         train)) for z in (paper_init, start, intrinsic.tensors["z"])]
    print("IST train-set loss paper init, start -> trained", losses)
    assert losses[2] < losses[0] - 0.3 and losses[2] < losses[1]
    assert {"exact_match", "eval_loss"} <= set(result.metrics)  # run_job adds the baselines (as for every kind)

    engine.register_adapter("t/subspace", subspace_result.artifact)
    engine.register_adapter("t/ipt", result.artifact)
    prompts = [e.prompt_ids for e in eval_]
    served = engine_greedy(engine, prompts, "t/ipt")
    prompt = SubspaceKind.decode(subspace.tensors, intrinsic.tensors["z"], subspace.config)
    ours = greedy_with_soft_prompt(backbone.model, prompt, prompts, MAX_NEW,
                                   backbone.eos_token_ids)
    assert ours == served
    texts = [backbone.tokenizer.decode([t for t in ids if t not in backbone.eos_token_ids], skip_special_tokens=True)
             for ids in served]
    served_exact = sum(t.strip() == e.output_text.strip() for t, e in zip(texts, eval_)) / len(eval_)
    assert served_exact == pytest.approx(result.metrics["exact_match"])


def test_ist_starts_from_the_candidate_with_the_lowest_loss(tiny_training_backbone, msf):
    backbone = tiny_training_backbone
    sources, result, _ = msf
    subspace = decode_artifact(result.artifact, expected_fingerprint=None, limits=backbone.limits, arch=None)
    vectors = subspace.tensors["source_vectors"]  # [N, d]
    paper_init = torch.randn(3, generator=torch.Generator().manual_seed(5)) * 0.02
    batch = [sources[0].train[i] for i in batch_indices(len(sources[0].train), START_BATCH, 5, 0)]
    with torch.no_grad():
        losses = [float(soft_prompt_loss(backbone.model, SubspaceKind.decode(subspace.tensors, z, subspace.config),
                                         batch)) for z in (paper_init, *vectors)]
    # a rate too small to move z: what is published is where IST started
    hp = Hyperparameters(steps=1, learning_rate=1e-12, batch_size=4)
    ist = train_intrinsic(backbone, subspace, subspace.version, sources[0].train, [], hp, seed=5,
                          progress=lambda e: None)
    best = min(range(len(losses)), key=losses.__getitem__)
    assert ist.metrics["start_source"] == best - 1 and ist.metrics["start_loss"] == pytest.approx(losses[best])
    z = decode_artifact(ist.artifact, expected_fingerprint=None, limits=backbone.limits, arch=None).tensors["z"]
    torch.testing.assert_close(z, paper_init if best == 0 else vectors[best - 1], atol=1e-9, rtol=0)


def test_seen_source_served_through_its_vector(tiny_training_backbone, engine, msf):
    backbone = tiny_training_backbone
    sources, result, _ = msf
    source = sources[1]
    version = artifact_version(result.artifact)
    z = torch.tensor(result.source_vectors[source.task])
    engine.register_adapter("t/subspace-seen", result.artifact)
    engine.register_adapter("t/seen", encode_artifact("intrinsic", {"subspace_version": version}, {"z": z},
                                                      backbone.fingerprint))
    prompts = [e.prompt_ids for e in source.eval]
    subspace = decode_artifact(result.artifact, expected_fingerprint=None, limits=backbone.limits, arch=None)
    recon = SubspaceKind.decode(subspace.tensors, z, subspace.config)
    assert engine_greedy(engine, prompts, "t/seen") == greedy_with_soft_prompt(
        backbone.model, recon, prompts, MAX_NEW, backbone.eos_token_ids)


def test_diverging_msf_fails_without_publishing(tiny_training_backbone):
    backbone = tiny_training_backbone
    sources = make_sources(backbone)
    hp = Hyperparameters(steps=5, learning_rate=1e30, batch_size=3, intrinsic_dim=2, decoder_hidden=8)
    with pytest.raises(TrainingFailedError, match="diverged at step"):
        train_subspace(backbone, sources, hp, seed=0, progress=lambda e: None)


def test_ist_through_an_exploding_decoder_fails(tiny_training_backbone):
    backbone = tiny_training_backbone
    config = {"intrinsic_dim": 2, "num_virtual_tokens": 2, "decoder_hidden": 4}
    decoder = {"decoder.0.weight": torch.ones(4, 2), "decoder.0.bias": torch.zeros(4),
               "decoder.2.weight": torch.zeros(2 * HIDDEN, 4), "decoder.2.bias": torch.full((2 * HIDDEN,), 3e38)}
    data = encode_artifact("subspace", config, decoder, backbone.fingerprint)
    subspace = decode_artifact(data, expected_fingerprint=None, limits=backbone.limits, arch=backbone.arch)
    train, _ = task_examples(backbone, "word_size", num_train=4)
    with pytest.raises(TrainingFailedError, match="diverged at step 1"):
        train_intrinsic(backbone, subspace, subspace.version, train, [], Hyperparameters(steps=2), 0, lambda e: None)


def test_mismatched_or_too_few_sources_are_refused(tiny_training_backbone):
    backbone = tiny_training_backbone
    sources = make_sources(backbone)
    odd = SubspaceSource("odd", torch.zeros(NUM_TOKENS + 1, HIDDEN), sources[0].train, [])
    with pytest.raises(TrainingDataError, match=r"source 'odd': expected a soft prompt of shape \[P, hidden\] = "
                                                r"\[4, 64\]"):
        train_subspace(backbone, [*sources, odd], HP, 0, lambda e: None)
    wide = SubspaceSource("wide", torch.zeros(NUM_TOKENS, HIDDEN * 2), sources[0].train, [])
    with pytest.raises(TrainingDataError, match="found \\[4, 128\\]"):
        train_subspace(backbone, [sources[0], wide], HP, 0, lambda e: None)
    with pytest.raises(TrainingDataError, match="at least 2 source tasks"):
        train_subspace(backbone, sources[:1], HP, 0, lambda e: None)


def test_ist_refuses_a_wrong_subspace_version(tiny_training_backbone, msf):
    backbone = tiny_training_backbone
    subspace = decode_artifact(msf[1].artifact, expected_fingerprint=None, limits=backbone.limits, arch=None)
    train, _ = task_examples(backbone, "word_size", num_train=4)
    with pytest.raises(TrainingDataError, match="subspace_version"):
        train_intrinsic(backbone, subspace, "0" * 64, train, [], HP, 0, lambda e: None)
