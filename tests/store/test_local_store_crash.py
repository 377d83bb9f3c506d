"""LocalStore survives SIGKILL at any point: every task is left at its old or its new version, and
every version a task file names has a complete blob whose sha256 matches. The writer collects garbage
on every change (a history of 2, no grace period), so kills also land inside collections: none may
delete a referenced blob, and what a kill leaves unreferenced a later collection removes."""

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from prefixserve.adapters_store.local_store import LocalStore

REPO_ROOT = Path(__file__).resolve().parents[2]
TASKS = ["acme/a", "acme:b", "c.d-e_f"]
NUM_KILLS = 60

# Importing the package prefixserve.adapters_store runs its __init__, which imports torch (~2-3 s per
# start); the writer needs only the store modules, so it registers the package without running __init__.
WRITER = """
import hashlib, os, random, sys, types
from pathlib import Path
import prefixserve
package = types.ModuleType("prefixserve.adapters_store")
package.__path__ = [os.path.join(os.path.dirname(prefixserve.__file__), "adapters_store")]
sys.modules["prefixserve.adapters_store"] = package
from prefixserve.adapters_store.local_store import LocalStore
from prefixserve.errors import InvalidRequestError, TaskNotFoundError

def log(*words):  # one write per line (print writes word by word): a kill cuts at most the last line
    os.write(1, (" ".join(words) + "\\n").encode())

store, rng = LocalStore(Path(sys.argv[1]), max_history=2, gc_grace_s=0), random.Random(int(sys.argv[2]))
tasks = sys.argv[3].split(",")
log("ready")
while True:
    task, r = rng.choice(tasks), rng.random()
    try:
        if r < 0.1:
            log("delete", task)
            store.delete(task)
            log("ok", task, "-")
        elif r < 0.25:
            log("rollback", task)
            log("ok", task, store.rollback(task))
        else:
            data = rng.randbytes(rng.randint(1, 200_000))
            log("put", task, hashlib.sha256(data).hexdigest())
            log("ok", task, store.put(task, data, "prompt"))
    except (InvalidRequestError, TaskNotFoundError):  # nothing to roll back to / delete
        log("ok", task, "unchanged")
"""


def run_writer_until_killed(root: Path, seed: int) -> list[str]:
    """The writer's log lines: "<op> <task>" before each operation, "ok <task> <result>" after it."""
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(root), str(seed), ",".join(TASKS)],
                              stdout=subprocess.PIPE, cwd=REPO_ROOT, text=True)
    if writer.stdout.readline() != "ready\n":
        writer.kill()
        raise AssertionError(f"expected the writer to print 'ready', found exit code {writer.wait()}")
    time.sleep(random.Random(seed).uniform(0.0, 0.06))
    writer.send_signal(signal.SIGKILL)
    output = writer.stdout.read()
    writer.wait()
    # A line the kill cut short was an announcement whose operation had not started yet: drop it.
    return output.split("\n")[:-1]


def allowed_states(before: dict[str, str | None], histories: dict[str, set[str]],
                   lines: list[str]) -> tuple[dict[str, set], bool]:
    """(the versions each task may be at now, whether the kill hit an operation in flight). Finished
    operations fix a task's version; one cut short leaves the old version or the one it was making."""
    state, pending = dict(before), None
    known = {task: set(histories.get(task, ())) for task in TASKS}  # what a rollback may return to
    for line in lines:
        word, task, *rest = line.split()
        if word == "ok":
            if rest[0] != "unchanged":
                state[task] = None if rest[0] == "-" else rest[0]
                known[task] = set() if state[task] is None else known[task] | {state[task]}
            pending = None
        else:
            pending = (word, task, rest)
    allowed = {task: {state.get(task)} for task in TASKS}
    if pending is not None:
        op, task, rest = pending
        allowed[task] |= {"delete": {None}, "put": {rest[0] if rest else None}, "rollback": known[task]}[op]
    return allowed, pending is not None


def check_consistent(root: Path) -> tuple[dict[str, str], dict[str, set[str]]]:
    """(task -> current version, task -> versions in its history), after checking every blob."""
    store, histories = LocalStore(root), {}
    current = store.list_tasks()
    for task, version in current.items():
        history = store.history(task)
        assert history[0].version == version
        for record in history:
            blob = root / "blobs" / record.version[:2] / record.version
            assert blob.is_file(), f"expected a blob for {task} version {record.version}, found none"
            data = blob.read_bytes()
            assert hashlib.sha256(data).hexdigest() == record.version and len(data) == record.num_bytes
        assert store.get(version)  # verifies the hash too
        histories[task] = {record.version for record in history}
    return current, histories


def test_sigkill_at_random_points_leaves_old_or_new_version(tmp_path):
    root = tmp_path / "store"
    LocalStore(root)
    state: dict[str, str | None] = {}
    histories: dict[str, set[str]] = {}
    num_mid_operation = 0
    start = time.monotonic()
    for seed in range(NUM_KILLS):
        lines = run_writer_until_killed(root, seed)
        allowed, mid_operation = allowed_states(state, histories, lines)
        num_mid_operation += mid_operation
        current, histories = check_consistent(root)
        for task in TASKS:
            found = current.get(task)
            assert found in allowed[task], f"kill {seed}: expected {task} at one of {allowed[task]}, found {found}"
        state = {task: current.get(task) for task in TASKS}
    # a kill between operations tests nothing: most kills must land inside one
    assert num_mid_operation >= NUM_KILLS // 2, f"expected most kills mid-operation, found {num_mid_operation}"
    assert time.monotonic() - start < 40
    assert len(os.listdir(root / "tasks")) >= 1
    LocalStore(root, gc_grace_s=0).collect_garbage()
    stored = {p.name for p in (root / "blobs").glob("*/*") if not p.name.endswith(".tmp")}
    assert stored == set().union(*histories.values()), "expected only referenced blobs after a collection"
