"""Task quality on SmolLM2: greedy exact match on each task's eval split, trained per task and kind
(prompt, prefix, lora, ia3, bitfit, adapter through the real trainers) against what a user could do with the plain
backbone instead (prefixserve.training.baselines, as every training job reports them): the bare prompt, the
task's instruction in the prompt, the instruction and 4 training examples in the prompt, and the
training split's majority answer. Lift is over the best of them. Plus Intrinsic Prompt Tuning: prompt
tuning on the seen tasks feeds MSF; IST on the HELD_OUT tasks (fixed before any run). Recovery = (IPT
acc - zero-shot) / (prompt tuning acc - zero-shot), the paper's measure: for held-out tasks IPT is
IST's z; for seen tasks it is the subspace's reconstruction of the task's own prompt. Its curve: one
MSF + IST per --intrinsic-dim over every seen task, and per --num-seen over nested subsets of them.

  --quick   2 near-chance tasks, prompt + lora, few steps: a few minutes on a 2-core CPU.
  default   every near-chance task for prompt/prefix/lora/ia3/bitfit/adapter (narrow with --tasks / --peft-tasks);
            IPT with MSF on every other suite task (prompt-tuned first) and IST on the HELD_OUT tasks.
  --kinds ipt --intrinsic-dim 5,16,64,250 --num-seen 8,16,21   the IPT curves alone.

Trained prompt/prefix/lora/ia3/bitfit/adapter artifacts are cached under --cache-dir (keyed by task, kind,
hyperparameters, seed, split sizes and backbone), so IPT settings can be re-run without re-training its sources.

Prints one JSON object last and appends to RESULTS.md."""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import append_results

from prefixserve.adapters_store.format import decode_artifact
from prefixserve.config import ModelConfig
from prefixserve.training.backbone import TrainingBackbone, load_training_backbone
from prefixserve.training.baselines import BASELINES, score_baselines
from prefixserve.training.bitfit import train_bitfit
from prefixserve.training.bottleneck import train_bottleneck
from prefixserve.training.data import JobData, encode_examples
from prefixserve.training.ipt import SubspaceSource, train_intrinsic, train_subspace
from prefixserve.training.spec import DEFAULT_LEARNING_RATES, Hyperparameters, ProgressEvent
from prefixserve.training.tasks import TASK_NAMES, build_task
from prefixserve.training.trainers import train_peft

QUICK_TASKS = ("word_size", "longer_word")
PEFT_KINDS = ("prefix", "lora", "ia3", "bitfit", "adapter")  # trained on --peft-tasks (prompt tuning also feeds IPT)
# Held out of MSF. As in the paper's split of tasks into seen and unseen ones, most held-out tasks share
# their output format with a seen task (FORMAT_SIBLINGS); two map onto label words no other task outputs,
# which a soft prompt must bring in itself (the suite's prompts carry no instruction): reported apart.
HELD_OUT = ("starts_with_vowel", "longer_word", "sentiment_negation", "restaurant_near", "made_up_fruit", "word_size")
FORMAT_SIBLINGS = {"starts_with_vowel": "made_up_yes_no", "longer_word": "alphabetical_first",
                   "sentiment_negation": "sentiment_polarity", "restaurant_near": "restaurant_area"}
# Tasks no kind learns on this backbone, measured (kept in the suite and the tables, not in the target).
UNLEARNABLE = {"length_parity": "parity of the letter count is not visible through BPE tokens: prompt, prefix and "
                                "LoRA all stay at 0.50-0.52, the majority answer (2026-12-03)"}
