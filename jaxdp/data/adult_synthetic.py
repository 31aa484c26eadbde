"""A generator of UCI Adult-format files: census-like rows whose income follows a known model.

:func:`write_adult_files` writes ``adult.data`` and ``adult.test`` in the exact format of UCI's release (fields
separated by a comma and a space, ``?`` for a missing value, the test file's first line ``|1x3 Cross validator``
and a ``.`` after its labels, a blank line at the end of each file), with the same 15 columns and the category
lists of ``adult.names``, so that they go through the very parser of the real files
(:func:`jaxdp.data.adult.read_table`). Nothing of the real data is used: the rows are drawn from the distributions
below, whose numbers are rough census-like rates chosen by hand.

What is drawn (per row, independently):

* sex: female with probability 1/3; race: White 85.5%, Black 9.6%, the other three 4.9%;
* age 17 + Gamma(2.2, 9.5), capped at 90; education from 16 levels (HS-grad most often), with ``education_num``
  its rank in the real data's coding (Preschool 1 ... Doctorate 16);
* married (Married-civ-spouse) with probability ``0.72 sigmoid((age - 28) / 5)`` for men and a third of that for
  women; the relationship follows (Husband / Wife; else Own-child for the young, Not-in-family, Unmarried,
  Other-relative), the other marital statuses by age;
* occupation (managerial and professional ones more likely with 13+ years of education), workclass, hours per
  week ``N(40 + 4 male, 11)``, capital gain (8% non-zero) and loss (4.5%), native country (91% United-States),
  ``fnlwgt`` (log-normal; not a feature);
* income > 50K with probability ``sigmoid(-9.0 + 0.42 education_num + 0.04 min(age, 55) + 2.1 married
  + 0.035 (hours - 40) + 0.35 male + 2.5 [capital gain > 5000] + 0.5 [managerial or professional])``: about a
  quarter of the rows, fewer women (through marriage, hours and the direct term), learnable from the features;
* missing values: workclass and occupation both ``?`` for 5.5% of the rows, native country ``?`` for 1.8%
  (such rows are dropped on reading, as UCI's).

The first ``round(2 n / 3)`` rows go to ``adult.data``, the rest to ``adult.test`` (UCI's files split 2:1). A
manifest (:data:`MANIFEST_NAME`: generator version, arguments, each file's size and SHA-256) marks a complete
generation, so :func:`ensure_generated` reuses the files and never overwrites files it did not write (e.g. UCI's).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from jaxdp.data.adult import CATEGORIES, DATA_NAME, FILE_NAMES, INCOMES, SEXES, TEST_HEADER, TEST_NAME
from jaxdp.runlog import locked, write_atomic

MANIFEST_NAME = "jaxdp_generated_adult.json"
GENERATOR_VERSION = 1
MIN_ROWS, MAX_ROWS = 30, 10_000_000

# education -> (education_num, share of rows): the real coding of education_num; rough shares.
_EDUCATION = {"Preschool": (1, 0.002), "1st-4th": (2, 0.005), "5th-6th": (3, 0.01), "7th-8th": (4, 0.02),
              "9th": (5, 0.016), "10th": (6, 0.029), "11th": (7, 0.036), "12th": (8, 0.013),
              "HS-grad": (9, 0.32), "Some-college": (10, 0.22), "Assoc-voc": (11, 0.042),
              "Assoc-acdm": (12, 0.033), "Bachelors": (13, 0.165), "Masters": (14, 0.054),
              "Prof-school": (15, 0.018), "Doctorate": (16, 0.013)}
_SKILLED = ("Exec-managerial", "Prof-specialty")
_RACE_SHARES = {"White": 0.855, "Asian-Pac-Islander": 0.031, "Amer-Indian-Eskimo": 0.01, "Other": 0.008,
                "Black": 0.096}
_WORKCLASS_SHARES = {"Private": 0.74, "Self-emp-not-inc": 0.083, "Self-emp-inc": 0.036, "Federal-gov": 0.031,
                     "Local-gov": 0.068, "State-gov": 0.041, "Without-pay": 0.0005, "Never-worked": 0.0005}


def check_num_rows(num_rows: object) -> None:
    """Refuses a row count the generator cannot serve."""
    if isinstance(num_rows, bool) or not isinstance(num_rows, int | np.integer) \
            or not MIN_ROWS <= num_rows <= MAX_ROWS:
        raise ValueError(f"config.data.synthetic_num_images={num_rows!r}: the number of generated Adult rows (both "
                         f"files) must be an integer from {MIN_ROWS} to {MAX_ROWS:,} (UCI's files have 48,842).")


def _choice(rng: np.random.Generator, shares: dict[str, float], n: int) -> np.ndarray:
    names = np.array(list(shares), dtype=object)
    p = np.array(list(shares.values()), np.float64)
    return names[rng.choice(len(names), size=n, p=p / p.sum())]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def draw_rows(num_rows: int, seed: int = 0) -> list[list[str]]:
    """``num_rows`` rows of the 15 columns as UCI writes them (labels without the test file's ``.``)."""
    check_num_rows(num_rows)
    n = int(num_rows)
    rng = np.random.default_rng([int(seed), 17])
    male = rng.random(n) >= 1 / 3
    race = _choice(rng, _RACE_SHARES, n)
    age = np.minimum(90, np.round(17 + rng.gamma(2.2, 9.5, n))).astype(int)
    education = _choice(rng, {k: v[1] for k, v in _EDUCATION.items()}, n)
    education_num = np.array([_EDUCATION[e][0] for e in education])
    married = rng.random(n) < 0.72 * _sigmoid((age - 28) / 5) * np.where(male, 1.0, 1 / 3)
    marital = np.where(age < 30, "Never-married", _choice(rng, {"Divorced": 0.5, "Never-married": 0.25,
                                                               "Separated": 0.1, "Widowed": 0.1,
                                                               "Married-spouse-absent": 0.05}, n))
    marital = np.where(married, np.where(rng.random(n) < 0.002, "Married-AF-spouse", "Married-civ-spouse"), marital)
    single = _choice(rng, {"Not-in-family": 0.55, "Unmarried": 0.33, "Other-relative": 0.12}, n)
    single = np.where((age < 25) & (rng.random(n) < 0.6), "Own-child", single)
    relationship = np.where(married, np.where(male, "Husband", "Wife"), single)
    occupations = CATEGORIES["occupation"]
    general = {o: (0.02 if o in ("Priv-house-serv", "Armed-Forces") else 1.0) for o in occupations}
    skilled = {o: general[o] * (6.0 if o in _SKILLED else 1.0) for o in occupations}
    occupation = np.where(education_num >= 13, _choice(rng, skilled, n), _choice(rng, general, n))
    workclass = _choice(rng, _WORKCLASS_SHARES, n)
    hours = np.clip(np.round(rng.normal(40 + 4 * male, 11, n)), 1, 99).astype(int)
    gain = np.where(rng.random(n) < 0.08, np.minimum(99999, np.round(rng.lognormal(8.5, 1.0, n))), 0).astype(int)
    loss = np.where(rng.random(n) < 0.045, np.clip(np.round(rng.normal(1900, 350, n)), 155, 4356), 0).astype(int)
    countries = {c: 0.09 / (len(CATEGORIES["native_country"]) - 1) for c in CATEGORIES["native_country"]}
    countries["United-States"] = 0.91
    country = _choice(rng, countries, n)
    fnlwgt = np.clip(np.round(rng.lognormal(12.0, 0.5, n)), 12285, 1484705).astype(int)
    logit = (-9.0 + 0.42 * education_num + 0.04 * np.minimum(age, 55) + 2.1 * married + 0.035 * (hours - 40)
             + 0.35 * male + 2.5 * (gain > 5000) + 0.5 * np.isin(occupation, _SKILLED))
    income = np.where(rng.random(n) < _sigmoid(logit), INCOMES[1], INCOMES[0])
    # Never-worked comes with no occupation, as in UCI's files (so no complete row has it).
    no_job = (rng.random(n) < 0.055) | (workclass == "Never-worked")
    workclass = np.where(no_job & (workclass != "Never-worked"), "?", workclass)
    occupation = np.where(no_job, "?", occupation)
    country = np.where(rng.random(n) < 0.018, "?", country)
    sex = np.where(male, SEXES[1], SEXES[0])
    columns = (age, workclass, fnlwgt, education, education_num, marital, occupation, relationship, race, sex, gain,
               loss, hours, country, income)
    return [[str(c[i]) for c in columns] for i in range(n)]


def write_adult_files(folder: str | os.PathLike[str], num_rows: int, *, seed: int = 0) -> dict[str, Path]:
    """Writes ``adult.data`` and ``adult.test`` (and the manifest) into ``folder``; returns the files' paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = draw_rows(num_rows, seed)
    cut = int(round(2 * len(rows) / 3))
    texts = {DATA_NAME: "".join(", ".join(r) + "\n" for r in rows[:cut]) + "\n",
             TEST_NAME: TEST_HEADER + "\n" + "".join(", ".join(r) + ".\n" for r in rows[cut:]) + "\n"}
    (folder / MANIFEST_NAME).unlink(missing_ok=True)  # incomplete until the new manifest is written
    files = {}
    for name, text in texts.items():
        data = text.encode("ascii")
        write_atomic(folder / name, data)
        files[name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest = {"generator": __name__, "version": GENERATOR_VERSION, "num_rows": int(num_rows), "seed": int(seed),
                "files": files}
    write_atomic(folder / MANIFEST_NAME, (json.dumps(manifest, indent=1) + "\n").encode())
    return {name: folder / name for name in FILE_NAMES}


def is_complete(folder: str | os.PathLike[str], num_rows: int, seed: int) -> bool:
    """Whether ``folder`` holds this generation, unaltered (by the manifest's sizes and SHA-256)."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return False
    if (manifest.get("version"), manifest.get("num_rows"), manifest.get("seed")) != (
            GENERATOR_VERSION, int(num_rows), int(seed)):
        return False
    for name in FILE_NAMES:
        path, info = folder / name, manifest.get("files", {}).get(name, {})
        if not path.is_file() or path.stat().st_size != info.get("size") \
                or hashlib.sha256(path.read_bytes()).hexdigest() != info.get("sha256"):
            return False
    return True


def ensure_generated(folder: str | os.PathLike[str], num_rows: int, *, seed: int = 0) -> Path:
    """Writes the files into ``folder`` unless this generation is there; returns ``folder``. Refuses to overwrite
    Adult files that the generator did not write (e.g. UCI's)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with locked(folder / ".jaxdp_generate.lock"):
        if is_complete(folder, num_rows, seed):
            return folder
        foreign = [n for n in FILE_NAMES if (folder / n).exists()]
        if foreign and not (folder / MANIFEST_NAME).exists():
            raise FileExistsError(
                f"{folder} holds Adult files the generator did not write ({', '.join(foreign)}); refusing to "
                "overwrite them. Point config.data.data_dir (or manual_dir) for source='adult_synthetic' at another "
                "folder, or use source='adult' for these files.")
        write_adult_files(folder, num_rows, seed=seed)
    return folder

