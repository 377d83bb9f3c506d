"""The training commands of `prefixserve`: `worker` (consume the job queue), `train` (one job, here and
now, with a progress bar) and `jobs list|show` (read the queue).

cli.py passes its engine flags and store factory in, so this module does not import cli.py; torch
and the trainers are imported inside the commands, so `prefixserve --help` stays fast. `train` runs
its job through a private SqliteJobQueue and the same Worker as `prefixserve worker`: one code path."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from prefixserve.errors import PrefixServeError, TrainingDataError
from prefixserve.training.queue import DEFAULT_VISIBILITY_TIMEOUT_S, Claim, JobQueue
from prefixserve.training.spec import (
    BOTTLENECK_ACTIVATIONS,
    BOTTLENECK_PLACEMENTS,
    DEFAULT_LEARNING_RATES,
    ProgressEvent,
)
from prefixserve.training.sqlite_queue import SqliteJobQueue

DEFAULT_QUEUE_DB = "~/.local/share/prefixserve/jobs.sqlite3"
DEFAULT_WORK_DIR = "~/.local/share/prefixserve/work"

EnvFn = Callable[[str, "str | None", str], "str | None"]


def _plain_env(name: str, default: str | None, doc: str) -> str | None:
    return os.environ.get(name, default)


# `train` flag -> hyperparameter (flags left unset keep the spec's defaults)
_HP_FLAGS = ("steps", "learning_rate", "batch_size", "max_length", "num_virtual_tokens", "rank", "alpha", "init",
             "init_text", "encoder", "intrinsic_dim", "eval_every", "warmup_steps", "decay", "bottleneck_size",
             "bottleneck_placements", "bottleneck_activation")


def add_queue_args(parser: argparse.ArgumentParser, env: EnvFn) -> None:
    """--queue-db and --visibility-timeout: the job queue (also used by `serve` for the job endpoints)."""
    parser.add_argument("--queue-db", default=env("PREFIXSERVE_QUEUE_DB", DEFAULT_QUEUE_DB,
                                                  "the SQLite training job queue without Redis (--queue-db)"),
                        help="the SQLite job queue, used when no Redis URL is given (default: %(default)s)")
    parser.add_argument("--visibility-timeout", type=float, default=DEFAULT_VISIBILITY_TIMEOUT_S,
                        help="seconds after a worker's last heartbeat before its job is re-claimed")


def add_training_commands(sub: argparse._SubParsersAction, *,
                          add_engine_args: Callable[[argparse.ArgumentParser], None],
                          make_store: Callable[[argparse.Namespace], object], env: EnvFn = _plain_env) -> None:
    """Add `worker`, `train` and `jobs {list,show}`; `add_engine_args` adds --model/--cache-dir/--redis-url/
    --store-dir/..., `make_store(args)` opens the adapter store they name, `env(name, default, doc)` reads
    (and records) an environment setting."""
    queue_args = argparse.ArgumentParser(add_help=False)
    add_queue_args(queue_args, env)

    worker = sub.add_parser("worker", parents=[queue_args], help="train the jobs of the queue (Redis or SQLite)")
    add_engine_args(worker)
    worker.add_argument("--work-dir", default=env("PREFIXSERVE_WORK_DIR", DEFAULT_WORK_DIR,
                                                  "checkpoints of the worker's running jobs (--work-dir)"),
                        help="checkpoints of running jobs (a re-claimed job resumes from its checkpoint)")
    worker.add_argument("--max-jobs", type=int, default=None, help="exit after this many jobs")
    worker.add_argument("--worker-id", default=None, help="the consumer name (default: host-pid)")
    worker.set_defaults(func=lambda args: cmd_worker(args, make_store))

    train = sub.add_parser("train", help="train one task here and now, with a progress bar, and publish it")
    add_engine_args(train)
    train.add_argument("--task", required=True, help="the task name to publish to (as the default tenant)")
    train.add_argument("--kind", required=True, help="prefix, prompt, ptuning, lora, ia3, bitfit, adapter, "
                       "subspace or intrinsic")
    data = train.add_mutually_exclusive_group()
    data.add_argument("--data", type=Path, help="JSONL examples: {\"input\", \"output\"} or {\"messages\"} per line")
    data.add_argument("--suite-task", help="a built-in task of prefixserve.training.tasks")
    train.add_argument("--instruction", help="what you would otherwise write in the prompt: scored as a baseline "
                       "the task must beat, and the text a soft prompt starts from")
    train.add_argument("--steps", type=int)
    train.add_argument("--learning-rate", type=float, help="default: the kind's (" + ", ".join(
        f"{kind} {rate:g}" for kind, rate in DEFAULT_LEARNING_RATES.items()) + ")")
    train.add_argument("--warmup-steps", type=int, help="steps of linear learning-rate warm-up (default: prefix "
                       "a fifth of the steps, other kinds 0)")
    train.add_argument("--decay", choices=["constant", "cosine"], help="after warm-up (default: prefix cosine, "
                       "other kinds constant)")
    train.add_argument("--batch-size", type=int)
    train.add_argument("--max-length", type=int, help="prompt + output tokens of one example")
    train.add_argument("--num-virtual-tokens", type=int)
    train.add_argument("--rank", type=int)
    train.add_argument("--alpha", type=float)
    train.add_argument("--init", choices=["text", "random"])
    train.add_argument("--init-text")
    train.add_argument("--encoder", choices=["mlp", "lstm"])
    train.add_argument("--intrinsic-dim", type=int)
    train.add_argument("--bottleneck-size", type=int, help="adapter: units of each bottleneck (default 16)")
    train.add_argument("--bottleneck-placements", nargs="+", choices=list(BOTTLENECK_PLACEMENTS),
                       help="adapter: after attention, the MLP or both, in that order (default both, Houlsby's; "
                       "mlp alone is Pfeiffer's)")
    train.add_argument("--bottleneck-activation", choices=list(BOTTLENECK_ACTIVATIONS),
                       help="adapter: between down and up (default relu)")
    train.add_argument("--subspace", help="intrinsic: the subspace task that decodes the intrinsic vector")
    train.add_argument("--source", action="append", default=[], metavar="TASK=SUITE_TASK|FILE.jsonl",
                       help="subspace: a published prompt task and its data (repeatable)")
    train.add_argument("--eval-every", type=int)
    train.add_argument("--eval-fraction", type=float, default=0.2)
    train.add_argument("--seed", type=int, default=0)
    train.set_defaults(func=lambda args: cmd_train(args, make_store))

    jobs = sub.add_parser("jobs", help="list or show training jobs of the queue")
    jobs_sub = jobs.add_subparsers(dest="jobs_command", required=True)
    redis_arg = argparse.ArgumentParser(add_help=False)
    redis_arg.add_argument("--redis-url", default=env("REDIS_URL", None, "Redis for tasks, tenants and jobs "
                                                      "(--redis-url)"))
    listing = jobs_sub.add_parser("list", parents=[queue_args, redis_arg], help="a tenant's jobs, newest first")
    listing.add_argument("--tenant", default="default")
    listing.add_argument("--limit", type=int, default=20)
    listing.set_defaults(func=cmd_jobs_list)
    show = jobs_sub.add_parser("show", parents=[queue_args, redis_arg], help="one job's record as JSON")
    show.add_argument("job_id")
    show.set_defaults(func=cmd_jobs_show)


def make_queue(args: argparse.Namespace) -> JobQueue:
    """RedisJobQueue on the store's Redis when a URL is given, else the SQLite file."""
    if getattr(args, "redis_url", None):
        from prefixserve.training.redis_queue import RedisJobQueue

        return RedisJobQueue(args.redis_url, visibility_timeout_s=args.visibility_timeout)
    return SqliteJobQueue(Path(args.queue_db).expanduser(), visibility_timeout_s=args.visibility_timeout)


