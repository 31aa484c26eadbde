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
    args = parser.parse_args()
    methods, seeds = args.methods.split(","), [int(s) for s in args.seeds.split(",")]
    if unknown := set(methods) - set(METHODS):
        raise SystemExit(f"unknown --methods {sorted(unknown)}; choose from {list(METHODS)}")
    today = datetime.date.today().isoformat()
    folder = Path(__file__).resolve().parent.parent / "docs" / "measurements" / "fairdp"
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