# The kinds' default rates (DEFAULT_LEARNING_RATES holds what worked here) and the shapes they were measured at.
_RATES = DEFAULT_LEARNING_RATES
HP = {"prompt": Hyperparameters(learning_rate=_RATES["prompt"], num_virtual_tokens=8),
      "prefix": Hyperparameters(learning_rate=_RATES["prefix"], num_virtual_tokens=8, encoder_hidden=128),
      "lora": Hyperparameters(learning_rate=_RATES["lora"], rank=8, targets=("q_proj", "v_proj")),
      "ia3": Hyperparameters(learning_rate=_RATES["ia3"]),  # peft's targets for Llama: k, v, down_proj's input
      "bitfit": Hyperparameters(learning_rate=_RATES["bitfit"]),  # biases on all seven projections
      "adapter": Hyperparameters(learning_rate=_RATES["adapter"]),  # Houlsby: size 16 after attention and the MLP
      "msf": Hyperparameters(learning_rate=_RATES["subspace"], intrinsic_dim=8, decoder_hidden=256, mse_weight=200.0),
      "ist": Hyperparameters(learning_rate=_RATES["intrinsic"])}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--tasks", help="comma-separated tasks for prompt/prefix/lora/ia3/bitfit/adapter (default: every "
                   "near-chance task)")
    p.add_argument("--peft-tasks", help="prefix, lora, ia3, bitfit and adapter only on these (default: --tasks)")
    p.add_argument("--kinds", default="prompt,prefix,lora,ia3,bitfit,adapter,ipt")
    p.add_argument("--steps", type=int, default=100, help="prompt/prefix/lora/ia3/bitfit/adapter steps")
    p.add_argument("--msf-steps", type=int, default=150)
    p.add_argument("--task-steps", default="", help="per-task prompt/prefix/lora/ia3/bitfit/adapter steps overriding "
                   "--steps, e.g. letter_count=300,word_position=200 (reported per task)")
    p.add_argument("--ist-steps", type=int, default=100)
    p.add_argument("--intrinsic-dim", default="8", help="comma-separated d: one MSF + IST per d over every seen "
                   "task (the recovery-vs-d curve); the first d is the table's")
    p.add_argument("--num-seen", default="", help="comma-separated numbers of MSF tasks (nested seeded subsets of "
                   "the seen tasks) for the recovery-vs-number-of-tasks curve, at the first --intrinsic-dim")
    p.add_argument("--prefix-lr", type=float, default=HP["prefix"].learning_rate)
    p.add_argument("--prefix-warmup-steps", type=int, default=HP["prefix"].warmup_steps,
                   help="default: the prefix kind's (a fifth of the steps)")
    p.add_argument("--prefix-decay", choices=["constant", "cosine"], default=HP["prefix"].decay,
                   help="default: the prefix kind's (DEFAULT_SCHEDULES)")
    p.add_argument("--msf-lr", type=float, default=HP["msf"].learning_rate)
    p.add_argument("--ist-lr", type=float, default=HP["ist"].learning_rate)
    p.add_argument("--held-out", default=",".join(HELD_OUT))
    p.add_argument("--seen", help="MSF's source tasks (default: every suite task not held out)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-train", type=int, default=256)
    p.add_argument("--num-eval", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default="~/.cache/prefixserve/task_quality", help="'' to train everything afresh")
    args = p.parse_args()
    args.intrinsic_dims = [int(d) for d in args.intrinsic_dim.split(",")]
    args.num_seen = [int(k) for k in args.num_seen.split(",") if k]
    args.task_steps = {name: int(steps) for name, steps in
                       (item.split("=", 1) for item in args.task_steps.split(",") if item)}
    if args.quick:
        args.tasks, args.kinds, args.steps, args.num_eval = ",".join(QUICK_TASKS), "prompt,lora", 40, 32
    return args


