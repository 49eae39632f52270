"""The shapes world: a small text-to-image stack trained from scratch by goal_jax itself.

``recipe`` runs the stages (``data`` rendering, ``vae_stage``, ``clip_stage``, ``unet_stage``
for the LDM and GLIGEN stages, each a resumable ``stage.run_stage``), exports diffusers /
Hugging Face folders and scores them with ``evaluate`` (the oracle of
goal_jax.evaluation.oracle). ``models`` holds the config dicts and the parameter initialiser.
See docs/world.md.
"""
