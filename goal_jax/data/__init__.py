"""Data layer: on-disk format (format.py), goal2k TFDS builder writing ArrayRecord files
(goal2k.py), synthetic shapes dataset (shapes.py), importers (importers.py), box transforms
(boxes.py) and the streaming grain input pipeline (pipeline.py). TensorFlow / tfds / grain are
imported only by goal2k.py, boxes.py and pipeline.py, so
``from goal_jax.data import format, shapes, importers`` stays light."""
