"""One-off: the paired sweep with fair-dp's standardisation (mean and sample SD over all 45,222 complete rows,
training and test rows together) instead of jaxdp's (the test rows'). Not a feature: jaxdp.data.adult._materialise
is replaced in this process only, then launch/sweep.py runs in-process (launcher local)."""
import runpy
import sys

import numpy as np

import jaxdp.data.adult as A


def materialise_all_rows(table, train_rows, test_rows, held_rows, *, seed, group_attribute):
    mean = table.numerical.mean(axis=0)
    std = table.numerical.std(axis=0, ddof=1)
    group = table.group(group_attribute)
    order = np.random.default_rng([seed, 2])

    def split(rows):
        rows = rows[order.permutation(len(rows))]
        return A.GroupedSplit(inputs=table.features(rows, mean, std), label=table.label[rows].astype(np.int32),
                              group=group[rows], label_attribute=A.SPLIT_LABEL, group_attribute=group_attribute)

    return A.Splits(split(train_rows), split(test_rows), None)


A._materialise = materialise_all_rows
sys.argv = ["launch/sweep.py", *sys.argv[1:]]
runpy.run_path("launch/sweep.py", run_name="__main__")
