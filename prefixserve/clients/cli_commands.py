"""The `prefixserve` commands that talk to a running server over HTTP: `tasks`, `chat` and `bench`.

Everything goes through the SDK, so this module imports neither torch nor the engine nor the server
app, and `prefixserve tasks list` starts in a fraction of a second. A server error prints
`prefixserve: <message>` and exits 2, never a traceback."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime

import httpx
from pydantic import ValidationError

from prefixserve.clients import AsyncPrefixServeClient, PrefixServeAPIError, PrefixServeClient
from prefixserve.clients.sdk import DEFAULT_BASE_URL

EXIT_ERROR = 2
VERSION_CHARS = 12  # versions are sha256 hex; tables show a prefix, which `tasks rollback --version` accepts


class CommandError(Exception):
    """A failure the user can act on; printed as `prefixserve: <message>`, exit code 2."""


def add_client_commands(sub: argparse._SubParsersAction) -> None:
    """Add `tasks {upload,list,show,rollback,delete}`, `chat` and `bench` to the `prefixserve` parser."""
    connection = argparse.ArgumentParser(add_help=False)
    connection.add_argument("--url", default=os.environ.get("PREFIXSERVE_URL", DEFAULT_BASE_URL),
                            help="the server (default: $PREFIXSERVE_URL or %(default)s)")
    connection.add_argument("--api-key", default=os.environ.get("PREFIXSERVE_API_KEY"),
                            help="sent as a bearer token (default: $PREFIXSERVE_API_KEY)")
    connection.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the server")
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print the server's JSON instead of a table")
    common = [connection, as_json]

    tasks = sub.add_parser("tasks", help="upload, list, show, roll back and delete tasks on a running server")
    tasks_sub = tasks.add_subparsers(dest="tasks_command", required=True)
    upload = tasks_sub.add_parser("upload", parents=common, help="upload a new version of a task")
    upload.add_argument("task")
    upload.add_argument("path", help="a PEFT adapter folder, a .tar/.tar.gz/.zip of one, or a prefixserve "
                                     ".safetensors artifact")
    upload.set_defaults(func=_command(cmd_tasks_upload))
    tasks_sub.add_parser("list", parents=common, help="every task and its current version").set_defaults(
        func=_command(cmd_tasks_list))
    show = tasks_sub.add_parser("show", parents=common, help="a task's kind, residency and version history")
    show.add_argument("task")
    show.set_defaults(func=_command(cmd_tasks_show))
    rollback = tasks_sub.add_parser("rollback", parents=common, help="make an earlier version current again")
    rollback.add_argument("task")
    rollback.add_argument("--version", default=None,
                          help="a version or a unique prefix of one from `tasks show` (default: the previous one)")
    rollback.set_defaults(func=_command(cmd_tasks_rollback))
    delete = tasks_sub.add_parser("delete", parents=common, help="unregister a task")
    delete.add_argument("task")
    delete.set_defaults(func=_command(cmd_tasks_delete))

    chat = sub.add_parser("chat", parents=[connection], help="chat with the server, a line of stdin per turn")
    chat.add_argument("--task", default=None, help="the task's adapter (default: the plain backbone)")
    chat.add_argument("--max-new-tokens", type=int, default=256)
    chat.add_argument("--temperature", type=float, default=0.7)
    chat.add_argument("--seed", type=int, default=None)
    chat.add_argument("--system", default=None, help="a system message opening the conversation")
    chat.set_defaults(func=_command(cmd_chat))

    bench = sub.add_parser("bench", parents=[connection], help="load the server with concurrent streaming "
                                                               "requests; prints one JSON object")
    bench.add_argument("--task", dest="tasks", action="extend", nargs="+", default=[],
                       help="tasks to round-robin over, `base` for the plain backbone (default: base)")
    bench.add_argument("--requests", type=int, default=64, help="requests to send in all")
    bench.add_argument("--concurrency", type=int, default=8, help="requests in flight at once")
    bench.add_argument("--max-new-tokens", type=int, default=64)
    bench.add_argument("--prompt", default="Write a short story about a lighthouse keeper.")
    bench.add_argument("--temperature", type=float, default=0.0)
    bench.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                       help="generate exactly --max-new-tokens per request (default: yes)")
    bench.add_argument("--max-duration-s", type=float, default=300.0,
                       help="stop sending and cancel what still runs after this long")
    bench.set_defaults(func=_command(cmd_bench))


def main(argv: list[str] | None = None) -> None:
    """These commands alone (`python -m prefixserve.clients.cli_commands ...`); `prefixserve` itself adds them
    next to `serve`."""
    parser = argparse.ArgumentParser(prog="prefixserve")
    add_client_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.func(args)


def _command(fn: Callable[[argparse.Namespace], None]) -> Callable[[argparse.Namespace], None]:
    """Run a command, turning every failure a user can cause into `prefixserve: <message>` and exit 2."""
    @functools.wraps(fn)
    def run(args: argparse.Namespace) -> None:
        # `prefixserve` logs at INFO; httpx would log a line per request over the command's own output.
        logging.getLogger("httpx").setLevel(logging.WARNING)
        try:
            fn(args)
        except PrefixServeAPIError as exc:
            _fail(exc.message)
        except httpx.ConnectError as exc:
            _fail(f"cannot connect to the server at {args.url} ({exc}); is `prefixserve serve` running there? "
                  "Point --url or PREFIXSERVE_URL at it")
        except httpx.TimeoutException:
            _fail(f"the server at {args.url} did not answer within {args.timeout:g} s (--timeout)")
        except httpx.HTTPError as exc:
            _fail(f"talking to the server at {args.url} failed: {exc}")
        except (CommandError, FileNotFoundError, ValidationError) as exc:  # ValidationError: refused before sending
            _fail(str(exc))
        except KeyboardInterrupt:
            sys.exit(130)
    return run


def _fail(message: str) -> None:
    print(f"prefixserve: {message}", file=sys.stderr)
    sys.exit(EXIT_ERROR)


def _client(args: argparse.Namespace) -> PrefixServeClient:
    return PrefixServeClient(args.url, api_key=args.api_key, timeout=args.timeout)


# ---- tasks ---------------------------------------------------------------------------------------

def cmd_tasks_upload(args: argparse.Namespace) -> None:
    with _client(args) as client:
        uploaded = client.upload_task(args.task, args.path)
    _print(args, uploaded, lambda u: f"uploaded {u['task']}: {u['kind']} adapter, version "
                                     f"{u['version'][:VERSION_CHARS]} ({_size(u['num_bytes'])})")


def cmd_tasks_list(args: argparse.Namespace) -> None:
    with _client(args) as client:
        tasks = client.list_tasks()
    rows = [(t["task"], t["version"][:VERSION_CHARS]) for t in sorted(tasks, key=lambda t: t["task"])]
    _print(args, {"tasks": tasks}, lambda _: _table(("TASK", "VERSION"), rows) if rows else "no tasks")


def cmd_tasks_show(args: argparse.Namespace) -> None:
    with _client(args) as client:
        shown = client.get_task(args.task)
    _print(args, shown, _show_text)


def _show_text(shown: dict) -> str:
    head = [f"task       {shown['task']}", f"kind       {shown['kind']}", f"version    {shown['version']}",
            f"size       {_size(shown['num_bytes'])}", f"residency  {shown['residency']}", "history (newest first):"]
    rows = [(h["version"], h["kind"], _size(h["num_bytes"]), _when(h["created_at"])) for h in shown["history"]]
    return "\n".join(head) + "\n" + _table(("VERSION", "KIND", "SIZE", "CURRENT SINCE"), rows, indent="  ")


def cmd_tasks_rollback(args: argparse.Namespace) -> None:
    with _client(args) as client:
        version = args.version
        if version is not None and len(version) < 64:  # a prefix as the tables show it
            version = _resolve_version(args.task, version, client.get_task(args.task)["history"])
        rolled = client.rollback_task(args.task, version)
    _print(args, rolled, lambda r: f"{r['task']}: version {r['version'][:VERSION_CHARS]} is current again")


def _resolve_version(task: str, prefix: str, history: list[dict]) -> str:
    matches = sorted({h["version"] for h in history if h["version"].startswith(prefix.lower())})
    if len(matches) != 1:
        found = "none" if not matches else ", ".join(m[:VERSION_CHARS] for m in matches)
        raise CommandError(f"expected exactly one version of task {task!r} starting with {prefix!r} in its "
                           f"history, found {found}")
    return matches[0]


def cmd_tasks_delete(args: argparse.Namespace) -> None:
    with _client(args) as client:
        deleted = client.delete_task(args.task)
    _print(args, deleted, lambda d: f"deleted {d['task']}")


def _print(args: argparse.Namespace, body: dict, human: Callable[[dict], str]) -> None:
    print(json.dumps(body, indent=2) if args.json else human(body))


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]], indent: str = "") -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = ["  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip() for row in (header, *rows)]
    return "\n".join(indent + line for line in lines)


def _size(num_bytes: int) -> str:
    if num_bytes < 1024:
        return f"{num_bytes} B"
    if num_bytes < 1 << 20:
        return f"{num_bytes / 1024:.1f} KiB"
    return f"{num_bytes / (1 << 20):.1f} MiB"


def _when(unix_time: float) -> str:
    return datetime.fromtimestamp(unix_time, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


# ---- chat ----------------------------------------------------------------------------------------

def cmd_chat(args: argparse.Namespace) -> None:
    """One user turn per line of stdin; the whole conversation goes with every request, the reply streams
    to stdout. EOF or `/exit` ends it. Piped stdin works the same, without the prompt."""
    interactive = sys.stdin.isatty()
    messages = [{"role": "system", "content": args.system}] if args.system else []
    with _client(args) as client:
        while (line := _read_turn(interactive)) is not None:
            if line.strip() == "/exit":
                break
            if not line.strip():
                continue
            messages.append({"role": "user", "content": line})
            reply = []
            for delta in client.stream_generate(messages=messages, task=args.task, max_new_tokens=args.max_new_tokens,
                                                temperature=args.temperature, seed=args.seed):
                reply.append(delta.text)
                print(delta.text, end="", flush=True)
            print(flush=True)
            messages.append({"role": "assistant", "content": "".join(reply)})


def _read_turn(interactive: bool) -> str | None:
    if interactive:
        try:
            return input("> ")  # line editing and history through readline, where it is available
        except EOFError:
            print()
            return None
    line = sys.stdin.readline()
    return line.rstrip("\r\n") if line else None


# ---- bench ---------------------------------------------------------------------------------------

def cmd_bench(args: argparse.Namespace) -> None:
    if args.requests < 1 or args.concurrency < 1 or args.max_new_tokens < 1 or args.max_duration_s <= 0:
        raise CommandError("expected --requests, --concurrency, --max-new-tokens and --max-duration-s above 0, "
                           f"found {args.requests}, {args.concurrency}, {args.max_new_tokens}, {args.max_duration_s}")
    print(json.dumps(asyncio.run(_bench(args))))


async def _bench(args: argparse.Namespace) -> dict:
    tasks = args.tasks or ["base"]
    # No retries: an overloaded server (429/503) should show up as errors, not as slow requests.
    async with AsyncPrefixServeClient(args.url, api_key=args.api_key, timeout=args.timeout, max_retries=0) as client:
        await client.health()  # a dead URL is one clear message, not N connection errors
        for task in sorted(set(tasks) - {"base"}):
            await client.get_task(task)  # an unknown task fails before the load starts
        results: list[dict] = []
        next_index = 0

        async def worker() -> None:
            nonlocal next_index
            while next_index < args.requests:
                index, next_index = next_index, next_index + 1
                results.append(await _one_request(client, args, tasks[index % len(tasks)]))

        start = time.perf_counter()
        workers = [asyncio.create_task(worker()) for _ in range(min(args.concurrency, args.requests))]
        _, running = await asyncio.wait(workers, timeout=args.max_duration_s)
        for pending in running:  # past the deadline: what still runs is cancelled, and not counted
            pending.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        duration_s = time.perf_counter() - start
    return _bench_report(args, tasks, results, duration_s, stopped_by_deadline=bool(running))


async def _one_request(client: AsyncPrefixServeClient, args: argparse.Namespace, task: str) -> dict:
    start = time.perf_counter()
    ttft_s, num_tokens = None, 0
    try:
        stream = client.stream_generate(args.prompt, task=task, max_new_tokens=args.max_new_tokens,
                                        temperature=args.temperature, ignore_eos=args.ignore_eos)
        async with contextlib.aclosing(stream):
            async for delta in stream:
                if delta.token_ids and ttft_s is None:
                    ttft_s = time.perf_counter() - start
                num_tokens += len(delta.token_ids)
    except PrefixServeAPIError as exc:
        return {"error": f"{exc.status} {exc.type}: {exc.message}"}
    except httpx.HTTPError as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    return {"latency_s": time.perf_counter() - start, "ttft_s": ttft_s, "output_tokens": num_tokens}


def _bench_report(args: argparse.Namespace, tasks: list[str], results: list[dict], duration_s: float,
                  stopped_by_deadline: bool) -> dict:
    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    output_tokens = sum(r["output_tokens"] for r in ok)
    latencies = sorted(r["latency_s"] for r in ok)
    ttfts = sorted(r["ttft_s"] for r in ok if r["ttft_s"] is not None)
    return {
        "url": args.url, "tasks": tasks, "requested": args.requests, "concurrency": args.concurrency,
        "max_new_tokens": args.max_new_tokens, "requests": len(results), "errors": len(errors),
        "stopped_by_deadline": stopped_by_deadline, "duration_s": round(duration_s, 4),
        "output_tokens": output_tokens, "output_tokens_per_s": round(output_tokens / duration_s, 3),
        "requests_per_s": round(len(ok) / duration_s, 3),
        "ttft_p50_s": _percentile(ttfts, 0.50), "ttft_p95_s": _percentile(ttfts, 0.95),
        "latency_p50_s": _percentile(latencies, 0.50), "latency_p95_s": _percentile(latencies, 0.95),
        "error_messages": sorted(set(errors))[:5],
    }


def _percentile(sorted_values: list[float], q: float) -> float | None:
    """Linear interpolation between the closest ranks; None for no values."""
    if not sorted_values:
        return None
    position = q * (len(sorted_values) - 1)
    low = int(position)
    high = min(low + 1, len(sorted_values) - 1)
    return round(sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low), 4)


if __name__ == "__main__":
    main()