class Bench:
    """Tasks encoded once, zero-shot scores, and one timed training per (kind, task)."""

    def __init__(self, backbone: TrainingBackbone, args: argparse.Namespace):
        self.backbone, self.args, self.tasks = backbone, args, {}
        self.results: dict[str, dict] = {}

    def task(self, name: str):
        if name not in self.tasks:
            data = build_task(name, seed=self.args.seed, num_train=self.args.num_train, num_eval=self.args.num_eval)
            tok = self.backbone.tokenizer
            train, eval_ = encode_examples(tok, data.train, 128), encode_examples(tok, data.eval, 128)
            max_new = max(len(e.output_ids) for e in eval_) + 2
            self.tasks[name] = (data, train, eval_, max_new)

            def run() -> tuple[None, dict]:  # the plain backbone babbles to max_new: minutes a task on 2 cores
                scores = score_baselines(self.backbone, JobData(data.train, data.eval, data.instruction, data.labels),
                                         max_new)
                return None, {"metrics": scores.metrics, "best": scores.best, "skipped": scores.skipped}

            _, baselines = self.cached(f"baselines-{name}", ["baselines", name, max_new, BASELINES], run)
            scores = {b: round(baselines["metrics"][f"{b}_exact_match"], 4) for b in BASELINES
                      if f"{b}_exact_match" in baselines["metrics"]}
            self.results[name] = {"family": data.family, **scores, "best_baseline": baselines["best"],
                                  "best_baseline_acc": scores[baselines["best"]], "skipped": baselines["skipped"]}
            print(f"{name}: baselines {scores} ({baselines['seconds']:.0f}s)", flush=True)
        return self.tasks[name]

    def hp(self, kind: str, name: str, steps: int) -> Hyperparameters:
        return replace(HP[kind], steps=steps, batch_size=self.args.batch_size,
                       eval_max_new_tokens=self.task(name)[3])

    def train_peft(self, kind: str, name: str) -> bytes:
        """The trained artifact's bytes (from the cache when this very training ran before)."""
        data, train, eval_, _ = self.task(name)
        hp = self.hp(kind, name, self.args.task_steps.get(name, self.args.steps))

        def run() -> tuple[bytes, dict]:
            with tempfile.TemporaryDirectory() as work_dir:
                if kind == "bitfit":  # not a peft kind: its own trainer, the same loop
                    result = train_bitfit(self.backbone, train, eval_, hp, self.args.seed, lambda e: None,
                                          Path(work_dir), labels=data.labels)
                elif kind == "adapter":  # nor is this one
                    result = train_bottleneck(self.backbone, train, eval_, hp, self.args.seed, lambda e: None,
                                              Path(work_dir), labels=data.labels)
                else:
                    result = train_peft(self.backbone, kind, train, eval_, hp, self.args.seed, lambda e: None,
                                        Path(work_dir), init_text=data.instruction, labels=data.labels)
            return result.artifact, {"exact_match": result.metrics["exact_match"]}

        # The examples themselves are part of the key: a task suite change must not reuse old artifacts.
        examples = hashlib.sha256(json.dumps([data.train, data.eval], sort_keys=True).encode()).hexdigest()
        artifact, record = self.cached(f"{kind}-{name}", [kind, name, asdict(hp), examples], run)
        self.record(name, kind, record["exact_match"], record["seconds"], hp, cached=record["cached"])
        return artifact

    def cached(self, label: str, key: list, run) -> tuple[bytes | None, dict]:
        """`run() -> (artifact or None, record)`, timed, or its stored result when this very run happened before."""
        a = self.args
        folder = Path(a.cache_dir).expanduser() if a.cache_dir else None
        digest = hashlib.sha256(json.dumps([*key, a.seed, a.num_train, a.num_eval, self.backbone.fingerprint],
                                           sort_keys=True, default=list).encode()).hexdigest()[:16]
        path = folder / f"{label}-{digest}" if folder else None
        if path and path.with_suffix(".json").is_file():
            artifact = path.with_suffix(".safetensors")
            return (artifact.read_bytes() if artifact.is_file() else None,
                    {**json.loads(path.with_suffix(".json").read_text()), "cached": True})
        started = time.monotonic()
        artifact, record = run()
        record = {**record, "seconds": time.monotonic() - started}
        if path:
            folder.mkdir(parents=True, exist_ok=True)
            if artifact is not None:
                path.with_suffix(".safetensors").write_bytes(artifact)
            path.with_suffix(".json").write_text(json.dumps(record))
        return artifact, {**record, "cached": False}

    def record(self, name: str, kind: str, accuracy: float, seconds: float, hp: Hyperparameters,
               cached: bool = False) -> None:
        best = self.results[name]["best_baseline_acc"]
        self.results[name][kind] = {"acc": round(accuracy, 4), "lift": round(accuracy - best, 4),
                                    "seconds": round(seconds, 1), "steps": hp.steps, "lr": hp.learning_rate,
                                    **({"cached": True} if cached else {})}
        print(f"{name}: {kind} {accuracy:.3f} (lift over the best baseline {accuracy - best:+.3f}, {seconds:.0f}s"
              f"{', cached' if cached else ''})", flush=True)


def schedule(hp: Hyperparameters) -> dict:
    """The learning rate and, when not the default constant rate, its schedule."""
    shaped = hp.warmup_steps or hp.decay != "constant"
    return {"lr": hp.learning_rate, **({"warmup_steps": hp.warmup_steps, "decay": hp.decay} if shaped else {})}


def recovery(ipt: float, prompt: float, zero_shot: float) -> float | None:
    gain = prompt - zero_shot
    return round((ipt - zero_shot) / gain, 4) if gain > 0 else None


