r"""Run fair-dp (Esipova et al., ICLR 2023) on UCI Adult with its adult_script.sh settings; record accuracy and time.

fair-dp (github.com/layer6ai-labs/fair-dp) is the reference implementation of DPSGD-F, DPSGD-Global and
DPSGD-Global-Adapt. This driver runs its `main.py` once per (method, seed), one run at a time, with exactly the
`--config` settings of its `experiment_scripts/adult_script.sh` plus three that only move files (`logdir`, one per
run, since the script gives dpsgd-global and dpsgd-global-adapt the same one; `logdir_root`; `data_root`). It times
each run's wall clock around the subprocess, reads fair-dp's own result files (Test_metrics.json,
Privacy_metrics.json, config.json) and its per-epoch tqdm times, and writes one JSON record (commands, fair-dp's
commit, versions, machine, threads, per-run results) to docs/measurements/fairdp/fairdp_adult_<date>.json, rewritten
after every run so a partial sweep is kept (`--resume` goes on from it). What fair-dp does with the data and each
method: docs/fairdp-notes.md.

fair-dp encodes sex as 0/1; which is female is not taken on trust: the driver counts Male/Female rows without a
missing value in the Adult files and matches them with the group sizes fair-dp prints before subsampling.

    python launch/fairdp_compare.py --fairdp_dir /work/fairdp-src --python /work/fairdp-venv/bin/python \
        --adult_dir /work/shared/data/adult --seeds 0,1 --threads 1 \
        --methods regular,dpsgd,dpsgd-f,dpsgd-global,dpsgd-global-adapt --workdir /work/fairdp-work

``--dump_splits`` trains nothing: it runs fair-dp's own configuration and data loading (``config.get_config``, the
script's ``--config`` settings, ``datasets.get_loaders_from_config``) in its venv for each seed and writes, per seed,
the training and test rows fair-dp uses as (file, line number) of the Adult files, for jaxdp's
``config.data.split_file`` (jaxdp.data.adult; docs/fairdp-comparison.md, "Paired on fair-dp's rows"):

    python launch/fairdp_compare.py --dump_splits --fairdp_dir /work/fairdp-src \
        --python /work/fairdp-venv/bin/python --adult_dir /work/shared/data/adult --seeds 0,1 \
        --out docs/measurements/fairdp    # fairdp_adult_split_seed0.json, fairdp_adult_split_seed1.json
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import time
from pathlib import Path

# sha256 of the UCI originals (shared/data/adult/README.md); fair-dp reads exactly these two files.
ADULT_SHA256 = {"adult.data": "5b00264637dbfec36bdeaab5676b0b309ff9eb788d63554ca0a249491c86603d",
                "adult.test": "a2a9044bc167a35b2361efbabec64e89d69ce82d9790d2980119aac5fd7e9c05"}
# experiment_scripts/adult_script.sh at fair-dp c61a163: the settings every run shares, then each method's own.
COMMON = ["group_ratios=1,1", "make_valid_loader=0", "net=mlp", "train_batch_size=256", "valid_batch_size=256",
          "test_batch_size=256", "max_epochs=20", "evaluate_angles=False", "evaluate_hessian=False",
          "angle_comp_step=50"]
DP = ["delta=1e-6", "noise_multiplier=1"]
METHODS = {
    "regular": ["lr=0.01"],
    "dpsgd": ["lr=0.01", *DP, "l2_norm_clip=0.5"],
    "dpsgd-f": ["lr=0.01", *DP, "base_max_grad_norm=0.5", "counts_noise_multiplier=10"],
    "dpsgd-global": [*DP, "l2_norm_clip=0.5", "strict_max_grad_norm=50", "lr=0.2"],
    "dpsgd-global-adapt": [*DP, "l2_norm_clip=0.5", "strict_max_grad_norm=50", "lr=0.2", "bits_noise_multiplier=10",
                           "lr_Z=0.1", "threshold=1"],
}
# Run in fair-dp's venv with its checkout as the working directory: its own config and data loading for each seed
# (as main.py: get_config, then the --config overrides through parse_config_arg, then get_loaders_from_config),
# with datasets.tabular.get_adult_raw wrapped to keep the pandas frames it returns, whose index is the row's
# position among the complete rows of fair-dp's adult_data_formatted.csv. Nothing is trained.
SPLITS_PY = """
import json, sys
from config import get_config, parse_config_arg
from datasets import get_loaders_from_config, tabular
data_root, seeds, common, out = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]
frames = []
get_adult_raw = tabular.get_adult_raw
tabular.get_adult_raw = lambda *a, **k: frames.append(get_adult_raw(*a, **k)) or frames[-1]
result = {}
for seed in seeds:
    cfg = get_config(dataset="adult", method="regular")
    cfg = {**cfg, **dict(parse_config_arg(kv) for kv in [*common, f"seed={seed}", f"data_root={data_root!r}"])}
    train_loader, valid_loader, test_loader = get_loaders_from_config(cfg, "cpu")
    train, valid, test = frames.pop()
    sets = {"train": (train, train_loader), "test": (test, test_loader)}
    assert len(valid) == 0 and valid_loader is test_loader, "adult_script.sh has no validation set"
    for name, (frame, loader) in sets.items():
        assert len(frame) == len(loader.dataset.y), (name, len(frame), len(loader.dataset.y))
        assert frame["protected_group"].tolist() == loader.dataset.z.tolist(), name
    result[seed] = {"train_dataset_size": cfg["train_dataset_size"], "data_dim": cfg["data_dim"],
                    "protected_group": cfg["protected_group"], "group_ratios": list(cfg["group_ratios"]),
                    "make_valid_loader": cfg["make_valid_loader"],
                    **{name: {"index": [int(i) for i in frame.index], "sex": frame["sex"].tolist(),
                              "income": frame["income"].tolist()} for name, (frame, _) in sets.items()}}
