"""Tenants and their task namespaces. Every task lives in the engine as `<tenant>/<task>`, and a
tenant can only name its own: '/' is refused in task names it sends. Until API keys are
configured (the tenants work of the HTTP issue), every caller is the default tenant."""

from __future__ import annotations

from collections.abc import Iterable

from prefixserve.adapters_store.store import MAX_TASK_NAME_CHARS
from prefixserve.engine.adapters import BASE_TASK
from prefixserve.errors import InvalidRequestError

DEFAULT_TENANT = "default"


def tenant_task(tenant: str, task: str | None, backbone_name: str) -> str | None:
    """The engine's name for a tenant's task; None for the plain backbone."""
    if task is None or task in (BASE_TASK, backbone_name):
        return None
    if "/" in task:
        raise InvalidRequestError(f"task names may not contain '/', found {task!r}")
    max_chars = MAX_TASK_NAME_CHARS - len(tenant) - 1  # the store's limit covers "<tenant>/<task>"
    if not 0 < len(task) <= max_chars or not task.isprintable():
        raise InvalidRequestError(f"expected a task name of 1..{max_chars} printable characters, found {task!r:.80}")
    return f"{tenant}/{task}"


def tenant_tasks(tenant: str, engine_tasks: Iterable[str]) -> list[str]:
    """The tenant's own task names (without the namespace), sorted."""
    prefix = f"{tenant}/"
    return sorted(t[len(prefix):] for t in engine_tasks if t.startswith(prefix))
