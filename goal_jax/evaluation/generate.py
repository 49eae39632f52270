"""The generator hook and resumable image writing.

A generator is any callable ``(caption: str, layout: Layout, seed: int) -> uint8 [H, W, 3]``.
When it also has ``generate_batch(captions, layouts, seeds) -> uint8 [B, H, W, 3]`` and a
``batch_size`` attribute, :func:`render` calls it in batches (one compiled program for the
whole run). :class:`SamplerGenerator` wraps ``goal_jax.sampling.GLIGENPipeline``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Sequence

import numpy as np

from goal_jax import layout as layout_lib

Generator = Callable[[str, layout_lib.Layout, int], np.ndarray]


class SamplerGenerator:
    """The GLIGEN pipeline as a generator hook.

    Args:
      sampler: ``goal_jax.sampling.GLIGENPipeline``.
      options: ``goal_jax.sampling.SampleOptions``.
      batch_size: items per sampler call (default: the sampler's device count); the last
        batch is filled with copies so every call has the same shape (one compile).
    """

    def __init__(self, sampler, options, batch_size: int | None = None):
        self.sampler = sampler
        self.options = options
        devices = int(sampler.mesh.size)
        size = devices if batch_size is None else int(batch_size)
        self.batch_size = -(-max(1, size) // devices) * devices

    def __call__(self, caption: str, layout: layout_lib.Layout, seed: int) -> np.ndarray:
        return self.generate_batch([caption], [layout], [seed])[0]

    def generate_batch(self, captions: Sequence[str], layouts: Sequence[layout_lib.Layout],
                       seeds: Sequence[int]) -> np.ndarray:
        n = len(captions)
        fill = self.batch_size - n % self.batch_size if n % self.batch_size else 0
        captions = list(captions) + [captions[-1]] * fill
        layouts = list(layouts) + [layouts[-1]] * fill
        seeds = list(seeds) + [seeds[-1]] * fill
        out = []
        for s in range(0, len(captions), self.batch_size):
            e = s + self.batch_size
            out.append(self.sampler.sample(captions[s:e], layouts[s:e], seeds[s:e],
                                           self.options).images)
        return np.concatenate(out)[:n]


@dataclasses.dataclass(frozen=True)
class Request:
    """One image to make: caption, layout, seed and the PNG path it goes to."""

    caption: str
    layout: layout_lib.Layout
    seed: int
    path: str


def _check_image(image: Any, what: str) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"generator returned {image.dtype} {image.shape} for {what}; expected "
                         "uint8 [H, W, 3]")
    return image


TMP_PREFIX = ".tmp-"  # an image being written: "<dir>/.tmp-<name>", renamed when complete


def remove_partial_writes(folders: Sequence[str]) -> int:
    """Deletes ``.tmp-*`` files (images an interrupted :func:`render` did not finish) in
    ``folders``; returns how many."""
    n = 0
    for folder in dict.fromkeys(folders):
        if not os.path.isdir(folder):
            continue
        for name in os.listdir(folder):
            if name.startswith(TMP_PREFIX):
                os.remove(os.path.join(folder, name))
                n += 1
    return n


def render(requests: Sequence[Request], generator: Generator, overwrite: bool = False) -> int:
    """Makes every requested image that does not exist yet (all when ``overwrite``), in
    batches when the generator has ``generate_batch``; returns how many were made. Images are
    written to their paths (PNG), not kept in memory: read them back with :func:`load_images`.

    Each image is written to ``.tmp-<name>`` and renamed, so an interrupted run leaves no
    half-written image under the real name; such leftovers are deleted at the start (the
    benchmarks' scorers read every file of the folder).

    Several processes (goal_jax.distributed): every process calls ``render`` with the same
    requests and makes its share (request k on process ``k % count``), so each image is
    written once, by one process; it returns when every image is written, with the number made
    by all processes.
    """
    from PIL import Image

    from goal_jax import distributed

    if distributed.is_primary():
        remove_partial_writes([os.path.dirname(os.path.abspath(r.path)) for r in requests])
    distributed.barrier("goal_jax.render.start")  # no process writes before the clean-up
    todo = [i for i in distributed.my_share(len(requests))
            if overwrite or not os.path.isfile(requests[i].path)]
    use_batch = hasattr(generator, "generate_batch")
    batch = int(getattr(generator, "batch_size", 1) or 1) if use_batch else 1
    for s in range(0, len(todo), batch):
        chunk = todo[s:s + batch]
        if use_batch:
            out = generator.generate_batch([requests[i].caption for i in chunk],
                                           [requests[i].layout for i in chunk],
                                           [requests[i].seed for i in chunk])
        else:
            r = requests[chunk[0]]
            out = [generator(r.caption, r.layout, r.seed)]
        for i, image in zip(chunk, out):
            image = _check_image(image, repr(requests[i].caption))
            path = requests[i].path
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            tmp = os.path.join(os.path.dirname(os.path.abspath(path)),
                               TMP_PREFIX + os.path.basename(path))
            try:
                Image.fromarray(image).save(tmp, format="PNG")
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
    index, count = distributed.process_index_and_count()
    if count > 1:
        print(f"process {index} of {count}: made {len(todo)} of {len(requests)} image(s)",
              flush=True)
    made = distributed.sum_over_processes(len(todo))
    distributed.barrier("goal_jax.render.end")  # every image is on disk for the scorers
    return made


def load_images(paths: Sequence[str], chunk: int = 32):
    """Yields (start index, uint8 [n, H, W, 3]) for consecutive chunks of ``paths``."""
    from PIL import Image

    for s in range(0, len(paths), chunk):
        images = []
        for path in paths[s:s + chunk]:
            with Image.open(path) as im:
                images.append(np.asarray(im.convert("RGB")))
        yield s, np.stack(images)
