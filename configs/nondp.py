"""The paper's non-private baseline: female fraction 70%, 80%, 90%, 99%, 99.9% without clipping or noise.

The rest of the setting: jaxdp_study/paper.py. Five runs::

    python launch/sweep.py --config configs/nondp.py              # results in results/nondp/
"""

from jaxdp_study.paper import level_config


def get_config():
    return level_config("nondp")
