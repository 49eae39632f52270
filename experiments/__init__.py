"""Experiments run with goal_jax's own scripts (each subpackage is one experiment)."""
