"""Split files for UCI Adult: the training and test rows listed by identity, for ``config.data.split_file``.

A split file names the rows of a training set and a test set as (file, line number) of UCI's ``adult.data`` and
``adult.test``: the line number counts from 1 in the file as distributed (``adult.test``'s header is line 1), so a
row's identity does not depend on how a program orders, filters or shuffles the rows. ``launch/fairdp_compare.py
--dump_splits`` writes one per fair-dp seed from fair-dp's own data loading
(``docs/measurements/fairdp/fairdp_adult_split_seed<S>.json``); with ``config.data.split_file`` set, the ``"adult"``
and ``"adult_synthetic"`` sources train and test on exactly those rows (:mod:`jaxdp.data.adult`).

The format (JSON, one object; version :data:`FORMAT`)::

    {"format": "jaxdp.adult_split/1",
     "data_sha256": {"adult.data": HEX, "adult.test": HEX},     # the files the line numbers refer to
     "train": {"adult.data": [LINE, ...], "adult.test": [...]},  # strictly increasing line numbers
     "test":  {"adult.data": [...], "adult.test": [...]},
     "counts": {"train": {"female": [ROWS, INCOME>50K], "male": [ROWS, INCOME>50K]}, "test": {...}},
     "source": {...},                                            # free-form: who wrote it, from what
     "sha256": HEX}                                              # of the canonical JSON of all the other keys

Every check refuses with one line naming the file and what is wrong: a missing file, a file that is not JSON, not
this format or not this schema; a file whose content does not hash to its ``sha256`` (damaged or edited); a file
written for other Adult files (``data_sha256``); a line that is not a complete row (a row with a ``?``, a blank
line, the test file's header, past the end); a row in both sets; and counts that the rows do not reproduce.

Privacy: a split file says which rows trained, so publishing one discloses membership directly; the DP guarantee
covers what training releases (the model, the logs), not inputs you publish yourself. fair-dp's split files here
disclose nothing secret: UCI Adult is public and the split is recomputable from fair-dp's public code and seed. For
private data, keep a split file as private as the data.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["FORMAT", "SplitFile", "read_split_file", "resolve_rows", "write_split_file"]

FORMAT = "jaxdp.adult_split/1"
FILE_NAMES = ("adult.data", "adult.test")  # jaxdp.data.adult.FILE_NAMES, in partition order
SETS = ("train", "test")
SEXES = ("female", "male")
_KEYS = {"format", "data_sha256", "train", "test", "counts", "source", "sha256"}


@dataclass(frozen=True)
class SplitFile:
    """A checked split file: per set, per Adult file, the line numbers; the counts it states; the files' digests."""

    path: Path
    rows: dict[str, dict[str, tuple[int, ...]]]
    counts: dict[str, dict[str, tuple[int, int]]]
    data_sha256: dict[str, str]
    source: dict[str, Any]

    def size(self, name: str) -> int:
        """The number of rows of set ``name`` ("train" or "test")."""
        return sum(len(lines) for lines in self.rows[name].values())


def _canonical(content: dict[str, Any]) -> bytes:
    return json.dumps({k: v for k, v in content.items() if k != "sha256"}, sort_keys=True,
                      separators=(",", ":")).encode()


def _fail(path: Path, problem: str) -> ValueError:
    return ValueError(f"config.data.split_file={str(path)!r}: {problem}")


