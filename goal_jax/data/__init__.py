"""Data layer: on-disk format (format.py), goal2k TFDS builder (goal2k.py), synthetic shapes
dataset (shapes.py), importers (importers.py), box transforms (boxes.py) and the tf.data input
pipeline (pipeline.py). TensorFlow / tfds are imported only by goal2k.py and pipeline.py, so
``from goal_jax.data import format, shapes, importers`` stays light."""
