"""Combining a run's committed outputs into one result per file name.

``formats`` is the rule per name (lines concatenated, gzip members joined, or kept per shard
with a manifest); ``parts`` holds the shared types (what was combined, the parts, the
``Combiner`` strategy a deployment hands in, a local ``--out`` folder's record of the run it
holds); ``custom`` the task folder a combine follows and the task's own ``combine(paths, out)``;
``combine`` is :func:`combine_run`; ``local`` the combiner on this machine (gzip and text
parts looked at before they are joined). A backend's own way (composing in
the bucket) comes in as a ``Combiner``; this room never imports a backend.
"""

from runner.results.combine import combine_run
from runner.results.formats import Method, plan_for
from runner.results.local import LocalCombiner
from runner.results.parts import Combined, Combiner, OutTarget, check_out

__all__ = [
    "Combined",
    "Combiner",
    "LocalCombiner",
    "Method",
    "OutTarget",
    "check_out",
    "combine_run",
    "plan_for",
]
