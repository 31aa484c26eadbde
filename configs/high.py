"""The paper's high-privacy experiment: female fraction 70%, 80%, 90%, 99%, 99.9% (five runs).

The level's noise multiplier and the rest of the setting: jaxdp_study/paper.py. Run it with::

    python launch/sweep.py --config configs/high.py            # results in results/high/
"""

from jaxdp_study.paper import level_config


def get_config():
    return level_config("high")
