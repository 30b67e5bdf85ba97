"""fot: Focused Transformer (FoT, arXiv 2307.03170) training and inference in JAX/Flax.

Kept deliberately light: importing ``fot`` pulls in nothing heavy. Use the sub-packages
(``fot.ops``, ``fot.model``, ``fot.parallel``, ...) directly.
"""

__version__ = "0.1.0"
