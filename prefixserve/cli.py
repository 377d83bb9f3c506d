"""The `prefixserve` command: the one place flags and environment become configuration."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from prefixserve.openmp import apply_openmp_defaults

# First: libgomp reads its settings once, when the imports below load torch (see prefixserve/openmp.py).
OPENMP_APPLIED = apply_openmp_defaults()

from prefixserve.adapters_store.store import DEFAULT_GC_GRACE_S, DEFAULT_MAX_HISTORY  # noqa: E402
from prefixserve.config import (  # noqa: E402
    EMBEDDED_BACKBONE,
    AdapterLimits,
    CacheConfig,
    EngineConfig,
    ModelConfig,
    SchedulerConfig,
)
from prefixserve.errors import ConfigError  # noqa: E402
from prefixserve.server.body_rate import DEFAULT_GRACE_S, DEFAULT_MIN_BYTES_PER_S  # noqa: E402

DEFAULT_TENANTS_FILE = "~/.local/share/prefixserve/tenants.json"
# Every environment variable the CLI reads -> what it sets (docs, Docker files and their test use it).
ENV_SETTINGS: dict[str, str] = {}


def env(name: str, default: str | None, doc: str) -> str | None:
    """Read a setting from the environment, recording it in ENV_SETTINGS."""
    ENV_SETTINGS[name] = doc
    return os.environ.get(name, default)


def _engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=env("PREFIXSERVE_MODEL", EMBEDDED_BACKBONE, "the backbone (--model)"),
                        help="'embedded' (SmolLM2-135M-Instruct) or a local Hugging Face model directory")
    parser.add_argument("--cache-dir", default=env("PREFIXSERVE_CACHE_DIR", ModelConfig.cache_dir,
                                                   "where the embedded backbone is dequantized (--cache-dir)"))
    parser.add_argument("--dtype", default=env("PREFIXSERVE_DTYPE", "float32", "weights and KV dtype (--dtype)"),
                        choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--device", default=env("PREFIXSERVE_DEVICE", "cpu", "torch device, e.g. cuda (--device)"))
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--page-size", type=int, default=CacheConfig.page_size)
    parser.add_argument("--num-pages", type=int, default=None)
    parser.add_argument("--max-num-seqs", type=int, default=SchedulerConfig.max_num_seqs)
    parser.add_argument("--max-num-batched-tokens", type=int, default=SchedulerConfig.max_num_batched_tokens)
    parser.add_argument("--max-prefill-tokens-with-decodes", type=int,
                        default=SchedulerConfig.max_prefill_tokens_with_decodes,
                        help="prompt tokens per step while others decode (steadier ITL, fewer tokens/s); "
                             "default and 0: no cap")
    parser.add_argument("--max-waiting", type=int, default=SchedulerConfig.max_waiting)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--redis-url", default=env("REDIS_URL", None, "Redis for tasks, tenants and jobs "
                                                   "(--redis-url)"),
                        help="serve tasks from this Redis (shared by replicas); default: a local directory")
    parser.add_argument("--store-dir", default=env("PREFIXSERVE_STORE_DIR", "~/.local/share/prefixserve/adapters",
                                                   "the local adapter store without Redis (--store-dir)"),
                        help="the local adapter store when no Redis URL is given")
    parser.add_argument("--task-history", type=int, default=DEFAULT_MAX_HISTORY,
                        help="versions the store keeps per task (rollback targets; they count against a "
                             "tenant's max_task_bytes); older ones are garbage-collected")
    parser.add_argument("--blob-gc-grace", type=float, default=DEFAULT_GC_GRACE_S,
                        help="seconds a version nothing retains stays in the store before it is deleted: longer "
                             "than --request-timeout, so a request that pinned it on any replica still finds it")
    parser.add_argument("--host-cache-mb", type=int, default=EngineConfig.host_cache_bytes >> 20,
                        help="decoded adapters kept in host memory")
    parser.add_argument("--lora-memory-mb", type=int, default=None,
                        help="device memory for resident LoRA weights, in MiB (an upper bound; default: room for "
                             "--max-num-seqs adapters of rank 16 on all seven projections); an adapter of rank r "
                             "takes r of the ranks it buys, whatever the other adapters' ranks")
    parser.add_argument("--max-lora-rank", type=int, default=AdapterLimits.max_lora_rank,
                        help="largest LoRA rank accepted at upload; the LoRA memory must hold one adapter of it")
    parser.add_argument("--max-bottleneck-size", type=int, default=AdapterLimits.max_bottleneck_size,
                        help="largest bottleneck size of an adapter-kind task accepted at upload")
    parser.add_argument("--adapter", action="append", default=[], metavar="TASK=PATH",
                        help="serve a task from the start: a PEFT adapter folder or .tar/.tar.gz/.zip of one, or a "
                             "prefixserve .safetensors artifact (repeatable)")


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=ModelConfig(source=args.model, dtype=args.dtype, device=args.device,
                          max_model_len=args.max_model_len, cache_dir=args.cache_dir),
        cache=CacheConfig(page_size=args.page_size, num_pages=args.num_pages),
        scheduler=SchedulerConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                                  max_prefill_tokens_with_decodes=args.max_prefill_tokens_with_decodes or None,
                                  max_waiting=args.max_waiting),
        num_threads=args.threads,
        adapters=AdapterLimits(max_lora_rank=args.max_lora_rank, max_bottleneck_size=args.max_bottleneck_size),
        lora_memory_bytes=None if args.lora_memory_mb is None else args.lora_memory_mb << 20,
        host_cache_bytes=args.host_cache_mb << 20,
    )


def adapter_store(args: argparse.Namespace):
    """RedisStore when a URL is given (replicas share tasks and hear each other's uploads), else LocalStore."""
    from pathlib import Path

    if args.redis_url:
        from prefixserve.adapters_store.redis_store import RedisStore

        return RedisStore(args.redis_url, max_history=args.task_history, gc_grace_s=args.blob_gc_grace)
    from prefixserve.adapters_store.local_store import LocalStore

    return LocalStore(Path(args.store_dir).expanduser(), max_history=args.task_history,
                      gc_grace_s=args.blob_gc_grace)


def quota_manager(args: argparse.Namespace):
    """Tenants' rate limits metered in the Redis of --redis-url when one is given (replicas share one
    budget per tenant), else in this process. A concurrency slot's lease outlasts the request time limit."""
    from prefixserve.server.quotas import QuotaManager

    if not args.redis_url:
        return QuotaManager()
    from prefixserve.server.redis_quotas import SLOT_LEASE_GRACE_S, RedisTenantMeter

    return QuotaManager(RedisTenantMeter(args.redis_url, slot_lease_s=args.request_timeout + SLOT_LEASE_GRACE_S))


def load_adapters(engine, specs: list[str]) -> None:
    """Register `TASK=PATH` adapters before serving; a bad one stops the start with its error."""
    from pathlib import Path

    from prefixserve.adapters_store.peft_import import import_peft
    from prefixserve.engine.tenancy import DEFAULT_TENANT, tenant_task
    from prefixserve.errors import InvalidRequestError

    for spec in specs:
        task, sep, path = spec.partition("=")
        if not sep or not task or not path:
            raise InvalidRequestError(f"--adapter expects TASK=PATH, found {spec!r}")
        source = Path(path).expanduser()
        if source.suffix == ".safetensors":
            data = source.read_bytes()
        else:
            data = import_peft(source, arch=engine.backbone.arch, fingerprint=engine.adapters.fingerprint,
                               limits=engine.config.adapters)
        artifact = engine.register_adapter(tenant_task(DEFAULT_TENANT, task, engine.backbone.name), data)
        logging.getLogger("prefixserve").info("task %s: %s adapter, version %s", task, artifact.kind,
                                              artifact.version[:12])


def authenticator(args: argparse.Namespace):
    """API keys are on when a tenants file, Redis tenants or an admin key is configured; an admin
    key alone keeps tenants in the Redis of --redis-url, else in the default tenants file. A metrics
    key guards /metrics only, with or without them."""
    from pathlib import Path

    from prefixserve.server.auth import Authenticator

    tenants_file, admin_key, metrics_key = args.tenants_file, args.admin_key, args.metrics_key or None
    if not (tenants_file or args.tenants_redis or admin_key):
        return Authenticator(metrics_key=metrics_key)
    if args.tenants_redis or (admin_key and not tenants_file and args.redis_url):
        if not args.redis_url:
            from prefixserve.errors import ConfigError

            raise ConfigError("--tenants-redis needs a Redis URL (--redis-url or REDIS_URL)")
        from prefixserve.server.tenants import RedisTenantRegistry

        registry = RedisTenantRegistry(args.redis_url)
    else:
        from prefixserve.server.tenants import FileTenantRegistry

        registry = FileTenantRegistry(Path(tenants_file or DEFAULT_TENANTS_FILE).expanduser())
    return Authenticator(registry, admin_key or None, metrics_key)


def check_exposure(host: str, auth_enabled: bool) -> None:
    """Without API keys every caller is the default tenant: only this machine may call."""
    import ipaddress

    from prefixserve.errors import ConfigError

    if auth_enabled or host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ConfigError(f"refusing to listen on {host!r} without API keys: every caller would be the default "
                          f"tenant. Configure --admin-key (PREFIXSERVE_ADMIN_KEY) or --tenants-file, or listen on "
                          f"127.0.0.1")


def cmd_serve(args: argparse.Namespace) -> None:
    import uvicorn

    from prefixserve.engine.async_engine import AsyncEngine
    from prefixserve.engine.llm_engine import LLMEngine
    from prefixserve.server.app import create_app
    from prefixserve.training.cli_commands import make_queue

    auth = authenticator(args)
    check_exposure(args.host, auth.enabled)
    if args.blob_gc_grace <= args.request_timeout:
        raise ConfigError(f"--blob-gc-grace ({args.blob_gc_grace:g} s) must be longer than --request-timeout "
                          f"({args.request_timeout:g} s): a request may fetch the version it pinned until it ends")
    sync_engine = LLMEngine.from_config(engine_config(args), adapter_store(args))
    load_adapters(sync_engine, args.adapter)
    engine = AsyncEngine(sync_engine)
    jobs = make_queue(args)
    try:
        app = create_app(engine, args.request_timeout, auth, jobs, quotas=quota_manager(args),
                         min_body_bytes_per_s=args.min_body_rate, body_grace_s=args.body_grace)
        uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    finally:
        engine.shutdown()
        sync_engine.close()
        jobs.close()


def cmd_prepare(args: argparse.Namespace) -> None:
    from pathlib import Path

    from prefixserve.models.embedded import prepare_embedded_backbone

    print(prepare_embedded_backbone(Path(args.cache_dir).expanduser()))


def cmd_generate(args: argparse.Namespace) -> None:
    from prefixserve.engine.llm_engine import LLMEngine
    from prefixserve.engine.request import SamplingParams
    from prefixserve.engine.tenancy import DEFAULT_TENANT, tenant_task

    engine = LLMEngine.from_config(engine_config(args), adapter_store(args))
    load_adapters(engine, args.adapter)
    task = tenant_task(DEFAULT_TENANT, args.task, engine.backbone.name)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)
    try:
        for completion in engine.generate(args.prompts, params, tasks=[task] * len(args.prompts)):
            print(completion.text)
    finally:
        engine.close()


