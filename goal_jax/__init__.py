"""goal_jax: GOAL (Grounded Joint Layout Alignment) in JAX/Flax."""

__version__ = "0.1.0"
