"""parse_job_spec: every bad field is refused with a message naming it; a valid spec round-trips
through to_dict -> JSON -> parse_job_spec (how the queues store jobs)."""

import json

import pytest

from prefixserve.errors import TrainingDataError
from prefixserve.training.spec import (
    BOTTLENECK_ACTIVATIONS,
    BOTTLENECK_PLACEMENTS,
    DEFAULT_LEARNING_RATES,
    MAX_BOTTLENECK_SIZE,
    MAX_EXAMPLE_CHARS,
    Hyperparameters,
    JobSpec,
    parse_job_spec,
)

EXAMPLES = [{"input": "great", "output": "positive"}, {"input": "awful", "output": "negative"}]


def valid(**changes) -> dict:
    return {"task": "acme/sentiment", "kind": "prompt", "examples": EXAMPLES, **changes}


@pytest.mark.parametrize("raw, names", [
    ([1, 2], "expected a job spec object, found list"),
    (valid(colour="red"), "found unknown ['colour']"),
    (valid(task=""), "'task'"),
    (valid(task=7), "'task'"),
    (valid(kind="dora"), "'kind'"),
    (valid(examples="not a list"), "'examples'"),
    (valid(examples=[{"input": "x"}]), "examples[0]"),
    (valid(examples=[EXAMPLES[0], {"input": "x", "output": ""}]), "examples[1]: expected a non-empty 'output'"),
    (valid(examples=[{"input": "x" * (MAX_EXAMPLE_CHARS + 1), "output": "y"}]), "examples[0]: expected 'input'"),
    (valid(examples=[{"messages": [{"role": "user", "content": "hi"}]}]), "examples[0]: expected 'messages'"),
    (valid(examples=[{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}]),
     "examples[0]: expected the last message to be a non-empty assistant turn"),
    (valid(eval_examples=[{"output": "x"}]), "eval_examples[0]"),
    (valid(suite_task=3, examples=[]), "'suite_task'"),
    (valid(suite_task="made_up_yes_no"), "either 'examples' or 'suite_task', found both"),
    (valid(examples=[]), "'examples' (a non-empty list) or 'suite_task', found neither"),
    (valid(eval_fraction=1.0), "'eval_fraction'"),
    (valid(eval_fraction="0.2"), "'eval_fraction'"),
    (valid(seed=-1), "'seed'"),
    (valid(seed=True), "'seed'"),
    (valid(hyperparameters=[]), "'hyperparameters'"),
    (valid(hyperparameters={"stepz": 3}), "found unknown ['stepz']"),
    (valid(hyperparameters={"steps": 0}), "hyperparameters.steps"),
    (valid(hyperparameters={"steps": True}), "hyperparameters.steps"),
    (valid(hyperparameters={"learning_rate": float("nan")}), "hyperparameters.learning_rate"),
    (valid(hyperparameters={"learning_rate": 11}), "hyperparameters.learning_rate"),
    (valid(hyperparameters={"batch_size": 0}), "hyperparameters.batch_size"),
    (valid(hyperparameters={"max_length": 1}), "hyperparameters.max_length"),
    (valid(hyperparameters={"init": "zeros"}), "hyperparameters.init"),
    (valid(hyperparameters={"decay": "linear"}), "hyperparameters.decay 'constant', 'cosine' or null"),
    (valid(hyperparameters={"warmup_steps": -1}), "hyperparameters.warmup_steps 0..100000 or null"),
    (valid(hyperparameters={"init_text": ""}), "hyperparameters.init_text"),
    (valid(hyperparameters={"encoder": "gru"}), "hyperparameters.encoder"),
    (valid(hyperparameters={"rank": 1000}), "hyperparameters.rank"),
    (valid(hyperparameters={"targets": []}), "hyperparameters.targets"),
    (valid(hyperparameters={"targets": [1]}), "hyperparameters.targets"),
    (valid(hyperparameters={"num_virtual_tokens": 0}), "hyperparameters.num_virtual_tokens"),
    (valid(kind="intrinsic"), "hyperparameters.subspace"),
    (valid(sources=[{"task": "a/b", "examples": EXAMPLES}]), "'sources' only for kind 'subspace'"),
    ({"task": "t/s", "kind": "subspace"}, "expected a subspace job to have 'sources'"),
    ({"task": "t/s", "kind": "subspace", "sources": [{"task": "a/b"}]}, "sources[0]"),
    ({"task": "t/s", "kind": "subspace", "sources": [{"task": "a/b", "examples": []}]}, "sources[0]"),
    ({"task": "t/s", "kind": "subspace", "sources": [{"task": "a/b", "suite_task": "made_up_yes_no"},
                                                     {"task": "a/c", "examples": [{"input": 1, "output": "x"}]}]},
     "sources[1].examples[0]"),
])
def test_bad_field_is_named(raw, names):
    with pytest.raises(TrainingDataError) as e:
        parse_job_spec(raw)
    assert names in e.value.message
    assert e.value.status_code == 400