with open(out, "w") as f:
    json.dump(result, f)
"""
VERSIONS_PY = ("import json, platform, torch, opacus, numpy, pandas; print(json.dumps(dict(python=platform."
               "python_version(), torch=torch.__version__, opacus=opacus.__version__, numpy=numpy.__version__, "
               "pandas=pandas.__version__, torch_num_threads=torch.get_num_threads())))")


def prepare_data(adult_dir: Path, data_root: Path) -> dict[str, int]:
    """Copy the checked Adult files to data_root/adult (fair-dp writes a CSV beside them); count sexes it keeps."""
    (data_root / "adult").mkdir(parents=True, exist_ok=True)
    counts = {"Male": 0, "Female": 0}
    for name, sha in ADULT_SHA256.items():
        src = adult_dir / name
        if not src.is_file():
            raise SystemExit(f"{src} is missing: put the UCI Adult file {name} there "
                             "(https://archive.ics.uci.edu/dataset/2/adult)")
        if hashlib.sha256(src.read_bytes()).hexdigest() != sha:
            raise SystemExit(f"{src} is not the UCI original (sha256 differs from {sha}); fetch it again")
        shutil.copyfile(src, data_root / "adult" / name)
        lines = src.read_text().splitlines()[1 if name == "adult.test" else 0:]
        for fields in (line.split(", ") for line in lines if line.strip()):
            if "?" not in fields:  # fair-dp drops every row with a missing value (datasets/tabular.py)
                counts[fields[9]] += 1
    return counts


def group_names(stdout: str, sex_counts: dict[str, int]) -> dict[str, str]:
    """Map fair-dp's group ids to sexes by the group sizes it prints before subsampling."""
    block = stdout.split("(before sampling):")[1].split("Name:")[0]
    by_count = {n: sex for sex, n in sex_counts.items()}
    names = {gid: by_count.get(int(n)) for gid, n in re.findall(r"^(\d+)\s+(\d+)$", block, re.M)}
    if sorted(names.values(), key=str) != ["Female", "Male"]:
        raise SystemExit(f"fair-dp's group sizes {block.split()} do not match the Adult sex counts {sex_counts}")
    return {gid: sex.lower() for gid, sex in names.items()}