def run_ipt(bench: Bench, soft_prompts: dict[str, torch.Tensor], seen: list[str], held_out: list[str],
            intrinsic_dim: int) -> dict:
    """One MSF over `seen` at `intrinsic_dim`, then IST on each held-out task: the summary and, under
    "tasks", each task's IPT score (bench.results is left alone, so several runs can be compared)."""
    args, backbone = bench.args, bench.backbone
    sources = [SubspaceSource(name, soft_prompts[name], bench.task(name)[1], bench.task(name)[2]) for name in seen]
    hp = replace(bench.hp("msf", seen[0], args.msf_steps), intrinsic_dim=intrinsic_dim,
                 learning_rate=args.msf_lr, eval_max_new_tokens=max(bench.task(n)[3] for n in seen))

    def run() -> tuple[bytes, dict]:
        result = train_subspace(backbone, sources, hp, args.seed, _log(f"msf d={intrinsic_dim} seen={len(seen)}"))
        return result.artifact, {"metrics": result.metrics, "source_vectors": result.source_vectors}

    prompts_digest = hashlib.sha256(b"".join(soft_prompts[n].numpy().tobytes() for n in seen)).hexdigest()
    artifact, msf = bench.cached("subspace", ["msf", "with_source_vectors", seen, asdict(hp), prompts_digest], run)
    m = msf["metrics"]
    subspace = decode_artifact(artifact, expected_fingerprint=backbone.fingerprint, limits=backbone.limits,
                               arch=backbone.arch)
    tasks: dict[str, dict] = {}
    for name in seen:
        zero_shot, original = bench.results[name]["zero_shot"], m[f"{name}/exact_match_original"]
        recon = m[f"{name}/exact_match_reconstructed"]
        tasks[name] = {"ipt_seen": {"acc": round(recon, 4), "prompt_acc_same_eval": round(original, 4),
                                    "recovery": recovery(recon, original, zero_shot)}}
    for name in held_out:
        _, train, eval_, _ = bench.task(name)
        ist_hp = replace(bench.hp("ist", name, args.ist_steps), learning_rate=args.ist_lr)

        def run_ist(train=train, eval_=eval_, ist_hp=ist_hp, name=name) -> tuple[bytes, dict]:
            result = train_intrinsic(backbone, subspace, subspace.version, train, eval_, ist_hp, args.seed,
                                     _log(f"ist {name}"))
            return result.artifact, {"exact_match": result.metrics["exact_match"]}

        _, record = bench.cached(f"ist-{name}", ["ist", name, asdict(ist_hp), subspace.version], run_ist)
        r = bench.results[name]
        acc, sibling = record["exact_match"], FORMAT_SIBLINGS.get(name)
        tasks[name] = {"ipt_ist": {"acc": round(acc, 4), "lift": round(acc - r["best_baseline_acc"], 4),
                                   "seconds": round(record["seconds"], 1), "steps": ist_hp.steps,
                                   "lr": ist_hp.learning_rate, "recovery": recovery(acc, r["prompt"]["acc"],
                                                                                    r["zero_shot"]),
                                   "format_seen_in": sibling if sibling in seen else None}}
        print(f"{name}: IST d={intrinsic_dim} seen={len(seen)} {acc:.3f} (prompt tuning {r['prompt']['acc']:.3f})",
              flush=True)

    def gains(names: list[str], key: str, prompt_acc=lambda n: bench.results[n]["prompt"]["acc"]) -> dict:
        """Aggregate recovery (IPT gain summed over tasks / prompt tuning gain summed) and the per-task mean."""
        ipt_gain = sum(tasks[n][key]["acc"] - bench.results[n]["zero_shot"] for n in names)
        prompt_gain = sum(prompt_acc(n) - bench.results[n]["zero_shot"] for n in names)
        per_task = [tasks[n][key]["recovery"] for n in names if tasks[n][key]["recovery"] is not None]
        return {"tasks": names, "recovery": round(ipt_gain / prompt_gain, 4) if prompt_gain > 0 else None,
                "recovery_mean_per_task": round(sum(per_task) / len(per_task), 4) if per_task else None}

    shared = [n for n in held_out if tasks[n]["ipt_ist"]["format_seen_in"]]
    novel = [n for n in held_out if n not in shared]
    beats = [n for n in held_out if tasks[n]["ipt_ist"]["lift"] > 0]
    return {"intrinsic_dim": intrinsic_dim, "decoder_hidden": hp.decoder_hidden, "mse_weight": hp.mse_weight,
            "num_seen": len(seen), "num_held_out": len(held_out), "msf_steps": hp.steps, "msf_lr": hp.learning_rate,
            "msf_seconds": round(msf["seconds"], 1), "ist_steps": args.ist_steps, "ist_lr": args.ist_lr,
            "reconstruction_mse": round(m["reconstruction_mse"], 6),
            "prompt_mse_to_mean": round(float(_spread(sources)), 6),
            "seen": gains(seen, "ipt_seen", lambda n: tasks[n]["ipt_seen"]["prompt_acc_same_eval"]),
            "unseen": gains(held_out, "ipt_ist"),
            "unseen_format_seen": gains(shared, "ipt_ist") if shared else None,
            "unseen_novel_outputs": gains(novel, "ipt_ist") if novel else None,
            "unseen_beating_best_baseline": beats, "tasks": tasks}