@pytest.mark.parametrize("raw", [
    valid(eval_examples=EXAMPLES[:1], eval_fraction=0.0, seed=7,
          hyperparameters={"steps": 5, "learning_rate": 0.1, "init_text": "Classify:", "targets": ["q_proj"]}),
    {"task": "acme/colors", "kind": "lora", "suite_task": "made_up_color", "hyperparameters": {"rank": 4}},
    {"task": "acme/sub", "kind": "subspace", "sources": [{"task": "acme/a", "suite_task": "made_up_color"},
                                                         {"task": "acme/b", "examples": EXAMPLES}]},
    {"task": "acme/z", "kind": "intrinsic", "suite_task": "word_size", "hyperparameters": {"subspace": "acme/sub"}},
    {"task": "acme/s", "kind": "ia3", "suite_task": "word_size",
     "hyperparameters": {"ia3_targets": ["up_proj", "q_proj"], "ia3_feedforward": ["up_proj"]}},
    {"task": "acme/b", "kind": "bitfit", "suite_task": "word_size", "hyperparameters": {"bitfit_targets": ["o_proj"]}},
    {"task": "acme/a", "kind": "adapter", "suite_task": "word_size",
     "hyperparameters": {"bottleneck_size": 64, "bottleneck_placements": ["mlp"], "bottleneck_activation": "silu"}},
])
def test_valid_spec_round_trips_through_json(raw):
    spec = parse_job_spec(raw)
    again = parse_job_spec(json.loads(json.dumps(spec.to_dict())))
    assert again == spec
    assert isinstance(again.hyperparameters, Hyperparameters) and isinstance(again.hyperparameters.targets, tuple)


def test_defaults():
    spec = parse_job_spec(valid())
    assert spec == JobSpec(task="acme/sentiment", kind="prompt", examples=tuple(EXAMPLES),
                           hyperparameters=Hyperparameters(learning_rate=DEFAULT_LEARNING_RATES["prompt"],
                                                           warmup_steps=0, decay="constant"))


@pytest.mark.parametrize("kind", ["prompt", "ptuning", "prefix", "lora", "ia3", "bitfit", "adapter", "intrinsic"])
def test_a_spec_without_a_rate_gets_its_kinds_and_keeps_a_given_one(kind):
    extra = {"subspace": "acme/sub"} if kind == "intrinsic" else {}
    assert parse_job_spec(valid(kind=kind, hyperparameters=extra)).hyperparameters.learning_rate == \
        DEFAULT_LEARNING_RATES[kind]
    given = parse_job_spec(valid(kind=kind, hyperparameters={"learning_rate": 0.5, **extra}))
    assert given.hyperparameters.learning_rate == 0.5
    assert Hyperparameters(learning_rate=0.5).with_kind_defaults(kind).learning_rate == 0.5


@pytest.mark.parametrize("kind, warmup_steps, decay", [("prefix", 20, "cosine"), ("prompt", 0, "constant"),
                                                       ("lora", 0, "constant"), ("ia3", 0, "constant"),
                                                       ("bitfit", 0, "constant"), ("adapter", 0, "constant")])
def test_a_spec_without_a_schedule_gets_its_kinds_and_keeps_a_given_one(kind, warmup_steps, decay):
    hp = parse_job_spec(valid(kind=kind, hyperparameters={"steps": 100})).hyperparameters
    assert (hp.warmup_steps, hp.decay) == (warmup_steps, decay)
    given = parse_job_spec(valid(kind=kind, hyperparameters={"steps": 100, "warmup_steps": 7, "decay": "constant"}))
    assert (given.hyperparameters.warmup_steps, given.hyperparameters.decay) == (7, "constant")


