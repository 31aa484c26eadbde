"""The DP-fairness mitigations on UCI Adult, at the paper's three privacy levels (configs/adult.py's setting).

DPSGD-F (Xu et al. 2021), DPSGD-Global (Bu et al. 2021) and DPSGD-Global-Adapt (Esipova et al. 2023) on
configs/adult.py's data, network, optimiser and epochs, each level's noise calibrated to the paper's epsilon with
the method's own count release composed in (jaxdp.methods), at the natural female fraction (32.5%), 5% and 1%, 3
seeds: 3 methods x 3 levels x 3 fractions x 3 seeds = 81 runs, next to configs/adult.py's DP-SGD and non-private
runs at the same settings (the same run names: ``--workdir results/adult`` reuses a finished configs/adult.py
sweep's 36 runs at these fractions instead of training them again).

Parameters: fair-dp's for Adult (experiment_scripts/adult_script.sh): Global's Z = 50 and Global-Adapt's Z0 = 50,
its eta_Z = 0.1, tau = 1, count noise 10 (the last three are jaxdp.methods' reference values), DPSGD-F's count noise
10 and C0 = C = 0.5. fair-dp raises the learning rate of the global methods from 0.01 to 0.2 to offset their
C/Z = 0.01 scaling under SGD; configs/adult.py trains with Adam, whose step does not grow with the gradient's scale,
so every method keeps its learning rate (2e-3). Run it with::

    python launch/sweep.py --config configs/adult_mitigations.py --config.data.manual_dir=PATH --workdir results/adult
"""

from pathlib import Path

from jaxdp_study.grid import grid, load_config
from jaxdp_study.paper import PAPER_EPSILONS

FEMALE_FRACTIONS = (0.325, 0.05, 0.01)
THRESHOLD = 50.0  # fair-dp's Z and Z0 on Adult (jaxdp.methods' reference: 100)


def get_config():
    c = load_config(Path(__file__).with_name("adult.py"))
    c.name = "adult_mitigations"
    seeds = c.sweep.nondp.seed
    for level, epsilon in PAPER_EPSILONS.items():
        common = {"privacy": (level,), "dp.target_epsilon": (epsilon,), "data.female_fraction": FEMALE_FRACTIONS,
                  "seed": seeds}
        c.sweep[level] = grid(common)  # DP-SGD: configs/adult.py's runs at these fractions
        c.sweep[f"{level}_dpsgd_f"] = grid({**common, "dp.method": ("dpsgd_f",)})
        c.sweep[f"{level}_global"] = grid({**common, "dp.method": ("dpsgd_global",),
                                           "dp.dpsgd_global.threshold": (THRESHOLD,)})
        c.sweep[f"{level}_global_adapt"] = grid({**common, "dp.method": ("dpsgd_global_adapt",),
                                                 "dp.dpsgd_global_adapt.initial_threshold": (THRESHOLD,)})
    c.sweep.nondp = grid({"privacy": ("nondp",), "data.female_fraction": FEMALE_FRACTIONS, "seed": seeds})
    return c
