"""Trains the shapes world from scratch and writes it as checkpoint folders (``make world``).

    python scripts/world.py --config configs/world.py --workdir runs/world --out assets/shapes_world
    python scripts/world.py --config configs/world.py:smoke --workdir /tmp/w --out /tmp/w/out
    python scripts/world.py ... --config.ldm.steps=4000      # any field can be overridden
    python scripts/world.py --config configs/world.py --workdir runs/gligen --out runs/gligen/out \
        --base assets/shapes_world     # only the GLIGEN stage, on the shipped VAE/CLIP/LDM
    python scripts/world.py ... --base assets/shapes_world --from_stage ldm \
        --config.model.unet.channels="(64,96,96)" \
        --config.model.unet.attention="(False,True,True)"   # a new U-Net, shipped VAE/CLIP
    python scripts/world.py ... --base assets/shapes_world --from_stage clip \
        --config.clip.steps=2000     # a new CLIP (its text tower: the text encoder) and U-Net

Stages, in order (each logs progress with ETA, saves its state every ``save_every`` steps and
resumes from there; a finished stage is only reloaded): render the data, train the VAE, train
the CLIP, encode latents, LDM-pretrain the U-Net, train its GLIGEN layers, export. The
recipe is goal_jax.world.recipe.run. Exit code 2 on a bad flag or config value.
"""

from __future__ import annotations

import os
import shlex
import sys

from absl import app, flags
from ml_collections import config_flags

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(_REPO, "configs", "world.py"),
    "World config file with an optional preset: configs/world.py:smoke.", lock_config=True)
flags.DEFINE_string("workdir", None, "Working folder (rendered data, stage checkpoints).")
flags.DEFINE_string("out", None, "Output folder (pipeline/, clip/, world.json).")
flags.DEFINE_string("base", None, "Rerun the stages from --from_stage on (then export and "
                    "evaluate) on the earlier stages of the world in this folder (pipeline/, "
                    "clip/, world.json), e.g. assets/shapes_world.")
flags.DEFINE_enum("from_stage", "gligen", ["clip", "ldm", "gligen"], "With --base: the first "
                  "stage to rerun. gligen: only the GLIGEN stage, on the base's VAE, CLIP and "
                  "LDM U-Net; ldm: the LDM and GLIGEN stages (a new U-Net), on the base's VAE "
                  "and CLIP; clip: a new CLIP (and text encoder) and U-Net, on the base's VAE.")
flags.mark_flags_as_required(["workdir", "out"])


def main(argv) -> None:
    del argv
    from absl import logging

    from goal_jax.world import recipe

    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO

    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    if flags.FLAGS["from_stage"].present and not flags.FLAGS.base:
        print("error: --from_stage needs --base (the world whose earlier stages are reused)",
              file=sys.stderr)
        sys.exit(2)
    if flags.FLAGS.base:
        try:  # run_from_base checks the base before anything runs
            recipe.run_from_base(_CONFIG.value, flags.FLAGS.workdir, flags.FLAGS.out,
                                 flags.FLAGS.base, flags.FLAGS.from_stage, command=command)
        except recipe.BaseWorldError as e:
            print(f"error: --base: {e}", file=sys.stderr)
            sys.exit(2)
    else:
        recipe.run(_CONFIG.value, flags.FLAGS.workdir, flags.FLAGS.out, command=command)


if __name__ == "__main__":
    app.run(main)