def ia3(**hyperparameters) -> dict:
    return valid(kind="ia3", hyperparameters=hyperparameters)


@pytest.mark.parametrize("raw, message", [
    (ia3(ia3_targets=[]), "expected hyperparameters.ia3_targets a non-empty list of distinct projection names, "
                          "found []"),
    (ia3(ia3_targets="k_proj"), "expected hyperparameters.ia3_targets a non-empty list"),
    (ia3(ia3_targets=["k_proj", "k_proj"]), "expected hyperparameters.ia3_targets a non-empty list of distinct"),
    (ia3(ia3_targets=["k_proj", 3]), "expected hyperparameters.ia3_targets a non-empty list"),
    (ia3(ia3_targets=["k_proj", "lm_head"]), "expected hyperparameters.ia3_targets among ['q_proj', 'k_proj', "
                                             "'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'], found "
                                             "['lm_head']"),
    (ia3(ia3_feedforward=["mlp.down_proj"]), "expected hyperparameters.ia3_feedforward among ['q_proj'"),
    (ia3(ia3_feedforward=["down_proj", "down_proj"]), "expected hyperparameters.ia3_feedforward a list of distinct"),
    (ia3(ia3_targets=["k_proj", "v_proj"], ia3_feedforward=["v_proj", "up_proj"]),
     "expected hyperparameters.ia3_feedforward to be among ia3_targets ['k_proj', 'v_proj'], found ['up_proj'] "
     "outside them"),
    # The default feedforward projection must be a target too: a client dropping it is told how to say none.
    (ia3(ia3_targets=["q_proj", "v_proj"]), "found ['down_proj'] outside them (its default is ['down_proj']; [] "
                                            "scales only outputs)"),
])
def test_ia3_projections_are_ones_the_server_scales(raw, message):
    with pytest.raises(TrainingDataError) as e:
        parse_job_spec(raw)
    assert message in e.value.message and e.value.status_code == 400


def test_ia3_defaults_are_peft_s_for_llama_and_other_kinds_ignore_them():
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING,
        TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING,
    )

    hp = parse_job_spec(ia3()).hyperparameters
    assert list(hp.ia3_targets) == TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING["llama"]
    assert list(hp.ia3_feedforward) == TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING["llama"]
    only_outputs = parse_job_spec(ia3(ia3_targets=["q_proj"], ia3_feedforward=[])).hyperparameters
    assert (only_outputs.ia3_targets, only_outputs.ia3_feedforward) == (("q_proj",), ())
    # What only an ia3 job reads is not an error in another kind's spec (as lora's rank is not in a prompt's).
    assert parse_job_spec(valid(hyperparameters={"ia3_targets": ["q_proj"]})).hyperparameters.ia3_targets == \
        ("q_proj",)


def bitfit(**hyperparameters) -> dict:
    return valid(kind="bitfit", hyperparameters=hyperparameters)


@pytest.mark.parametrize("raw, message", [
    (bitfit(bitfit_targets=[]), "expected hyperparameters.bitfit_targets a non-empty list of distinct projection "
                                "names, found []"),
    (bitfit(bitfit_targets="o_proj"), "expected hyperparameters.bitfit_targets a non-empty list of distinct projection "
                                      "names, found 'o_proj'"),
    (bitfit(bitfit_targets=["o_proj", "o_proj"]), "expected hyperparameters.bitfit_targets a non-empty list of "
                                                  "distinct projection names, found ['o_proj', 'o_proj']"),
    (bitfit(bitfit_targets=["o_proj", None]), "expected hyperparameters.bitfit_targets a non-empty list"),
    (bitfit(bitfit_targets=[f"p{i}" for i in range(8)]), "expected hyperparameters.bitfit_targets a non-empty list"),
    # peft module paths and the head are not projections the server shifts
    (bitfit(bitfit_targets=["self_attn.q_proj", "up_proj", "lm_head"]),
     "expected hyperparameters.bitfit_targets among ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', "
     "'down_proj'], found ['self_attn.q_proj', 'lm_head']"),
])
def test_bitfit_projections_are_ones_the_server_shifts(raw, message):
    with pytest.raises(TrainingDataError) as e:
        parse_job_spec(raw)
    assert message in e.value.message and e.value.status_code == 400


