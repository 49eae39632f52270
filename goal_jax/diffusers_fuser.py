"""goal_jax's GLIGEN fuser position embedding in a diffusers (torch) U-Net.

A U-Net config with ``"fuser_position_embedding": "sinusoidal_2d"`` (goal_jax's extension, e.g.
the shapes world's, ``assets/shapes_world/pipeline/unet``) has the state dict of a diffusers
GLIGEN U-Net, and diffusers loads it, but ignores the key (it warns that it does): its fusers
then see visual tokens without their places and sample other images than goal_jax. After
``from_pretrained``, :func:`add_fuser_position_embedding` makes the diffusers U-Net compute what
goal_jax computes (tests/test_unet.py checks the two agree)::

    pipe = StableDiffusionGLIGENPipeline.from_pretrained("assets/shapes_world/pipeline")
    add_fuser_position_embedding(pipe.unet, "assets/shapes_world/pipeline/unet")

torch is imported by the caller's diffusers model, not by this module (goal_jax runs without
torch); the embedding itself is goal_jax.models.attention.sinusoidal_2d.
"""

from __future__ import annotations

import json
import os


def fuser_position_embedding_of(unet_folder: str) -> str | None:
    """The ``fuser_position_embedding`` of the U-Net config in ``unet_folder`` (None: none)."""
    path = os.path.join(unet_folder, "config.json")
    with open(path, encoding="utf-8") as f:
        kind = json.load(f).get("fuser_position_embedding")
    if kind is not None:
        from goal_jax.models.attention import FUSER_POSITION_EMBEDDINGS

        if kind not in FUSER_POSITION_EMBEDDINGS:
            raise ValueError(f"{path}: fuser_position_embedding {kind!r} is not one of "
                             f"{FUSER_POSITION_EMBEDDINGS}")
    return kind


def add_fuser_position_embedding(unet, unet_folder: str) -> int:
    """Adds the fuser position embedding named in ``unet_folder``'s config.json to every GLIGEN
    fuser (``GatedSelfAttentionDense``) of the diffusers ``unet`` loaded from that folder, with
    hooks (the state dict is unchanged): each ``Transformer2DModel`` records the height and
    width of its input, and each fuser's ``norm1`` adds :func:`sinusoidal_2d` of that grid to
    its visual rows, as goal_jax.models.attention.GatedSelfAttentionDense does. Returns the
    number of fusers changed (0 when the config has no embedding; nothing is changed then).

    Raises:
      ValueError: ``unet`` was already given the embedding, or has no GLIGEN fusers while the
        config names one.
    """
    kind = fuser_position_embedding_of(unet_folder)
    if kind is None:
        return 0
    if getattr(unet, "_goal_jax_fuser_position_embedding", None) is not None:
        raise ValueError("add_fuser_position_embedding: this U-Net has it already")
    import torch
    from diffusers.models.attention import GatedSelfAttentionDense
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    from goal_jax.models.attention import sinusoidal_2d

    count = 0
    for block in unet.modules():
        if not isinstance(block, Transformer2DModel):
            continue
        fusers = [m for m in block.modules() if isinstance(m, GatedSelfAttentionDense)]
        if not fusers:
            continue
        grid = {}

        def record(module, args, kwargs, grid=grid):
            hidden = args[0] if args else kwargs["hidden_states"]
            grid["hw"] = tuple(hidden.shape[-2:])  # NCHW

        def add(module, args, out, grid=grid):
            height, width = grid["hw"]
            pe = torch.from_numpy(sinusoidal_2d(height, width, out.shape[-1])).to(out)
            return torch.cat([out[:, :height * width] + pe, out[:, height * width:]], dim=1)

        block.register_forward_pre_hook(record, with_kwargs=True)
        for fuser in fusers:
            fuser.norm1.register_forward_hook(add)
            count += 1
    if not count:
        raise ValueError(f"{unet_folder}: the config names fuser_position_embedding {kind!r} "
                         "but the U-Net has no GLIGEN fusers")
    unet._goal_jax_fuser_position_embedding = kind
    return count
