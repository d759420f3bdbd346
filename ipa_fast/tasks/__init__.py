"""The built-in tasks: one registry (``registry``), their evaluation scores and metrics
(``metrics``) and the evaluation protocol (``evaluation``: held-out splits, seeds, intervals).

``from ipa_fast import tasks; tasks.get("lexical")`` — the registry's functions are re-exported here.
"""
from ipa_fast.tasks.registry import TASKS, Task, get, names, recipes, resolve

__all__ = ["Task", "TASKS", "get", "names", "recipes", "resolve"]