def test_bitfit_defaults_to_every_projection_and_other_kinds_ignore_it():
    from prefixserve.adapters_store.kinds import LORA_TARGETS

    assert parse_job_spec(bitfit()).hyperparameters.bitfit_targets == LORA_TARGETS
    assert parse_job_spec(bitfit(bitfit_targets=["down_proj", "q_proj"])).hyperparameters.bitfit_targets == \
        ("down_proj", "q_proj")
    # What only a bitfit job reads is not an error in another kind's spec (as ia3_targets is not in a prompt's).
    assert parse_job_spec(valid(hyperparameters={"bitfit_targets": ["o_proj"]})).hyperparameters.bitfit_targets == \
        ("o_proj",)


def adapter(**hyperparameters) -> dict:
    return valid(kind="adapter", hyperparameters=hyperparameters)


@pytest.mark.parametrize("raw, message", [
    (adapter(bottleneck_size=0), "expected hyperparameters.bottleneck_size 1..64, found 0"),
    (adapter(bottleneck_size=65), "expected hyperparameters.bottleneck_size 1..64, found 65"),
    (adapter(bottleneck_size=16.0), "expected hyperparameters.bottleneck_size 1..64, found 16.0"),
    (adapter(bottleneck_size=True), "expected hyperparameters.bottleneck_size 1..64, found True"),
    (adapter(bottleneck_placements=[]), "expected hyperparameters.bottleneck_placements a non-empty sorted list of "
                                        "distinct placements among ['attention', 'mlp'], found []"),
    (adapter(bottleneck_placements="mlp"), "expected hyperparameters.bottleneck_placements a non-empty sorted list "
                                           "of distinct placements among ['attention', 'mlp'], found 'mlp'"),
    (adapter(bottleneck_placements=["mlp", "attention"]), "expected hyperparameters.bottleneck_placements a "
                                                          "non-empty sorted list of distinct placements among "
                                                          "['attention', 'mlp'], found ['mlp', 'attention']"),
    (adapter(bottleneck_placements=["mlp", "mlp"]), "expected hyperparameters.bottleneck_placements a non-empty "
                                                    "sorted list of distinct placements"),
    (adapter(bottleneck_placements=["attention", "ffn"]), "expected hyperparameters.bottleneck_placements a "
                                                          "non-empty sorted list"),
    (adapter(bottleneck_placements=["mlp", None]), "expected hyperparameters.bottleneck_placements a non-empty"),
    (adapter(bottleneck_activation="swish"), "expected hyperparameters.bottleneck_activation one of 'gelu', 'relu', "
                                             "'silu', 'tanh', found 'swish'"),
    (adapter(bottleneck_activation="GELU"), "expected hyperparameters.bottleneck_activation one of"),
    (adapter(bottleneck_activation=None), "expected hyperparameters.bottleneck_activation one of"),
])
def test_adapter_bottlenecks_are_ones_the_server_applies(raw, message):
    with pytest.raises(TrainingDataError) as e:
        parse_job_spec(raw)
    assert message in e.value.message and e.value.status_code == 400


def test_adapter_defaults_to_houlsby_and_its_names_are_the_kinds():
    from prefixserve.adapters_store.kinds.bottleneck import ACTIVATIONS, PLACEMENTS
    from prefixserve.config import AdapterLimits

    # spec.py repeats them (it does without torch): they must stay the kind's own
    assert (BOTTLENECK_PLACEMENTS, BOTTLENECK_ACTIVATIONS) == (PLACEMENTS, ACTIVATIONS)
    assert AdapterLimits().max_bottleneck_size == MAX_BOTTLENECK_SIZE
    hp = parse_job_spec(adapter()).hyperparameters
    assert (hp.bottleneck_size, hp.bottleneck_placements, hp.bottleneck_activation) == (16, ("attention", "mlp"),
                                                                                        "relu")
    assert hp.learning_rate == DEFAULT_LEARNING_RATES["adapter"]
    pfeiffer = parse_job_spec(adapter(bottleneck_placements=["mlp"], bottleneck_size=1)).hyperparameters
    assert (pfeiffer.bottleneck_placements, pfeiffer.bottleneck_size) == (("mlp",), 1)
    # What only an adapter job reads is not an error in another kind's spec (its values are checked all the same).
    assert parse_job_spec(valid(hyperparameters={"bottleneck_size": 4})).hyperparameters.bottleneck_size == 4
