"""Tasks: what one job is (prompt, markers, examples, loss rule, decoding, metrics), behind one interface.

    from nichelm.tasks import get_task
    task = get_task({"type": "classification", "labels": ["yes", "no"]})
    task.prompt(tok, "some text")          # prompt ids, marker-safe
    task.metrics(predictions, references)  # the task's own metrics dict
    task.to_json()                         # task.json; get_task(task.to_json()) gives it back

Types: "correction" (tasks.correction: text -> corrected text; the default, and what a task.json
without "type" is), "classification" (tasks.classification: text -> one label of a fixed set,
label-constrained decoding) and "language-model" (tasks.language_model: plain text windows, loss on
every token, for pre-training; scored by perplexity). The interface is tasks.base.Task.
"""

from __future__ import annotations

import dataclasses

from nichelm.errors import UserError
from nichelm.tasks.base import Task
from nichelm.tasks.classification import ClassificationTask
from nichelm.tasks.correction import CorrectionTask
from nichelm.tasks.language_model import LanguageModelTask

TASK_TYPES: dict[str, type[Task]] = {"correction": CorrectionTask, "classification": ClassificationTask,
                                     "language-model": LanguageModelTask}
DEFAULT_TYPE = "correction"       # task.json and project files from before task types


def get_task(config, where: str = "task", prefix: str = "") -> Task:
    """The task a config describes: a task.json / [task] table dict, a dataclass such as
    config.TaskConfig (its fields), or a Task (returned as it is). No "type": correction.
    `where` (e.g. "project.toml: [task]") starts every error message; `prefix` ("task.") goes before
    the keys they name."""
    if isinstance(config, Task):
        return config
    given = None
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        given = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
                 if not f.metadata.get("internal")}
        config = given
    if not isinstance(config, dict):
        raise UserError(f"{where}: a task is a table of settings, not {type(config).__name__}")
    kind = config.get("type", DEFAULT_TYPE)
    if kind not in TASK_TYPES:
        raise UserError(f"{where}: '{prefix}type' is {kind!r}; use one of {', '.join(TASK_TYPES)}")
    cls = TASK_TYPES[kind]
    if given is not None:           # a settings dataclass holds every type's fields: keep this type's own
        known = {f.name for f in dataclasses.fields(cls)}
        config = {k: v for k, v in given.items() if k in known or k == "type"}
    return cls.from_json(config, where, prefix)


def task_fingerprint(task: Task) -> dict:
    """The task's settings as a project fingerprint holds them: task.json without "type" for the default
    type, so runs prepared before task types keep their fingerprint (and their data)."""
    d = task.to_json()
    if d["type"] == DEFAULT_TYPE:
        del d["type"]
    return d


__all__ = ["Task", "CorrectionTask", "ClassificationTask", "LanguageModelTask", "TASK_TYPES", "get_task",
           "task_fingerprint"]
