"""Combining a run's committed outputs into one result per file name.

``parts`` holds the shared types (what was combined, the parts, the ``Combiner`` strategy a
deployment hands in); ``combine`` is :func:`combine_run` and the local concatenation. A
backend's own way (composing in the bucket) comes in as a ``Combiner``; this room never
imports a backend.
"""

from runner.results.combine import LocalCombiner, combine_run
from runner.results.parts import Combined, Combiner, OutTarget, check_out

__all__ = ["Combined", "Combiner", "LocalCombiner", "OutTarget", "check_out", "combine_run"]
