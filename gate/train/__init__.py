"""Training, never scoring: the demo's SmolLM2 fine-tunes and the tiny models of tests and benchmarks.

Besides ``gate.runner``, the only package that imports torch, transformers and peft. Nothing in
gate's evaluation path imports it: the runner scores the folders these builders write exactly as it
scores a user's.
"""
