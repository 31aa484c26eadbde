"""fair-dp's Adult experiment run by jaxdp on fair-dp's own rows: configs/adult_fairdp.py with data.split_file.

The same five methods x jaxdp seeds 0-4 and settings as configs/adult_fairdp.py, but the training and test rows are
exactly those fair-dp's code uses for its seed S (its subsample and 80/20 split), listed by (file, line) in
docs/measurements/fairdp/fairdp_adult_split_seed<S>.json (written by ``launch/fairdp_compare.py --dump_splits``;
jaxdp.data.adult_split). data.female_fraction, total, test_fraction and split_scheme are not used: the rows come
from the file (fair-dp's seed 0: 23,484 training and 5,871 test rows; seed 1: 23,594 and 5,898), and the training
set's size in the privacy accounting is the file's count. jaxdp's seed still sets the order of the rows and all of
training's randomness; the numerical columns are standardised with the listed test rows' statistics, as jaxdp
does. docs/fairdp-comparison.md ("Paired on fair-dp's rows") compares the runs with fair-dp's on the same split::

    python launch/sweep.py --config configs/adult_fairdp_paired.py --config.data.manual_dir=PATH \\
        --config.data.split_file=docs/measurements/fairdp/fairdp_adult_split_seed1.json --workdir results/paired/s1
"""

from pathlib import Path

import ml_collections

from jaxdp_study.grid import load_config

SPLITS = Path(__file__).resolve().parent.parent / "docs" / "measurements" / "fairdp"


def get_config():
    c = load_config(Path(__file__).with_name("adult_fairdp.py"))
    c.name = "adult_fairdp_paired"
    # fair-dp's seed 0 unless the command line names another seed's file.
    c.data.split_file = ml_collections.FieldReference(str(SPLITS / "fairdp_adult_split_seed0.json"), field_type=str)
    return c