def seen_subsets(seen: list[str], sizes: list[int], seed: int) -> list[list[str]]:
    """Nested proper subsets of the seen tasks for the recovery-vs-number-of-MSF-tasks curve: the first k
    of one seeded shuffle, so a larger subset holds every smaller one (sizes >= len(seen) are the full run)."""
    order = list(seen)
    random.Random(f"msf-subsets:{seed}").shuffle(order)
    return [[n for n in seen if n in order[:k]] for k in sorted(set(sizes)) if k < len(seen)]


def _log(what: str):
    def progress(event: ProgressEvent) -> None:
        print(f"{what}: step {event.step}/{event.total_steps} loss {event.loss:.4f} eta {event.eta_s:.0f}s", flush=True)

    return progress


def _spread(sources: list[SubspaceSource]) -> float:
    """MSE of the sources' mean prompt as their reconstruction: what a subspace must beat."""
    prompts = torch.stack([s.soft_prompt for s in sources])
    return (prompts - prompts.mean(0)).pow(2).mean()


def main() -> None:
    args = parse_args()
    HP["prefix"] = replace(HP["prefix"], learning_rate=args.prefix_lr, warmup_steps=args.prefix_warmup_steps,
                           decay=args.prefix_decay)
    torch.manual_seed(args.seed)
    kinds = args.kinds.split(",")
    near_chance = [n for n in TASK_NAMES if build_task(n, num_train=1, num_eval=1).near_chance]
    tasks = args.tasks.split(",") if args.tasks else near_chance
    peft_tasks = args.peft_tasks.split(",") if args.peft_tasks else tasks
    held_out = [n for n in args.held_out.split(",") if n] if "ipt" in kinds else []
    seen = [n for n in (args.seen.split(",") if args.seen else TASK_NAMES) if n not in held_out] \
        if "ipt" in kinds else []
    backbone = load_training_backbone(ModelConfig())
    bench = Bench(backbone, args)
    started = time.monotonic()
    soft_prompts = {}
    prompt_tasks = list(dict.fromkeys(tasks + seen + held_out)) if ("prompt" in kinds or "ipt" in kinds) else []
    for name in prompt_tasks:
        artifact = decode_artifact(bench.train_peft("prompt", name), expected_fingerprint=None,
                                   limits=backbone.limits, arch=None)
        soft_prompts[name] = artifact.tensors["embeddings"].float()  # [P, hidden]
    for kind in PEFT_KINDS:
        if kind in kinds:
            for name in peft_tasks:
                bench.train_peft(kind, name)
    curve = []
    if "ipt" in kinds:
        curve = [run_ipt(bench, soft_prompts, seen, held_out, d) for d in args.intrinsic_dims]
        curve += [run_ipt(bench, soft_prompts, subset, held_out, args.intrinsic_dims[0])
                  for subset in seen_subsets(seen, args.num_seen, args.seed)]
        for name, scores in curve[0]["tasks"].items():  # the table shows the first d over every seen task
            bench.results[name].update(scores)
    ipt = {k: v for k, v in curve[0].items() if k != "tasks"} if curve else None

    trained = [k for k in ("prompt", *PEFT_KINDS) if k in kinds]
    lifts = {k: {n: r[k]["lift"] for n, r in bench.results.items() if k in r} for k in trained}
    summary = {
        "benchmark": "task_quality", "backbone": "SmolLM2-135M-Instruct fp32", "quick": args.quick,
        "metric": "greedy exact match on each task's eval split", "num_eval": args.num_eval,
        "steps": args.steps, "task_steps": args.task_steps, "batch_size": args.batch_size,
        "seconds": round(time.monotonic() - started, 1),
        "hyperparameters": {k: schedule(replace(HP[k], steps=args.steps).with_kind_defaults(k)) for k in trained},
        "lift_over_best_baseline": "accuracy - max(zero_shot, instruction, k_shot, majority of train)",
        "min_lift": {k: min(v.values()) if v else None for k, v in lifts.items()},
        "mean_lift": {k: round(sum(v.values()) / len(v), 4) if v else None for k, v in lifts.items()},
        "tasks_not_lifted": {k: sorted(n for n, lift in v.items() if lift <= 0) for k, v in lifts.items()},
        "unlearnable": {n: why for n, why in UNLEARNABLE.items() if any(n in v for v in lifts.values())},
        "every_kind_lifts_every_learnable_task": all(lift > 0 for v in lifts.values() for n, lift in v.items()
                                                     if n not in UNLEARNABLE),
        "ipt": ipt, "ipt_curve": [_curve_point(run) for run in curve], "tasks": bench.results,
    }
    if curve:
        # The target: >= 65 % recovery over all held-out tasks (the paper's v1 level, d = 5).
        best = max(curve, key=lambda run: run["unseen"]["recovery"] or 0)
        summary["ipt_best_unseen_recovery"] = {"recovery": best["unseen"]["recovery"], "d": best["intrinsic_dim"],
                                               "num_seen": best["num_seen"]}
        summary["ipt_target_met"] = (best["unseen"]["recovery"] or 0) >= 0.65 and best["num_held_out"] >= 4
    append_results("task_quality" + (" (quick)" if args.quick else ""), results_lines(summary, trained))
    print(json.dumps(summary))


