"""The `prefixserve` command: the one place flags and environment become configuration."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from prefixserve.config import (
    EMBEDDED_BACKBONE,
    AdapterLimits,
    CacheConfig,
    EngineConfig,
    ModelConfig,
    SchedulerConfig,
)


def _engine_args(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    parser.add_argument("--model", default=env("PREFIXSERVE_MODEL", EMBEDDED_BACKBONE),
                        help="'embedded' (SmolLM2-135M-Instruct) or a local Hugging Face model directory")
    parser.add_argument("--cache-dir", default=env("PREFIXSERVE_CACHE_DIR", ModelConfig.cache_dir))
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--page-size", type=int, default=CacheConfig.page_size)
    parser.add_argument("--num-pages", type=int, default=None)
    parser.add_argument("--max-num-seqs", type=int, default=SchedulerConfig.max_num_seqs)
    parser.add_argument("--max-num-batched-tokens", type=int, default=SchedulerConfig.max_num_batched_tokens)
    parser.add_argument("--max-waiting", type=int, default=SchedulerConfig.max_waiting)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--redis-url", default=env("REDIS_URL"),
                        help="serve tasks from this Redis (shared by replicas); default: a local directory")
    parser.add_argument("--store-dir", default=env("PREFIXSERVE_STORE_DIR", "~/.local/share/prefixserve/adapters"),
                        help="the local adapter store when no Redis URL is given")
    parser.add_argument("--host-cache-mb", type=int, default=EngineConfig.host_cache_bytes >> 20,
                        help="decoded adapters kept in host memory")
    parser.add_argument("--max-lora-slots", type=int, default=EngineConfig.max_lora_slots,
                        help="LoRA adapters resident at once")
    parser.add_argument("--max-lora-rank", type=int, default=AdapterLimits.max_lora_rank,
                        help="largest LoRA rank accepted; the slot stacks are sized by it")
    parser.add_argument("--adapter", action="append", default=[], metavar="TASK=PATH",
                        help="serve a task from the start: a PEFT adapter folder or .tar/.tar.gz/.zip of one, or a "
                             "prefixserve .safetensors artifact (repeatable)")


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=ModelConfig(source=args.model, dtype=args.dtype, device=args.device,
                          max_model_len=args.max_model_len, cache_dir=args.cache_dir),
        cache=CacheConfig(page_size=args.page_size, num_pages=args.num_pages),
        scheduler=SchedulerConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                                  max_waiting=args.max_waiting),
        num_threads=args.threads,
        adapters=AdapterLimits(max_lora_rank=args.max_lora_rank),
        max_lora_slots=args.max_lora_slots,
        host_cache_bytes=args.host_cache_mb << 20,
    )


def adapter_store(args: argparse.Namespace):
    """RedisStore when a URL is given (replicas share tasks and hear each other's uploads), else LocalStore."""
    from pathlib import Path

    if args.redis_url:
        from prefixserve.adapters_store.redis_store import RedisStore

        return RedisStore(args.redis_url)
    from prefixserve.adapters_store.local_store import LocalStore

    return LocalStore(Path(args.store_dir).expanduser())


def load_adapters(engine, specs: list[str]) -> None:
    """Register `TASK=PATH` adapters before serving; a bad one stops the start with its error."""
    from pathlib import Path

    from prefixserve.adapters_store.peft_import import import_peft
    from prefixserve.errors import InvalidRequestError
    from prefixserve.server.tenancy import DEFAULT_TENANT, tenant_task

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


def cmd_serve(args: argparse.Namespace) -> None:
    import uvicorn

    from prefixserve.engine.async_engine import AsyncEngine
    from prefixserve.engine.llm_engine import LLMEngine
    from prefixserve.server.app import create_app

    sync_engine = LLMEngine.from_config(engine_config(args), adapter_store(args))
    load_adapters(sync_engine, args.adapter)
    engine = AsyncEngine(sync_engine)
    try:
        uvicorn.run(create_app(engine, args.request_timeout), host=args.host, port=args.port, log_level="info")
    finally:
        engine.shutdown()
        sync_engine.close()


def cmd_prepare(args: argparse.Namespace) -> None:
    from pathlib import Path

    from prefixserve.models.embedded import prepare_embedded_backbone

    print(prepare_embedded_backbone(Path(args.cache_dir).expanduser()))


def cmd_generate(args: argparse.Namespace) -> None:
    from prefixserve.engine.llm_engine import LLMEngine
    from prefixserve.engine.request import SamplingParams
    from prefixserve.server.tenancy import DEFAULT_TENANT, tenant_task

    engine = LLMEngine.from_config(engine_config(args), adapter_store(args))
    load_adapters(engine, args.adapter)
    task = tenant_task(DEFAULT_TENANT, args.task, engine.backbone.name)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)
    try:
        for completion in engine.generate(args.prompts, params, tasks=[task] * len(args.prompts)):
            print(completion.text)
    finally:
        engine.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="prefixserve")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="start the HTTP server")
    _engine_args(serve)
    serve.add_argument("--host", default=os.environ.get("PREFIXSERVE_HOST", "127.0.0.1"))
    serve.add_argument("--port", type=int, default=int(os.environ.get("PREFIXSERVE_PORT", "8000")))
    serve.add_argument("--request-timeout", type=float, default=600.0,
                       help="seconds a generation request may run before it is stopped (504)")
    serve.set_defaults(func=cmd_serve)
    prepare = sub.add_parser("prepare", help="dequantize the embedded backbone into the cache dir")
    prepare.add_argument("--cache-dir", default=os.environ.get("PREFIXSERVE_CACHE_DIR", ModelConfig.cache_dir))
    prepare.set_defaults(func=cmd_prepare)
    generate = sub.add_parser("generate", help="generate offline, without a server")
    _engine_args(generate)
    generate.add_argument("prompts", nargs="+")
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=0.0)
    generate.add_argument("--seed", type=int, default=None)
    generate.add_argument("--task", default=None, help="a task in the store (see --adapter to add one)")
    generate.set_defaults(func=cmd_generate)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from prefixserve.errors import PrefixServeError

    try:
        args.func(args)
    except PrefixServeError as exc:
        print(f"prefixserve: {exc.message}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
