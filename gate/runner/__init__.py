"""The GPU side: the only package that imports torch, transformers, peft or lm_eval.

``Runner`` (gate.runner.recipe) says what planning needs from the GPU stack (``environment``) and
executes a list of work items: load the base once, attach each adapter in turn, score, detach,
store. Planning (gate.work), assembly (gate.assemble) and the run's flow (gate.flow) need no torch.
"""

from gate.runner.recipe import Executed, Runner, environment, execute

__all__ = ["Executed", "Runner", "environment", "execute"]