def load_backbone(args: argparse.Namespace):
    from prefixserve.config import AdapterLimits, ModelConfig
    from prefixserve.training.backbone import load_training_backbone

    limits = AdapterLimits(**{name: getattr(args, name) for name in ("max_lora_rank", "max_bottleneck_size")
                              if hasattr(args, name)})
    model = ModelConfig(source=args.model, cache_dir=args.cache_dir, device=getattr(args, "device", "cpu"))
    return load_training_backbone(model, limits)


def cmd_worker(args: argparse.Namespace, make_store: Callable) -> None:
    """Runs until SIGTERM/SIGINT: the job in training is given back to the queue (see worker.py)."""
    import signal
    import socket
    import threading

    from prefixserve.training.worker import Worker

    queue, store = make_queue(args), make_store(args)
    try:
        worker = Worker(queue, store, load_backbone(args), Path(args.work_dir).expanduser(),
                        args.worker_id or f"{socket.gethostname()}-{os.getpid()}")
        stop = threading.Event()  # handlers after the slow backbone load, so Ctrl-C during it just exits
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
        worker.run(stop=stop, max_jobs=args.max_jobs)
    finally:
        queue.close()
        store.close()


def cmd_train(args: argparse.Namespace, make_store: Callable) -> None:
    import tempfile

    from prefixserve.training.spec import parse_job_spec
    from prefixserve.training.worker import Worker

    spec = parse_job_spec(train_spec_dict(args))  # bad flags fail before the backbone loads
    backbone, store = load_backbone(args), make_store(args)
    try:
        with tempfile.TemporaryDirectory(prefix="prefixserve-train-") as tmp:
            queue = _ProgressBarQueue(Path(tmp) / "jobs.sqlite3")
            try:
                job = queue.submit(spec, "default")
                Worker(queue, store, backbone, Path(tmp) / "work", "train").run(max_jobs=1)
                record = queue.get(job.id)
            finally:
                queue.close()
    finally:
        store.close()
    if record.error is not None:
        raise PrefixServeError(record.error["message"])
    print(json.dumps({"task": args.task, "version": record.version, "metrics": record.metrics}, indent=2))


