"""Training: train state, optax optimizers, steps, the Trainer (settings, loop), orbax checkpoints, d-curricula,
metrics.

Gin-free library code; ``fot.train`` is the gin entry point.
"""
from fot.training.curriculum import ConstantD, Curriculum, RandomD, SwitchAtStep, SwitchOnAccuracy
from fot.training.optim import decay_mask, inverse_sqrt_schedule, make_optimizer, make_schedule

__all__ = ["ConstantD", "Curriculum", "RandomD", "SwitchAtStep", "SwitchOnAccuracy", "decay_mask",
           "inverse_sqrt_schedule", "make_optimizer", "make_schedule"]