def _is_hex(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def read_split_file(path: str | os.PathLike[str]) -> SplitFile:
    """The split file at ``path``, checked on its own (existence, JSON, schema, its own SHA-256); cheap: the Adult
    files are not read. Raises ValueError with one line naming the file and the problem."""
    path = Path(path).expanduser().absolute()
    if not path.is_file():
        raise _fail(path, "no such file (write one with launch/fairdp_compare.py --dump_splits, or point "
                          "config.data.split_file at docs/measurements/fairdp/fairdp_adult_split_seed<S>.json)")
    try:
        content = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _fail(path, f"not a JSON file ({type(e).__name__}: {str(e)[:80]}); the file is damaged") from None
    if not isinstance(content, dict) or content.get("format") != FORMAT:
        found = content.get("format") if isinstance(content, dict) else type(content).__name__
        raise _fail(path, f"not a split file of format {FORMAT!r} (its format: {found!r})")
    if set(content) != _KEYS:
        raise _fail(path, f"keys {sorted(content)}, expected {sorted(_KEYS)}; the file is damaged or of another "
                          "version")
    digest = hashlib.sha256(_canonical(content)).hexdigest()
    if content["sha256"] != digest:
        raise _fail(path, f"damaged or edited: its content's SHA-256 is {digest}, the file states "
                          f"{content['sha256']!r}")
    data_sha256 = content["data_sha256"]
    if not isinstance(data_sha256, dict) or set(data_sha256) != set(FILE_NAMES) \
            or not all(_is_hex(v) for v in data_sha256.values()):
        raise _fail(path, f"data_sha256 must map {' and '.join(FILE_NAMES)} to SHA-256 hex digests")
    rows: dict[str, dict[str, tuple[int, ...]]] = {}
    counts: dict[str, dict[str, tuple[int, int]]] = {}
    for name in SETS:
        listed = content[name]
        if not isinstance(listed, dict) or set(listed) != set(FILE_NAMES):
            raise _fail(path, f"{name!r} must map {' and '.join(FILE_NAMES)} to lists of line numbers")
        rows[name] = {}
        for file in FILE_NAMES:
            lines = listed[file]
            if not isinstance(lines, list) or not all(type(n) is int and n >= 1 for n in lines) \
                    or any(a >= b for a, b in zip(lines, lines[1:], strict=False)):
                raise _fail(path, f"{name}.{file} must be a strictly increasing list of line numbers >= 1")
            rows[name][file] = tuple(lines)
        if not sum(len(v) for v in rows[name].values()):
            raise _fail(path, f"the {name} set lists no rows")
        stated = content["counts"].get(name) if isinstance(content["counts"], dict) else None
        if not isinstance(stated, dict) or set(stated) != set(SEXES) or not all(
                isinstance(v, list) and len(v) == 2 and all(type(x) is int for x in v) for v in stated.values()):
            raise _fail(path, f"counts.{name} must map female and male to [rows, rows with income > 50K]")
        counts[name] = {sex: (stated[sex][0], stated[sex][1]) for sex in SEXES}
    if not isinstance(content["source"], dict):
        raise _fail(path, "source must be an object")
    return SplitFile(path, rows, counts, dict(data_sha256), content["source"])


def _counts(table: Any, rows: np.ndarray) -> dict[str, tuple[int, int]]:
    female = table.female[rows] == 1
    return {"female": (int(female.sum()), int(table.label[rows][female].sum())),
            "male": (int((~female).sum()), int(table.label[rows][~female].sum()))}


def _lookup(path: Path, listed: dict[str, dict[str, Any]], table: Any) -> dict[str, np.ndarray]:
    """Indices into ``table`` of the listed (file, line) rows, per set; a line that is not a complete row, or a row
    in both sets, is refused."""
    out = {}
    for name in SETS:
        found = []
        for p, file in enumerate(FILE_NAMES):
            lines = np.asarray(listed[name][file], np.int64)
            where = np.flatnonzero(table.partition == p)
            in_file = table.line[where]  # increasing: rows are kept in file order
            position = np.searchsorted(in_file, lines)
            ok = (position < len(in_file)) & (in_file[np.minimum(position, max(len(in_file) - 1, 0))] == lines) \
                if len(in_file) else np.zeros(len(lines), bool)
            if not ok.all():
                bad = int(lines[np.argmin(ok)])
                missing = table.missing_lines[p] if len(table.missing_lines) > p else ()
                why = ("has a missing value ('?'); such rows are dropped" if bad in set(missing)
                       else "is not a row of data (a blank line, the test file's header, or past the end)")
                raise _fail(path, f"{name} row {file} line {bad} {why}; {int((~ok).sum())} listed line(s) of "
                                  f"{file} in {name} are not complete rows")
            found.append(where[position])
        out[name] = np.concatenate(found)
    both = np.intersect1d(out["train"], out["test"])
    if len(both):
        p, n = FILE_NAMES[table.partition[both[0]]], int(table.line[both[0]])
        raise _fail(path, f"{len(both)} row(s) are in both the training and the test set (e.g. {p} line {n})")
    return out


def resolve_rows(split: SplitFile, table: Any) -> dict[str, np.ndarray]:
    """``{"train": rows, "test": rows}``: indices into ``table`` (a :class:`jaxdp.data.adult.AdultTable`, whose
    ``sha256`` are its files' digests) of the rows ``split`` lists, in (file, line) order; every listed line must be
    a complete row, the sets disjoint and the stated counts reproduced. Raises ValueError with one line."""
    path, digests = split.path, table.sha256
    if digests != split.data_sha256:
        which = [f for f in FILE_NAMES if digests.get(f) != split.data_sha256[f]]
        raise _fail(path, f"written for other Adult files: {', '.join(which)} here has SHA-256 "
                          f"{', '.join(digests.get(f, '?') for f in which)}, the split file's rows are lines of "
                          f"{', '.join(split.data_sha256[f] for f in which)}")
    out = _lookup(path, split.rows, table)
    for name in SETS:
        got = _counts(table, out[name])
        if got != split.counts[name]:
            raise _fail(path, f"the {name} rows give (rows, income > 50K) per sex {got}, the file states "
                              f"{split.counts[name]}: its rows are not the ones it was written with")
    return out


def write_split_file(path: str | os.PathLike[str], table: Any, train: list[tuple[str, int]],
                     test: list[tuple[str, int]], *, source: dict[str, Any]) -> str:
    """Writes the split of ``train`` and ``test`` (lists of (file name, line number)) of the Adult files read into
    ``table`` to ``path``, and checks it by reading it back; returns a one-line summary."""
    listed = {name: {file: sorted(n for f, n in ids if f == file) for file in FILE_NAMES}
              for name, ids in (("train", train), ("test", test))}
    for name, ids in (("train", train), ("test", test)):
        if unknown := {f for f, _ in ids} - set(FILE_NAMES):
            raise ValueError(f"{name}: unknown files {sorted(unknown)}; use {FILE_NAMES}")
        if sum(len(v) for v in listed[name].values()) != len(set(ids)):
            raise ValueError(f"{name}: a row is listed twice")
    rows = _lookup(Path(path), listed, table)
    content: dict[str, Any] = {
        "format": FORMAT, "data_sha256": dict(table.sha256), **listed, "source": source,
        "counts": {name: {sex: list(v) for sex, v in _counts(table, rows[name]).items()} for name in SETS}}
    content["sha256"] = hashlib.sha256(_canonical(content)).hexdigest()
    Path(path).write_text(json.dumps(content, sort_keys=True, separators=(",", ":")) + "\n")
    split = read_split_file(path)
    resolve_rows(split, table)
    return "; ".join(f"{name} {split.size(name)} rows (female, male: rows and income > 50K: "
                     f"{split.counts[name]['female']}, {split.counts[name]['male']})" for name in SETS)