def train_spec_dict(args: argparse.Namespace) -> dict:
    """The job spec of `prefixserve train`'s flags, with task names in the default tenant's namespace."""
    from prefixserve.training.data import read_jsonl

    hyperparameters = {name: getattr(args, name) for name in _HP_FLAGS if getattr(args, name) is not None}
    if args.subspace:
        hyperparameters["subspace"] = engine_task(args.subspace)
    raw = {"task": engine_task(args.task), "kind": args.kind, "hyperparameters": hyperparameters,
           "eval_fraction": args.eval_fraction, "seed": args.seed}
    if args.data is not None:
        raw["examples"] = read_jsonl(args.data)
    if args.suite_task is not None:
        raw["suite_task"] = args.suite_task
    if args.instruction is not None:
        raw["instruction"] = args.instruction
    sources = []
    for text in args.source:
        task, sep, data = text.partition("=")
        if not sep or not task or not data:
            raise TrainingDataError(f"--source expects TASK=SUITE_TASK or TASK=FILE.jsonl, found {text!r}")
        is_file = data.endswith(".jsonl")
        sources.append({"task": engine_task(task), **({"examples": read_jsonl(Path(data))} if is_file else
                                                      {"suite_task": data})})
    if sources:
        raw["sources"] = sources
    return raw


def engine_task(task: str) -> str:
    """The default tenant's task as the engine names it (engine/tenancy.py's rule)."""
    from prefixserve.engine.tenancy import DEFAULT_TENANT, tenant_task

    name = tenant_task(DEFAULT_TENANT, task, backbone_name="")
    if name is None:
        raise TrainingDataError(f"expected a task name to train, found {task!r}, which names the plain backbone")
    return name


def cmd_jobs_list(args: argparse.Namespace) -> None:
    queue = make_queue(args)
    try:
        records = queue.list_jobs(args.tenant, args.limit)
    finally:
        queue.close()
    print(f"{'JOB':32}  {'STATUS':9}  {'KIND':9}  {'STEP':>11}  {'VERSION':12}  TASK")
    for r in records:
        step = f"{r.progress['step']}/{r.progress['total_steps']}" if r.progress else "-"
        print(f"{r.id:32}  {r.status.value:9}  {r.kind:9}  {step:>11}  {(r.version or '-')[:12]:12}  {r.task}")


def cmd_jobs_show(args: argparse.Namespace) -> None:
    queue = make_queue(args)
    try:
        print(json.dumps(queue.get(args.job_id).to_dict(), indent=2))
    finally:
        queue.close()


class _ProgressBarQueue(SqliteJobQueue):
    """`train`'s private queue: also draws every progress event on a tqdm bar (step, loss, ETA, eval metrics)."""

    _bar = None

    def progress(self, claim: Claim, event: ProgressEvent) -> None:
        super().progress(claim, event)
        from tqdm import tqdm

        if self._bar is None:
            self._bar = tqdm(total=event.total_steps, unit="step", desc=claim.spec.task, file=sys.stderr)
        self._bar.update(event.step - self._bar.n)
        metrics = {name: f"{value:.3f}" for name, value in (event.eval_metrics or {}).items()}
        self._bar.set_postfix({"loss": f"{event.loss:.4f}", **metrics})
        if event.step >= event.total_steps:  # before the worker logs the publication
            self._bar.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        super().close()
