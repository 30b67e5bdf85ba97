"""Evaluation suite: dictionary lookup, passkey, perplexity vs memory, distraction (r_d).

Library functions ``fot.eval.<task>.evaluate(model, params, ...)`` (gin-free); the CLI is
``python -m fot.eval`` (``fot.eval.cli``). Submodules are imported on demand (no heavy imports here).
"""
