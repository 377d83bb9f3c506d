"""`prefixserve tasks|chat|bench` against the real server (SmolLM2 under uvicorn): what they print, their
exit codes, and what the server received. Run through `cli_commands.main`, the parser `prefixserve` adds
them to; a dead URL and the import weight run as real processes."""

import hashlib
import io
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from http_server import free_port

from prefixserve.adapters_store.format import encode_artifact
from prefixserve.clients import PrefixServeClient
from prefixserve.clients.cli_commands import main
from prefixserve.server.chat import chat_prompt_ids
from prefixserve.server.protocol import ChatMessage

slow = pytest.mark.slow


@pytest.fixture
def cli(server, capsys, monkeypatch):
    """Run a command against the test server: (exit code, stdout, stderr); `stdin` is piped text."""
    def run(*argv: str, stdin: str = "", url: str = server[0]) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        try:
            main([*argv, "--url", url])
            code = 0
        except SystemExit as exc:
            code = exc.code
        out, err = capsys.readouterr()
        assert "Traceback" not in err
        return code, out, err
    return run


@pytest.fixture
def received(server, monkeypatch):
    """The engine Requests the server admits from now on (the prompt ids it built, the task it resolved),
    with the number of unfinished requests the engine held when each arrived."""
    sync = server[1]
    seen, add = [], sync.add

    def spy(request):
        seen.append((list(request.prompt_token_ids), request.task, sync.scheduler.num_unfinished))
        add(request)
    monkeypatch.setattr(sync, "add", spy)
    return seen


def prompt_artifact(sync, seed: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(4, sync.backbone.arch.hidden_size, generator=g) * 0.5
    return encode_artifact("prompt", {"num_virtual_tokens": 4}, {"embeddings": embeddings}, sync.adapters.fingerprint)


def current_version(server, task: str) -> str:
    with PrefixServeClient(server[0]) as client:
        return client.get_task(task)["version"]


@slow
def test_an_empty_store_lists_no_tasks(cli):  # first in the module: no other test has uploaded yet
    assert cli("tasks", "list") == (0, "no tasks\n", "")


@slow
def test_task_round_trip(cli, server, smollm2_hf, tmp_path):
    from peft import PromptTuningConfig, get_peft_model

    torch.manual_seed(0)
    folder = tmp_path / "my-prompt"
    get_peft_model(smollm2_hf, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).save_pretrained(folder)
    code, out, _ = cli("tasks", "upload", "cli-faq", str(folder), "--json")
    uploaded = json.loads(out)
    assert code == 0 and uploaded["task"] == "cli-faq" and uploaded["kind"] == "prompt"
    v1 = uploaded["version"]

    artifact = tmp_path / "faq-v2.safetensors"
    artifact.write_bytes(prompt_artifact(server[1], seed=2))
    v2 = hashlib.sha256(artifact.read_bytes()).hexdigest()  # a version is the sha256 of the artifact
    code, out, _ = cli("tasks", "upload", "cli-faq", str(artifact))
    assert code == 0 and out.startswith(f"uploaded cli-faq: prompt adapter, version {v2[:12]} (")

    code, out, _ = cli("tasks", "list")
    rows = [line.split() for line in out.splitlines()]
    assert code == 0 and rows[0] == ["TASK", "VERSION"] and ["cli-faq", v2[:12]] in rows[1:]
    code, out, _ = cli("tasks", "list", "--json")
    assert code == 0 and {"task": "cli-faq", "version": v2} in json.loads(out)["tasks"]

    code, out, _ = cli("tasks", "show", "cli-faq")
    assert code == 0 and f"version    {v2}" in out and "kind       prompt" in out
    history = [ln.split()[0] for ln in out.split("history (newest first):\n")[1].splitlines()[1:]]
    assert history == [v2, v1]
    code, out, _ = cli("tasks", "show", "cli-faq", "--json")
    assert code == 0 and [h["version"] for h in json.loads(out)["history"]] == [v2, v1]

    code, out, _ = cli("tasks", "rollback", "cli-faq")
    assert (code, out) == (0, f"cli-faq: version {v1[:12]} is current again\n")
    assert current_version(server, "cli-faq") == v1
    code, out, _ = cli("tasks", "rollback", "cli-faq", "--version", v2[:8])  # a prefix, as the tables show
    assert code == 0 and current_version(server, "cli-faq") == v2
    code, _, err = cli("tasks", "rollback", "cli-faq", "--version", "fff-not-a-version")
    assert code == 2 and "found none" in err and current_version(server, "cli-faq") == v2

    code, out, _ = cli("tasks", "delete", "cli-faq")
    assert (code, out) == (0, "deleted cli-faq\n")
    assert cli("tasks", "show", "cli-faq")[::2] == (2, "prefixserve: task 'cli-faq' is not registered\n")


@slow
def test_server_errors_exit_2_with_the_servers_message(cli, tmp_path):
    assert cli("tasks", "show", "nope")[::2] == (2, "prefixserve: task 'nope' is not registered\n")
    assert cli("tasks", "delete", "nope")[0] == 2
    assert cli("chat", "--task", "nope", stdin="Hi\n")[::2] == (2, "prefixserve: task 'nope' is not registered\n")
    assert cli("bench", "--task", "nope", "--requests", "1")[::2] == (2, "prefixserve: task 'nope' is not "
                                                                         "registered\n")
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"certainly not an adapter")
    code, _, err = cli("tasks", "upload", "junk", str(junk))
    assert code == 2 and err.startswith("prefixserve: ") and "junk" not in cli("tasks", "list")[1]
    code, _, err = cli("tasks", "upload", "junk", str(tmp_path / "missing"))
    assert code == 2 and "missing" in err and "nothing is there" in err


