"""The smallest end-to-end sweep, for tests and smoke checks: 2 privacy levels x 2 female fractions.

Generated 16x16 images, 200 of them (balanced test set), the smallest ResNet (stage_sizes (1, 1, 1, 1),
width 8), one epoch. Its numbers mean nothing; it proves the pipeline (data, training, accounting, resume,
report) runs::

    python launch/sweep.py --config configs/tiny.py --workdir /tmp/jaxdp-tiny
"""

from jaxdp.config import base_config
from jaxdp_study.grid import grid


def get_config():
    c = base_config()
    c.name = "tiny"
    c.data.source = "synthetic"
    c.data.image_size = 16
    c.data.total = 200
    c.data.split_scheme = "official"  # balanced test set: 20 men to measure even at 90% female
    c.data.synthetic_num_images = 400  # the smallest pool these cells fit in
    c.model.stage_sizes = (1, 1, 1, 1)
    c.model.width = 8
    c.model.num_groups = 4
    c.optim.learning_rate = 1e-3
    c.train.epochs = 1
    c.train.batch_size = 32
    c.train.eval_every_steps = 4
    c.train.checkpoint_every_steps = 4
    c.train.eval_batch_size = 64
    c.train.progress = False
    c.dp.clipping_strategy = "vmap"  # compiles fastest on this tiny model; the results are the same as "auto"'s
    c.sweep.imbalance = grid({"privacy": ("medium", "nondp"), "data.female_fraction": (0.7, 0.9)})
    return c
