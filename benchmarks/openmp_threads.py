"""What libgomp's wait policy costs a server whose engine steps on its own thread (prefixserve/openmp.py).

Each case runs in a fresh process (libgomp reads its settings once, at load): the main thread first
runs parallel torch ops (as it does loading the model), then a second thread - the engine's - times
(a) a small batched-LoRA-shaped bmm pair, [16, 4, 576] x [16, 576, 8] x [16, 8, 576], the kind of op a
many-task step runs thousands of, and (b) one SmolLM2 MLP up-projection, linear [256, 576] x [576, 1536].
Cases: libgomp's defaults, and the CLI's settings (OMP_WAIT_POLICY=active, GOMP_SPINCOUNT=300000);
both also on the main thread alone, the in-process case. Rounds alternate the cases; each keeps its
best. Prints one JSON object last and appends to RESULTS.md."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import append_results

from prefixserve.openmp import DEFAULTS

SETTINGS = {"libgomp_default": {}, "cli_settings": DEFAULTS}

PROBE = r"""
import json, sys, threading, time
import torch
xs, a, b = torch.randn(16, 4, 576), torch.randn(16, 576, 8), torch.randn(16, 8, 576)
x, w = torch.randn(256, 576), torch.randn(1536, 576)
def timed(fn, n):
    fn()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e6
def probe(out):
    out["bmm_pair_us"] = timed(lambda: torch.bmm(torch.bmm(xs, a), b), 3000)
    out["linear_us"] = timed(lambda: torch.nn.functional.linear(x, w), 200)
out = {}
if sys.argv[1] == "thread":
    torch.nn.functional.linear(x, w)  # the main thread's parallel work (loading a model does this)
    worker = threading.Thread(target=probe, args=(out,))
    worker.start()
    worker.join()
else:
    probe(out)
print(json.dumps(out))
"""


def run_case(overrides: dict[str, str], where: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in DEFAULTS}
    env.update(overrides)
    out = subprocess.run([sys.executable, "-c", PROBE, where], env=env, capture_output=True, text=True,
                         timeout=600, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; each case keeps its best")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    cases = [(name, where) for where in ("thread", "main") for name in SETTINGS]
    runs: dict[str, list[dict]] = {f"{name}/{where}": [] for name, where in cases}
    for _ in range(args.rounds):
        for name, where in cases:
            runs[f"{name}/{where}"].append(run_case(SETTINGS[name], where))
    best = {case: {key: round(min(r[key] for r in rs), 1) for key in rs[0]} for case, rs in runs.items()}
    default, ours = best["libgomp_default/thread"], best["cli_settings/thread"]
    result = {"benchmark": "openmp_threads", "rounds": args.rounds, "best_us": best,
              "engine_thread_bmm_speedup": round(default["bmm_pair_us"] / ours["bmm_pair_us"], 2),
              "engine_thread_linear_speedup": round(default["linear_us"] / ours["linear_us"], 2)}
    if not args.no_record:
        append_results("openmp_threads", [
            "An engine-like thread after the main thread ran parallel torch ops, per libgomp setting (fresh "
            f"process each, best of {args.rounds} alternating rounds); the main thread alone for reference.",
            "",
            "| case | bmm pair (us) | linear 256x576x1536 (us) |",
            "|---|---|---|",
            *(f"| {case} | {b['bmm_pair_us']} | {b['linear_us']} |" for case, b in best.items()),
            "", "```json", json.dumps(result), "```"])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
