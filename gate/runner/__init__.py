"""The GPU side: the only package that imports torch, transformers, peft or lm_eval.

``run(request, progress)`` is the recipe: load the base once, score it, attach each adapter in
turn, score, detach; write results.json. The rest of gate reads only results.json.
"""

from gate.runner.recipe import RESULTS_NAME, RunOutcome, run

__all__ = ["RESULTS_NAME", "RunOutcome", "run"]