def epoch_seconds(stderr: str) -> list[int]:
    """Per-epoch training time from fair-dp's tqdm bars (the last 'n/n [mm:ss<' of each bar), in whole seconds."""
    done, last = [], None
    for n, total, clock in re.findall(r"(\d+)/(\d+) \[([\d:]+)<", stderr):
        if n == "0" and last is not None:
            done.append(last)
            last = None
        if n == total:
            last = sum(int(p) * 60 ** i for i, p in enumerate(reversed(clock.split(":"))))
    return done + ([last] if last is not None else [])


def run_one(args, method: str, seed: int, workdir: Path, sex_counts: dict, extra: list[str], tag: str) -> dict:
    logdir = f"adult_{seed}/{tag}"
    # fair-dp's --config values go through ast.literal_eval: paths, and names holding a keyword (global), are quoted.
    config = [*COMMON, *METHODS[method], f"logdir={logdir!r}", f"seed={seed}", *extra,
              f"logdir_root={str(workdir / 'runs')!r}", f"data_root={str(workdir / 'data') + '/'!r}"]
    cmd = [args.python, "main.py", "--dataset=adult", f"--method={method}"]
    cmd += [a for kv in config for a in ("--config", kv)]
    rundir = workdir / "runs" / logdir
    if rundir.exists():
        shutil.rmtree(rundir)  # fair-dp appends to stdout/stderr files of an old run
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    print(f"[{datetime.datetime.now():%H:%M:%S}] {tag} seed {seed}", flush=True)
    load_before, usage_before = os.getloadavg()[0], resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=args.fairdp_dir, env=env, capture_output=True, text=True)
    wall_s = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = usage.ru_utime + usage.ru_stime - usage_before.ru_utime - usage_before.ru_stime
    if proc.returncode != 0:
        raise SystemExit(f"fair-dp failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    names = group_names(proc.stdout, sex_counts)
    test = json.loads((rundir / "Test_metrics.json").read_text())
    privacy = rundir / "Privacy_metrics.json"
    cfg = json.loads((rundir / "config.json").read_text())
    return {"method": method, "seed": seed, "command": cmd, "wall_s": round(wall_s, 1), "cpu_s": round(cpu_s, 1),
            "loadavg_1min_before_after": [load_before, os.getloadavg()[0]],
            "fairdp_tqdm_epoch_s": epoch_seconds(proc.stderr),
            "test_accuracy": test["accuracy"], "test_macro_accuracy": test["macro_accuracy"],
            "test_accuracy_per_group": {names[g]: test[f"accuracy_per_group_{g}"] for g in sorted(names)},
            "group_ids": {names[g]: int(g) for g in names},
            "epsilon": json.loads(privacy.read_text())["epsilon"] if privacy.exists() else None,
            "delta": cfg.get("delta") if privacy.exists() else None,
            "train_size": cfg["train_dataset_size"], "num_features": cfg["data_dim"]}


def complete_rows(adult_dir: Path) -> list[tuple[str, int, list[str]]]:
    """(file, line number from 1, fields without fnlwgt) of each complete row, in fair-dp's order: adult.data then
    adult.test (its first line skipped), blank lines skipped, rows with a ``?`` dropped (datasets/tabular.py), as
    jaxdp's own parse of the files (jaxdp.data.adult) lists them."""
    from jaxdp.data import adult as jaxdp_adult

    rows = []
    for name in jaxdp_adult.FILE_NAMES:
        path = adult_dir / name
        fields, _, numbers, _ = jaxdp_adult._parse(path, path.read_text(), test_file=name == jaxdp_adult.TEST_NAME)
        rows += [(name, number, row[:2] + row[3:]) for row, number in zip(fields, numbers, strict=True)]
    return rows


def dump_splits(args, seeds: list[int], folder: Path) -> None:
    """Per seed, fair-dp's training and test rows as {file: sorted line numbers}, checked three ways: against
    fair-dp's own adult_data_formatted.csv (every field of every complete row), against the sex and income fair-dp
    holds for each selected row, and against jaxdp's parse of the same lines (sex and label)."""
    import csv
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from jaxdp.data import adult as jaxdp_adult
    from jaxdp.data.adult_split import write_split_file

    data_root = args.workdir / "data"
    prepare_data(args.adult_dir, data_root)
    raw = args.workdir / "fairdp_splits_raw.json"
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    proc = subprocess.run([args.python, "-c", SPLITS_PY, str(data_root) + "/", json.dumps(seeds),
                           json.dumps(COMMON), str(raw)], cwd=args.fairdp_dir, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"fair-dp's data loading failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    fair = json.loads(raw.read_text())
    rows = complete_rows(data_root / "adult")
    with open(data_root / "adult" / "adult_data_formatted.csv", newline="") as f:
        formatted = list(csv.reader(f))[1:]
    if len(formatted) != len(rows) or any(a != r[2] for a, r in zip(formatted, rows, strict=True)):
        raise SystemExit("the complete rows parsed here are not fair-dp's adult_data_formatted.csv, row for row")
    table = jaxdp_adult.read_table(args.adult_dir)
    where = {(jaxdp_adult.FILE_NAMES[p], int(n)): i
             for i, (p, n) in enumerate(zip(table.partition, table.line, strict=True))}
    commit = subprocess.run(["git", "-C", str(args.fairdp_dir), "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or None
    printed = [dict(re.findall(r"^(\d+)\s+(\d+)$", block.split("Name:")[0], re.M))
               for block in proc.stdout.split("(after sampling):")[1:]]
    for seed, after in zip(seeds, printed, strict=True):
        got = fair[str(seed)]
        # fair-dp's printed group sizes after subsampling (sex: 1 female, 0 male) = its training + test rows.
        ours = {str(g): sum(int(s == g) for name in ("train", "test") for s in got[name]["sex"]) for g in (0, 1)}
        if {g: int(n) for g, n in after.items()} != {g: n for g, n in ours.items()}:
            raise SystemExit(f"seed {seed}: fair-dp printed group sizes {after}, its frames hold {ours}")
        print(f"seed {seed}: fair-dp's printed group sizes after subsampling {after} match its rows")
        sets = {}
        for name in ("train", "test"):
            part = got[name]
            ids = [rows[i][:2] for i in part["index"]]
            for (file, line), sex, income in zip(ids, part["sex"], part["income"], strict=True):
                j = where[(file, line)]
                # fair-dp: sex Female = 1, income > 50K = 1; jaxdp: female = 1, label 1 = > 50K.
                if (sex, income) != (int(table.female[j]), int(table.label[j])):
                    raise SystemExit(f"seed {seed}: {file} line {line} is sex={sex} income={income} in fair-dp, "
                                     f"female={table.female[j]} label={table.label[j]} in jaxdp")
            sets[name] = ids
        if len(sets["train"]) != got["train_dataset_size"]:
            raise SystemExit(f"seed {seed}: {len(sets['train'])} training rows, fair-dp says "
                             f"{got['train_dataset_size']}")
        path = folder / f"fairdp_adult_split_seed{seed}.json"
        source = {"what": f"the training and test rows of fair-dp's Adult experiment for its seed {seed}, as "
                          "(file, line number from 1) of UCI's adult.data / adult.test; written by "
                          "launch/fairdp_compare.py --dump_splits from fair-dp's own data loading (no training)",
                  "fairdp_commit": commit, "fairdp_seed": seed,
                  "fairdp_settings": {k: got[k] for k in ("protected_group", "group_ratios", "make_valid_loader",
                                                          "train_dataset_size", "data_dim")}}
        summary = write_split_file(path, table, sets["train"], sets["test"], source=source)
        print(f"seed {seed}: {summary} -> {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fairdp_dir", type=Path, required=True, help="a checkout of layer6ai-labs/fair-dp")
    parser.add_argument("--python", required=True, help="the python of a venv that runs fair-dp")
    parser.add_argument("--adult_dir", type=Path, required=True, help="folder with adult.data and adult.test")
    parser.add_argument("--seeds", default="0,1", help="comma-separated seeds (adult_script.sh runs 0..4)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {list(METHODS)}")
    parser.add_argument("--threads", type=int, default=1,
                        help="OMP_NUM_THREADS / MKL_NUM_THREADS for torch (on a shared 2-core machine a 2nd "
                             "thread made fair-dp 4x slower: docs/fairdp-notes.md)")
    parser.add_argument("--smoke_epochs", type=int, default=1,
                        help="first run the first method and seed for this many epochs (0: no smoke run)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/fairdp_compare"),
                        help="scratch folder: the copied data and fair-dp's run folders")
    parser.add_argument("--out", type=Path, default=None,
                        help="default docs/measurements/fairdp/fairdp_adult_<date>.json")
    parser.add_argument("--resume", action="store_true",
                        help="keep the runs already in --out (same fair-dp commit, versions, threads), run the rest")
    parser.add_argument("--dump_splits", action="store_true",
                        help="train nothing: write fair-dp's training and test rows of each seed as split files "
                             "for jaxdp's config.data.split_file into the folder --out (default "
                             "docs/measurements/fairdp)")
    args = parser.parse_args()
    methods, seeds = args.methods.split(","), [int(s) for s in args.seeds.split(",")]
    folder = Path(__file__).resolve().parent.parent / "docs" / "measurements" / "fairdp"
    if args.dump_splits:
        dump_splits(args, seeds, args.out or folder)
        return
    if unknown := set(methods) - set(METHODS):
        raise SystemExit(f"unknown --methods {sorted(unknown)}; choose from {list(METHODS)}")
    today = datetime.date.today().isoformat()
    out = args.out or folder / f"fairdp_adult_{today}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    sex_counts = prepare_data(args.adult_dir, args.workdir / "data")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    versions = json.loads(subprocess.run([args.python, "-c", VERSIONS_PY], env=env, capture_output=True, text=True,
                                         check=True).stdout)
    commit = subprocess.run(["git", "-C", str(args.fairdp_dir), "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or None
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    record = {
        "what": "fair-dp main.py on UCI Adult with experiment_scripts/adult_script.sh settings, one run at a time",
        "date": today, "fairdp_commit": commit, "versions": versions,
        "threads": {"OMP_NUM_THREADS": args.threads, "MKL_NUM_THREADS": args.threads},
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "cpu_model": next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines()
                                       if ln.startswith("Model name")), None)},
        "adult_sex_counts_without_missing": sex_counts,
        "wall_s_means": "time.perf_counter around the whole main.py subprocess: imports, data preprocessing, "
                        "training, per-epoch evaluation on the test set and checkpoints, final test; cpu_s: the "
                        "run's user+sys CPU time (all its threads); the machine's 2 cores are shared with other "
                        "jobs, so wall_s depends on their load (loadavg_1min_before_after)",
        "smoke": None, "runs": [],
    }
    if args.resume and out.exists():
        old = json.loads(out.read_text())
        if any(old[k] != record[k] for k in ("fairdp_commit", "versions", "threads", "machine")):
            raise SystemExit(f"--resume: {out} was measured with another commit, versions, threads or machine")
        record = old
    done = {(run["method"], run["seed"]) for run in record["runs"]}
    if args.smoke_epochs and not record["smoke"]:
        record["smoke"] = run_one(args, methods[0], seeds[0], args.workdir, sex_counts,
                                  [f"max_epochs={args.smoke_epochs}"], f"smoke_{methods[0]}")
        out.write_text(json.dumps(record, indent=1) + "\n")
    for seed in seeds:
        for method in (m for m in methods if (m, seed) not in done):
            record["runs"].append(run_one(args, method, seed, args.workdir, sex_counts, [], f"adult_{method}"))
            out.write_text(json.dumps(record, indent=1) + "\n")
            run = record["runs"][-1]
            print(f"  {run['test_accuracy_per_group']}  eps={run['epsilon']}  {run['wall_s']} s", flush=True)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