def env_settings() -> dict[str, str]:
    """Every environment variable any command reads, with what it sets."""
    build_parser()
    return dict(ENV_SETTINGS)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if OPENMP_APPLIED:
        logging.getLogger("prefixserve").info("OpenMP: %s (unset before; see prefixserve/openmp.py)",
                                              " ".join(f"{k}={v}" for k, v in OPENMP_APPLIED.items()))
    from prefixserve.errors import PrefixServeError

    try:
        args.func(args)
    except PrefixServeError as exc:
        print(f"prefixserve: {exc.message}", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prefixserve")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="start the HTTP server")
    _engine_args(serve)
    serve.add_argument("--host", default=env("PREFIXSERVE_HOST", "127.0.0.1", "address to listen on (--host)"),
                       help="without API keys only a loopback address is accepted")
    serve.add_argument("--port", type=int, default=int(env("PREFIXSERVE_PORT", "8000", "port (--port)")))
    serve.add_argument("--request-timeout", type=float,
                       default=float(env("PREFIXSERVE_REQUEST_TIMEOUT", "600", "seconds a generation may run "
                                         "(--request-timeout)")),
                       help="seconds a generation request may run before it is stopped (504)")
    serve.add_argument("--min-body-rate", type=float, default=DEFAULT_MIN_BYTES_PER_S,
                       help="bytes/s a request body (an upload) must arrive at on average after --body-grace; a "
                            "slower one is dropped with a 408")
    serve.add_argument("--body-grace", type=float, default=DEFAULT_GRACE_S,
                       help="seconds a request body may take before --min-body-rate applies")
    serve.add_argument("--admin-key", default=env("PREFIXSERVE_ADMIN_KEY", None, "the admin API key; turns API keys "
                                                  "on (--admin-key)"),
                       help="the key of the admin API (/v1/admin: tenants, limits, keys); turns API keys on")
    serve.add_argument("--metrics-key", default=env("PREFIXSERVE_METRICS_KEY", None, "a key that reads /metrics "
                                                    "and nothing else (--metrics-key)"),
                       help="a key for the Prometheus scraper: reads /metrics and nothing else (the admin key "
                            "reads it too); does not turn API keys on by itself")
    serve.add_argument("--tenants-file", default=env("PREFIXSERVE_TENANTS_FILE", None, "JSON tenant registry; turns "
                                                     "API keys on (--tenants-file)"),
                       help=f"tenants, limits and key digests in a JSON file (default with --admin-key: "
                            f"{DEFAULT_TENANTS_FILE}); turns API keys on")
    serve.add_argument("--tenants-redis", action="store_true",
                       default=env("PREFIXSERVE_TENANTS_REDIS", "", "1: tenants live in Redis "
                                   "(--tenants-redis)") in ("1", "true", "yes"),
                       help="keep tenants in the Redis of --redis-url (shared by replicas); turns API keys on")
    serve.set_defaults(func=cmd_serve)
    prepare = sub.add_parser("prepare", help="dequantize the embedded backbone into the cache dir")
    prepare.add_argument("--cache-dir", default=env("PREFIXSERVE_CACHE_DIR", ModelConfig.cache_dir,
                                                    "where the embedded backbone is dequantized (--cache-dir)"))
    prepare.set_defaults(func=cmd_prepare)
    generate = sub.add_parser("generate", help="generate offline, without a server")
    _engine_args(generate)
    generate.add_argument("prompts", nargs="+")
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=0.0)
    generate.add_argument("--seed", type=int, default=None)
    generate.add_argument("--task", default=None, help="a task in the store (see --adapter to add one)")
    generate.set_defaults(func=cmd_generate)
    from prefixserve.clients.cli_commands import add_client_commands

    add_client_commands(sub)  # tasks, chat, bench: over HTTP through the SDK
    from prefixserve.training.cli_commands import add_queue_args, add_training_commands

    add_training_commands(sub, add_engine_args=_engine_args, make_store=adapter_store, env=env)
    add_queue_args(serve, env)  # the queue behind /v1/training/jobs (Redis when --redis-url is given)
    return parser


if __name__ == "__main__":
    main()
