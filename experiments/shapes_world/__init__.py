"""The GOAL experiment in the shapes world (issue 16).

Does fine-tuning the world's GLIGEN with L_LDM + α L_DSA + β L_MAA beat fine-tuning with L_LDM
alone, measured over seeds with an oracle that reads pixels only? One command::

    python -m experiments.shapes_world.run --world assets/shapes_world --workdir runs/exp \\
        --out experiments/shapes_world

Modules (one job each):

* :mod:`.arms`      the arms (which losses, which weights) and the experiment sizes; the
                    scripts/train.py command line of one arm x seed.
* :mod:`.datasets`  the GOAL2K-like fine-tuning set (world split "finetune", on-disk format)
                    and the held-out evaluation layouts (world split "eval").
* :mod:`.scales`    the scale of every loss term (value and gradient norm) at the base world.
* :mod:`.evaluate`  sampling of every run and scoring with the oracle and the world CLIP.
* :mod:`.report`    results.json -> RESULTS.md (tables, picture grid, loss curves).
* :mod:`.persist`   restoring finished runs from a previous results.json (across sessions).
* :mod:`.attention` MAAlign's cross-attention maps per phrase (the paper's Figure 4).
* :mod:`.run`       the driver: resumable, progress with ETA over the whole experiment.
* :mod:`.export`    a run's fine-tuned U-Net as a complete diffusers GLIGEN pipeline folder.
"""
