"""Tenants and their task namespaces. Every task lives in the engine as `<tenant>/<task>`, and a
tenant can only name its own: '/' is refused in task names it sends. Until API keys are
configured (the tenants work of the HTTP issue), every caller is the default tenant."""

from __future__ import annotations

import re
from collections.abc import Iterable

from prefixserve.engine.task_pointers import BASE_TASK, MAX_TASK_NAME_CHARS, TASK_NAME_PATTERN
from prefixserve.errors import InvalidRequestError

_TASK_NAME = re.compile(TASK_NAME_PATTERN)

DEFAULT_TENANT = "default"


def tenant_task(tenant: str, task: str | None, backbone_name: str) -> str | None:
    """The engine's name for a tenant's task; None for the plain backbone."""
    if task is None or task in (BASE_TASK, backbone_name):
        return None
    if "/" in task:
        raise InvalidRequestError(f"task names may not contain '/', found {task!r:.80}")
    # Checked here, as the engine will, so nothing (an upload, a training job that would train for
    # minutes and then fail to publish) gets past the API with a name the engine refuses.
    max_chars = MAX_TASK_NAME_CHARS - len(tenant) - 1  # the engine's limit covers "<tenant>/<task>"
    if not 0 < len(task) <= max_chars or not _TASK_NAME.match(task):
        raise InvalidRequestError(f"expected a task name of 1..{max_chars} letters, digits and ._:- starting with a "
                                  f"letter or digit, found {task!r:.80}")
    return f"{tenant}/{task}"


def tenant_tasks(tenant: str, engine_tasks: Iterable[str]) -> list[str]:
    """The tenant's own task names (without the namespace), sorted."""
    prefix = f"{tenant}/"
    return sorted(t[len(prefix):] for t in engine_tasks if t.startswith(prefix))