def results_lines(summary: dict, trained: list[str]) -> list[str]:
    cols = trained + (["ipt_seen", "ipt_ist"] if summary["ipt"] else [])
    lines = [f"{summary['backbone']}, {summary['metric']} ({summary['num_eval']} examples), {summary['steps']} steps "
             f"(per task: {summary['task_steps'] or 'none'}) x batch {summary['batch_size']} per adapter, "
             f"lr {summary['hyperparameters']}; "
             f"{summary['seconds']:.0f} s in all. Baselines: the plain backbone with the bare prompt, the task's "
             f"instruction in the prompt, the instruction and 4 training examples in the prompt, and the training "
             f"split's majority answer; best = the highest of them.", "",
             "| task | family | zero-shot | instruction | 4-shot | majority | " + " | ".join(cols) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(cols)]
    for name, r in summary["tasks"].items():
        cells = [f"{r[c]['acc']:.2f}" + (f" (rec {r[c]['recovery']})" if "recovery" in r[c] else "")
                 if c in r else "" for c in cols]
        base = [f"**{r[b]:.2f}**" if b == r["best_baseline"] else f"{r[b]:.2f}" if b in r else "skipped"
                for b in BASELINES]
        lines.append(f"| {name} | {r['family']} | " + " | ".join(base + cells) + " |")
    lines += ["", f"Lift over the best baseline, min / mean: {summary['min_lift']} / {summary['mean_lift']}; "
              f"tasks not lifted: {summary['tasks_not_lifted']}."]
    if summary["ipt"]:
        lines.append(f"IPT (the table's run): {json.dumps(summary['ipt'])}")
        lines += ["", "| d | MSF tasks | seen recovery | unseen recovery (all held out) | format seen | novel outputs "
                  "| held-out tasks over the best baseline |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {p['d']} | {p['num_seen']} | {p['seen']} | {p['unseen']} | {p['unseen_format_seen']} | "
                  f"{p['unseen_novel_outputs']} | {', '.join(p['beating_best_baseline']) or 'none'} |"
                  for p in summary["ipt_curve"]]
    return lines


def _curve_point(run: dict) -> dict:
    def rec(key: str):
        return run[key]["recovery"] if run[key] else None

    return {"d": run["intrinsic_dim"], "num_seen": run["num_seen"], "seen": rec("seen"), "unseen": rec("unseen"),
            "unseen_format_seen": rec("unseen_format_seen"), "unseen_novel_outputs": rec("unseen_novel_outputs"),
            "unseen_acc": {n: t["ipt_ist"]["acc"] for n, t in run["tasks"].items() if "ipt_ist" in t},
            "beating_best_baseline": run["unseen_beating_best_baseline"]}


if __name__ == "__main__":
    main()