@slow
def test_chat_sends_the_whole_conversation_each_turn(cli, server, received):
    tokenizer = server[1].backbone.tokenizer
    system = {"role": "system", "content": "You answer in one short sentence."}
    turn1 = {"role": "user", "content": "What is the capital of France?"}
    turn2 = {"role": "user", "content": "And of Italy?"}
    with PrefixServeClient(server[0], timeout=60) as client:
        reply1 = client.generate(messages=[system, turn1], max_new_tokens=12, temperature=0).text
    received.clear()

    code, out, err = cli("chat", "--temperature", "0", "--max-new-tokens", "12", "--system", system["content"],
                         stdin=f"{turn1['content']}\n\n{turn2['content']}\n")
    assert code == 0 and err == "" and out.startswith(reply1 + "\n") and out.endswith("\n")
    assert len(received) == 2  # the blank line sent nothing
    expected = [[system, turn1], [system, turn1, {"role": "assistant", "content": reply1}, turn2]]
    for (prompt_ids, task, _), messages in zip(received, expected):
        assert task is None
        assert prompt_ids == chat_prompt_ids(tokenizer, [ChatMessage(**m) for m in messages])
    assert len(received[1][0]) > len(received[0][0])


@slow
def test_chat_ends_at_exit(cli, received):
    code, out, _ = cli("chat", "--temperature", "0", "--max-new-tokens", "3", stdin="Hi\n/exit\nnever sent\n")
    assert code == 0 and out.endswith("\n") and len(received) == 1


@slow
def test_bench_round_robins_and_reports(cli, server, received):
    with PrefixServeClient(server[0]) as client:
        client.upload_task("cli-bench", prompt_artifact(server[1], seed=5))
    try:
        code, out, _ = cli("bench", "--task", "base", "cli-bench", "--requests", "6", "--concurrency", "2",
                           "--max-new-tokens", "4")
    finally:
        with PrefixServeClient(server[0]) as client:
            client.delete_task("cli-bench")
    assert code == 0 and len(out.strip().splitlines()) == 1
    report = json.loads(out)
    assert report["requests"] == report["requested"] == 6 and report["errors"] == 0
    assert report["tasks"] == ["base", "cli-bench"] and not report["stopped_by_deadline"]
    assert report["output_tokens"] == 6 * 4 and report["output_tokens_per_s"] > 0
    assert 0 < report["ttft_p50_s"] <= report["ttft_p95_s"] <= report["latency_p95_s"] <= report["duration_s"]
    assert report["ttft_p50_s"] <= report["latency_p50_s"] <= report["latency_p95_s"]
    assert sorted(task or "base" for _, task, _ in received) == ["base"] * 3 + ["default/cli-bench"] * 3
    assert max(unfinished for _, _, unfinished in received) < 2  # never more than --concurrency at once


@slow
def test_bench_stops_at_its_deadline(cli, server):
    start = time.monotonic()
    code, out, _ = cli("bench", "--requests", "1000", "--concurrency", "2", "--max-new-tokens", "400",
                       "--max-duration-s", "1")
    report = json.loads(out)
    assert code == 0 and report["stopped_by_deadline"] and report["requests"] < 1000
    assert report["duration_s"] < 3 and time.monotonic() - start < 10
    deadline = time.monotonic() + 5  # the cancelled streams were closed, which aborts them on the server
    while server[1].has_unfinished():
        assert time.monotonic() < deadline, "the engine still runs the requests bench abandoned"
        time.sleep(0.05)


def test_bench_refuses_nonsense_bounds(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["bench", "--requests", "0", "--url", "http://127.0.0.1:1"])
    assert exited.value.code == 2 and "--requests" in capsys.readouterr().err


def run_process(*argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prefixserve.clients.cli_commands", *argv], input="Hi\n",
                          capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("argv", [["tasks", "list"], ["chat"], ["bench", "--requests", "1"]])
def test_a_dead_url_is_a_clear_message_and_exit_2(argv):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    done = run_process(*argv, env={"PREFIXSERVE_URL": url, "PREFIXSERVE_API_KEY": "sk-unused"})
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith(f"prefixserve: cannot connect to the server at {url} (")
    assert "is `prefixserve serve` running there?" in done.stderr


def test_the_client_commands_import_no_torch_nor_server():
    code = ("import sys, prefixserve.clients.cli_commands; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'transformers', 'fastapi'} "
            "or m.startswith(('prefixserve.engine', 'prefixserve.server.app', 'prefixserve.models'))))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (0, "[]\n")
