"""A generator of CelebA-format data: drawn faces whose attributes (Smiling and Male first) drive the pixels.

:func:`write_celeba_files` writes the five files of CelebA's aligned release in their exact formats, so that
the generated data is prepared by the very same tfds ``celeb_a`` builder code as the real data (see
:mod:`jaxdp.data.celeba`); only the checksum expectations differ, and they are read from the manifest the
generator writes next to the files (``jaxdp_generated.json``).

What the pixels encode (everything else is nuisance that a model has to ignore):

* **Smiling** is drawn in the mouth, the same way for both genders: a wide mouth whose corners turn up,
  either grinning with teeth showing or smiling with closed lips (a dark, curved parting line), versus a
  narrower mouth that is flat or turns down. Teeth show in 85% of smiling women's smiles and in 50% of smiling
  men's; 40% of women wear lipstick (red lips), men never do. So both genders share one smile cue in two
  variants: the high-contrast grin, which most of the (majority) women show, and the subtler closed-lip
  smile, which half of the smiling men show.
* **Male** changes the rest of the lower face: a broader, square jaw, and facial hair for most men (a full
  beard on the jaw and chin for 30%, otherwise mostly a goatee or stubble; a mustache above the upper lip for
  about a third), with the lips left visible in a hairless patch of fixed size. A model trained mostly on
  women therefore sees the men's mouths in an unfamiliar setting, and the men's more frequent closed-lip
  smile is the variant it sees least. History: version 2 had men grinning and women mostly not (under DP
  men scored *higher*); version 3 hid most men's smiles (closed lips under a mustache covering the mouth
  corners), which even a non-private model hardly learned; version 4 shares the cue.
  ``python -m jaxdp_study.generator_effect`` measures what it does.
* Nuisance: skin tone (light to dark), hair colour and length, background colour, pose (shift, scale,
  in-plane rotation), lighting direction and strength, eye colour, glasses, hats, earrings, blur, and
  per-image Gaussian noise.

Exact composition (so that pools are hand-checkable): for ``num_images = 4 k`` the images are split into
four equal cells (group attribute absent/present x label attribute absent/present; by default female/male x not
smiling/smiling), and each cell into CelebA's partitions in the ratio 8:1:1 (train / validation / test) by the
rule ``validation = test = round(cell / 10)``, train = the rest (:func:`cell_partition_sizes`). The other 38
attributes are sampled with roughly CelebA's frequencies (conditioned on gender where CelebA's are strongly
gendered); the ones that can be drawn are drawn (hair colour, bald, bangs, glasses, hat, lipstick, make-up,
facial hair, open mouth, narrow eyes, pale skin, blur, earrings, necklace, necktie, ...). Identity numbers are
placeholders: each is used by about 20 images of one gender, but appearance is not tied to identity. Landmarks
are the drawn positions of the eyes, nose tip and mouth corners.

**Other label and group attributes** (``label_attribute``, ``group_attribute``; default Smiling and Male, which
give the files described above, byte for byte): any two of :data:`MODELLED_ATTRIBUTES` (Male, Smiling, Bald,
Bangs, the four hair colours, Chubby, Eyeglasses, Heavy_Makeup, Narrow_Eyes, Wearing_Hat: the attributes that
are drawn, visibly even at 32x32, and that the sampling can fix without contradicting another). The design pair
gets the exact four cells; gender, when not in the pair, is drawn given the pair by Bayes' rule from the
generator's per-gender rates (so glasses stay mostly on men, make-up on women), smiling at random half the
time, and everything else as above. Any other attribute (Young, Attractive, face shapes, facial hair,
lipstick, ...) is refused with the list of modelled ones: it is not drawn, or it is tied to gender or smiling.

Example::

    from jaxdp.data import synthetic
    paths = synthetic.write_celeba_files("data/synthetic/downloads/manual", 4000, seed=0)
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import zipfile
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from jaxdp.runlog import atomic_writer, write_atomic

# CelebA's file names, and the URLs under which the tfds `celeb_a` builder (v2.1.0) registers them.
ZIP_NAME = "img_align_celeba.zip"
ATTR_NAME = "list_attr_celeba.txt"
PARTITION_NAME = "list_eval_partition.txt"
LANDMARKS_NAME = "list_landmarks_align_celeba.txt"
IDENTITY_NAME = "identity_CelebA.txt"
FILE_URLS = {
    ZIP_NAME: "https://drive.google.com/uc?export=download&id=0B7EVK8r0v71pZjFTYXZWM3FlRnM",
    PARTITION_NAME: "https://drive.google.com/uc?export=download&id=0B7EVK8r0v71pY0NSMzRuSXJEVkk",
    LANDMARKS_NAME: "https://drive.google.com/uc?export=download&id=0B7EVK8r0v71pd0FJY3Blby1HUTQ",
    ATTR_NAME: "https://drive.google.com/uc?export=download&id=0B7EVK8r0v71pblRyaVFSWGxPY0U",
    IDENTITY_NAME: "https://drive.google.com/uc?export=download&id=1_ee_0u7vcNLOfNLegJRHmolfH5ICW-XS",
}
CELEBA_FILE_NAMES = tuple(FILE_URLS)
MANIFEST_NAME = "jaxdp_generated.json"
# Bump when the drawing changes: the manifest records it, so old files are regenerated, not reused.
GENERATOR_VERSION = 4

# The attributes the generator can use as config.data.label_attribute / group_attribute: each is drawn, and
# switching it changes the face visibly even at 32x32 (tested), and the sampling can fix it without
# contradicting another attribute. Young, Attractive and the face shapes are not drawn; facial hair, lipstick
# and mouth opening are tied to gender or smiling in the sampling; necklace and necktie fall outside the crop.
MODELLED_ATTRIBUTES = ("Male", "Smiling", "Bald", "Bangs", "Black_Hair", "Blond_Hair", "Brown_Hair", "Chubby",
                       "Eyeglasses", "Gray_Hair", "Heavy_Makeup", "Narrow_Eyes", "Wearing_Hat")

IMAGE_HEIGHT, IMAGE_WIDTH = 218, 178
ATTRIBUTE_NAMES = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose "
    "Black_Hair Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee "
    "Gray_Hair Heavy_Makeup High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard "
    "Oval_Face Pale_Skin Pointy_Nose Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair "
    "Wavy_Hair Wearing_Earrings Wearing_Hat Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young"
).split()
LANDMARK_NAMES = (
    "lefteye_x lefteye_y righteye_x righteye_y nose_x nose_y "
    "leftmouth_x leftmouth_y rightmouth_x rightmouth_y"
).split()

_SKIN_TONES = np.array(
    [[255, 224, 196], [241, 194, 167], [224, 172, 138], [198, 134, 98], [161, 102, 69],
     [120, 75, 50], [87, 54, 38]], dtype=np.float64)
_HAIR_COLOURS = {
    "Black_Hair": (25, 20, 18), "Brown_Hair": (95, 62, 38), "Blond_Hair": (214, 182, 120),
    "Gray_Hair": (165, 162, 160), "other": (140, 70, 40)}
_EYE_COLOURS = ((60, 40, 25), (40, 80, 130), (70, 110, 70), (30, 25, 20), (110, 80, 40))


def write_celeba_files(
    directory: str | os.PathLike[str], num_images: int, *, seed: int = 0, workers: int | None = None,
    label_attribute: str = "Smiling", group_attribute: str = "Male",
) -> dict[str, Path]:
    """Writes generated data in CelebA's five-file format into ``directory`` and returns their paths.

    Files: ``img_align_celeba.zip`` (``img_align_celeba/000001.jpg`` ... as 218x178 RGB JPEGs),
    ``list_attr_celeba.txt`` (count line, the 40 attribute names, one ``+1/-1`` row per image),
    ``list_eval_partition.txt`` (``name partition``, 0 train / 1 validation / 2 test),
    ``list_landmarks_align_celeba.txt`` (count line, 10 landmark names, integer rows) and
    ``identity_CelebA.txt`` (``name identity``). Each file is written to a temporary name and renamed, and the
    manifest ``jaxdp_generated.json`` (sizes and SHA-256 of the five files, ``num_images``, ``seed``, the two
    design attributes) is written last, so a directory with a manifest is complete. Same arguments, same bytes;
    the default attributes give the files this generator version has always written.

    Args:
      directory: where to write (created if needed); for tfds, the manual directory
        ``<data_dir>/downloads/manual``.
      num_images: a multiple of 4 between 40 and 1,000,000 (four equal group x label cells).
      seed: seeds every random choice.
      workers: processes used to draw the images (default: the CPU count, at most 8).
      label_attribute, group_attribute: the two attributes whose four combinations get exactly
        ``num_images / 4`` images each (one of :data:`MODELLED_ATTRIBUTES` each; see the module docstring).

    Returns:
      ``{file name: path}`` for the five CelebA files.
    """
    check_num_images(num_images)
    check_design(label_attribute, group_attribute)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    num_images = int(num_images)
    table = _attribute_table(num_images, seed, label_attribute, group_attribute)

    # Draw in chunks across processes (PIL drawing and JPEG encoding hold the GIL).
    workers = workers or min(8, os.cpu_count() or 1)
    chunk = max(1, math.ceil(num_images / (workers * 4)))
    starts = list(range(0, num_images, chunk))
    jobs = [(seed, s, table["attributes"][s:s + chunk]) for s in starts]
    paths: dict[str, Path] = {}
    landmarks = np.zeros((num_images, 10), dtype=np.int64)
    with atomic_writer(directory / ZIP_NAME, "wb") as handle, \
            zipfile.ZipFile(handle, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr(zipfile.ZipInfo("img_align_celeba/"), b"")
        if workers > 1 and len(jobs) > 1:
            with ProcessPoolExecutor(workers) as pool:
                results = pool.map(_draw_chunk, jobs)
                for start, (jpegs, marks) in zip(starts, results, strict=True):
                    _store(archive, start, jpegs)
                    landmarks[start:start + len(jpegs)] = marks
        else:
            for start, job in zip(starts, jobs, strict=True):
                jpegs, marks = _draw_chunk(job)
                _store(archive, start, jpegs)
                landmarks[start:start + len(jpegs)] = marks
    paths[ZIP_NAME] = directory / ZIP_NAME

    names = [_file_name(i) for i in range(num_images)]
    attr_lines = [str(num_images), " ".join(ATTRIBUTE_NAMES)]
    for name, row in zip(names, table["attributes"], strict=True):
        attr_lines.append(name + " " + " ".join(f"{v:2d}" for v in row))
    mark_lines = [str(num_images), " ".join(LANDMARK_NAMES)]
    for name, row in zip(names, landmarks, strict=True):
        mark_lines.append(name + " " + " ".join(f"{v:4d}" for v in row))
    part_lines = [f"{n} {p}" for n, p in zip(names, table["partition"], strict=True)]
    id_lines = [f"{n} {k}" for n, k in zip(names, table["identity"], strict=True)]
    for file_name, lines in ((ATTR_NAME, attr_lines), (LANDMARKS_NAME, mark_lines),
                             (PARTITION_NAME, part_lines), (IDENTITY_NAME, id_lines)):
        paths[file_name] = write_atomic(directory / file_name, ("\n".join(lines) + "\n").encode())

    manifest = {
        "generator": "jaxdp.data.synthetic", "generator_version": GENERATOR_VERSION,
        "num_images": num_images, "seed": int(seed),
        "label_attribute": label_attribute, "group_attribute": group_attribute,
        "files": {name: {"url": FILE_URLS[name], **_size_and_sha256(paths[name])} for name in FILE_URLS},
    }
    write_atomic(directory / MANIFEST_NAME, (json.dumps(manifest, indent=1) + "\n").encode())
    return {name: paths[name] for name in CELEBA_FILE_NAMES}


def read_manifest(directory: str | os.PathLike[str]) -> dict | None:
    """The generator's manifest in ``directory``, or None when there is none (e.g. real CelebA files)."""
    path = Path(directory) / MANIFEST_NAME
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
        assert set(manifest["files"]) == set(FILE_URLS)
    except (ValueError, KeyError, TypeError, AssertionError) as e:
        raise ValueError(
            f"{path} is not a complete jaxdp generator manifest ({e!r}); delete the directory {path.parent} "
            "and generate the files again.") from e
    return manifest


def is_complete(directory: str | os.PathLike[str], num_images: int, seed: int, *,
                label_attribute: str = "Smiling", group_attribute: str = "Male") -> bool:
    """Whether ``directory`` holds this generator's files for these arguments, with their recorded sizes.

    Sizes are checked here (cheap); the SHA-256 of each file is checked by tfds when it prepares them.
    """
    try:
        manifest = read_manifest(directory)
    except ValueError:
        return False
    if manifest is None or design_of(manifest) != (num_images, seed, GENERATOR_VERSION, label_attribute,
                                                   group_attribute):
        return False
    for name, info in manifest["files"].items():
        path = Path(directory) / name
        if not path.exists() or path.stat().st_size != info["size"]:
            return False
    return True


def design_of(manifest: dict) -> tuple[int, int, int, str, str]:
    """(num_images, seed, generator_version, label_attribute, group_attribute) of a manifest; manifests written
    before the attributes were recorded are the default design (Smiling by Male)."""
    return (manifest["num_images"], manifest["seed"], manifest["generator_version"],
            manifest.get("label_attribute", "Smiling"), manifest.get("group_attribute", "Male"))


# ----------------------------------------------------------------------------------------------------------
# Attributes, partitions and identities.

# Hair: one of black / brown / blond / other (red) by these probabilities, blond kept for all women and 30% of
# men (the rest brown), then gray for 5% whatever the colour; bald: 8% of men.
_HAIR_COLOUR_NAMES = ("Black_Hair", "Brown_Hair", "Blond_Hair", "Gray_Hair")
_HAIR_CHOICE_P = (0.3, 0.25, 0.2, 0.25)
_BLOND_OK = (1.0, 0.3)  # (female, male)
_GRAY_RATE = 0.05
_BALD_RATE = (0.0, 0.08)  # (female, male)
_BASE_RATES = {  # P(attribute) per gender (female, male), roughly CelebA's.
    "Arched_Eyebrows": (0.42, 0.05), "Attractive": (0.65, 0.35), "Bags_Under_Eyes": (0.12, 0.33),
    "Bangs": (0.2, 0.08), "Big_Lips": (0.3, 0.15), "Big_Nose": (0.1, 0.42), "Blurry": (0.05, 0.05),
    "Bushy_Eyebrows": (0.08, 0.24), "Chubby": (0.02, 0.13), "Double_Chin": (0.02, 0.1),
    "Eyeglasses": (0.03, 0.11), "Heavy_Makeup": (0.65, 0.0), "Narrow_Eyes": (0.11, 0.12),
    "Oval_Face": (0.34, 0.2), "Pale_Skin": (0.06, 0.02), "Pointy_Nose": (0.35, 0.17),
    "Receding_Hairline": (0.05, 0.12), "Rosy_Cheeks": (0.11, 0.01), "Straight_Hair": (0.21, 0.21),
    "Wavy_Hair": (0.45, 0.12), "Wearing_Earrings": (0.33, 0.01), "Wearing_Hat": (0.04, 0.06),
    # Lipstick: about 80% of CelebA's women; 40% here, so that most smiles of both genders have natural lips.
    "Wearing_Lipstick": (0.4, 0.0), "Wearing_Necklace": (0.2, 0.0), "Wearing_Necktie": (0.0, 0.16),
    "Young": (0.86, 0.65),
}


def check_num_images(num_images: object) -> None:
    """Refuses a number of images the generator cannot split into its four cells and three partitions."""
    if not isinstance(num_images, int | np.integer) or isinstance(num_images, bool) or num_images < 40 \
            or num_images % 4:
        raise ValueError(
            f"num_images={num_images!r}: use a multiple of 4 of at least 40 (the images are split into four "
            "equal female/male x smiling cells, each with train/validation/test examples), e.g. 4000.")
    if num_images > 1_000_000:
        raise ValueError(f"num_images={num_images}: at most 1,000,000 images are supported (CelebA has 202,599).")


def cell_partition_sizes(num_images: int) -> dict[str, int]:
    """Images of each (group, label) cell in each CelebA partition: ``{"train": ..., "validation": ...,
    "test": ...}``, by the rule validation = test = round(cell / 10), e.g. 800 for 4,000 images (cells of 1,000).

    >>> cell_partition_sizes(800)
    {'train': 160, 'validation': 20, 'test': 20}
    """
    cell = int(num_images) // 4
    held_out = round(cell / 10)
    return {"train": cell - 2 * held_out, "validation": held_out, "test": held_out}


def check_design(label_attribute: str, group_attribute: str) -> None:
    """Refuses a label/group pair the generator cannot draw, listing the attributes it models."""
    unknown = [a for a in (label_attribute, group_attribute) if a not in MODELLED_ATTRIBUTES]
    if unknown:
        raise ValueError(
            f"The CelebA-format generator does not draw {' or '.join(map(repr, unknown))} in the images, so it "
            f"cannot use {'it' if len(unknown) == 1 else 'them'} as the label or group attribute. It models "
            f"{', '.join(MODELLED_ATTRIBUTES)}; choose label_attribute and group_attribute among those, or use "
            "real CelebA (config.data.source='celeba'), where any two of the 40 attributes work.")
    if label_attribute == group_attribute:
        raise ValueError(f"label_attribute and group_attribute are both {label_attribute!r}: choose two different "
                         "attributes.")
    pair = {label_attribute, group_attribute}
    if len(pair & set(_HAIR_COLOUR_NAMES)) == 2 or ("Bald" in pair and pair & {"Bangs", *_HAIR_COLOUR_NAMES}):
        raise ValueError(f"The generator cannot draw {label_attribute} and {group_attribute} as independent "
                         "attributes (one hair colour per face; a bald head shows no bangs or hair colour): "
                         "choose another pair.")


def _attribute_table(num_images: int, seed: int, label_attribute: str = "Smiling",
                     group_attribute: str = "Male") -> dict[str, np.ndarray]:
    rng = np.random.default_rng([seed, 7919])
    cell = num_images // 4
    group = np.repeat([0, 0, 1, 1], cell)
    label = np.repeat([0, 1, 0, 1], cell)
    sizes = cell_partition_sizes(num_images)
    part_in_cell = np.concatenate([np.zeros(sizes["train"], int), np.ones(sizes["validation"], int),
                                   np.full(sizes["test"], 2)])
    partition = np.concatenate([rng.permutation(part_in_cell) for _ in range(4)])
    order = rng.permutation(num_images)  # interleave the cells over file names
    group, label, partition = group[order], label[order], partition[order]
    design = {group_attribute: group == 1, label_attribute: label == 1}
    # Male and Smiling, when not fixed by the design: their own stream, so the default design (group Male,
    # label Smiling) draws exactly what it always drew.
    extra = np.random.default_rng([seed, 7919, 1])
    male = (design["Male"] if "Male" in design else extra.random(num_images) < _p_male(design)).astype(int)
    smiling = (design["Smiling"] if "Smiling" in design else extra.random(num_images) < 0.5).astype(int)

    index = {name: k for k, name in enumerate(ATTRIBUTE_NAMES)}
    attrs = np.zeros((num_images, len(ATTRIBUTE_NAMES)), dtype=bool)
    attrs[:, index["Male"]] = male == 1
    attrs[:, index["Smiling"]] = smiling == 1
    for name, (p_female, p_male) in _BASE_RATES.items():
        attrs[:, index[name]] = rng.random(num_images) < np.where(male == 1, p_male, p_female)
    # Open (teeth showing) for most smiling women, half of smiling men: see `draw_face`.
    p_open = np.where(smiling == 1, np.where(male == 1, 0.5, 0.85), 0.15)
    attrs[:, index["Mouth_Slightly_Open"]] = rng.random(num_images) < p_open
    attrs[:, index["High_Cheekbones"]] = rng.random(num_images) < np.where(smiling == 1, 0.8, 0.1)
    # Facial hair: most men have some (on the jaw and chin; the lips stay visible, see `draw_face`).
    is_m = male == 1
    beard = is_m & (rng.random(num_images) < 0.3)
    mustache = is_m & (rng.random(num_images) < np.where(beard, 0.5, 0.25))
    goatee = is_m & ~beard & (rng.random(num_images) < 0.45)
    stubble = is_m & ~beard & ~goatee & (rng.random(num_images) < 0.8)
    attrs[:, index["No_Beard"]] = ~beard & ~goatee
    attrs[:, index["Mustache"]] = mustache
    attrs[:, index["Goatee"]] = goatee
    attrs[:, index["5_o_Clock_Shadow"]] = stubble
    attrs[:, index["Sideburns"]] = is_m & (beard | (rng.random(num_images) < 0.1))
    attrs[:, index["Bald"]] = is_m & (rng.random(num_images) < _BALD_RATE[1])
    # At most one hair colour, as in CelebA (some have none: red/other).
    hair = rng.choice(4, size=num_images, p=_HAIR_CHOICE_P)
    blond_ok = rng.random(num_images) < np.where(is_m, _BLOND_OK[1], _BLOND_OK[0])
    hair = np.where((hair == 2) & ~blond_ok, 1, hair)
    gray = rng.random(num_images) < _GRAY_RATE
    attrs[:, index["Black_Hair"]] = (hair == 0) & ~gray
    attrs[:, index["Brown_Hair"]] = (hair == 1) & ~gray
    attrs[:, index["Blond_Hair"]] = (hair == 2) & ~gray
    attrs[:, index["Gray_Hair"]] = gray
    attrs[:, index["Wavy_Hair"]] &= ~attrs[:, index["Straight_Hair"]]
    for name, value in design.items():
        if name not in ("Male", "Smiling"):
            _impose(attrs, index, name, value, hair, is_m, extra)

    # About 20 images per identity; identities are per gender.
    identity = np.zeros(num_images, dtype=np.int64)
    per_id = 20
    next_id = 1
    for g in (0, 1):
        members = np.flatnonzero(male == g)
        ids = next_id + rng.permutation(len(members)) // per_id
        identity[members] = ids
        next_id = int(ids.max()) + 1 if len(ids) else next_id
    return {"attributes": np.where(attrs, 1, -1).astype(np.int8), "partition": partition,
            "identity": identity}


def _rate(name: str, male: bool) -> float:
    """P(attribute | gender) under the sampling of `_attribute_table`, for the attributes a design can fix."""
    k = int(male)
    if name in _BASE_RATES:
        return _BASE_RATES[name][k]
    if name == "Bald":
        return _BALD_RATE[k]
    if name == "Gray_Hair":
        return _GRAY_RATE
    black, brown, blond, _ = _HAIR_CHOICE_P
    colour = {"Black_Hair": black, "Brown_Hair": brown + blond * (1 - _BLOND_OK[k]),
              "Blond_Hair": blond * _BLOND_OK[k]}[name]
    return colour * (1 - _GRAY_RATE)


def _p_male(design: dict[str, np.ndarray]) -> np.ndarray:
    """P(Male | the design's attributes), by Bayes from `_rate` with P(Male) = 1/2: a design that fixes, e.g.,
    Eyeglasses keeps the generator's joint distribution of Eyeglasses and Male (glasses are mostly on men)."""
    like = {False: 1.0, True: 1.0}
    for name, value in design.items():
        if name == "Smiling":
            continue  # independent of gender
        for male in (False, True):
            p = _rate(name, male)
            like[male] = like[male] * np.where(value, p, 1 - p)
    total = like[False] + like[True]
    return np.where(total > 0, like[True] / np.where(total > 0, total, 1), 0.5)


def _impose(attrs: np.ndarray, index: dict[str, int], name: str, value: np.ndarray, hair: np.ndarray,
            is_m: np.ndarray, extra: np.random.Generator) -> None:
    """Sets a design attribute, keeping the table consistent with what `draw_face` draws."""
    attrs[:, index[name]] = value
    if name in ("Bangs", *_HAIR_COLOUR_NAMES):
        attrs[value, index["Bald"]] = False  # a bald head shows neither bangs nor hair colour
    if name == "Bangs":
        attrs[value, index["Receding_Hairline"]] = False  # drawn instead of the bangs
    if name == "Bald":
        attrs[value, index["Bangs"]] = False
        attrs[value, index["Receding_Hairline"]] = False
    if name not in _HAIR_COLOUR_NAMES:
        return
    colours = [index[n] for n in _HAIR_COLOUR_NAMES]
    rows = np.flatnonzero(value)
    attrs[np.ix_(rows, colours)] = False
    attrs[rows, index[name]] = True
    if name == "Gray_Hair":
        # Without gray, the colour drawn before gray was applied: the same hair choice as any other image.
        for k, column in enumerate(colours[:3]):
            attrs[~value, column] = hair[~value] == k
        return
    # Faces without the design colour that had it: another of the generator's hair choices, in its proportions.
    own = _HAIR_COLOUR_NAMES.index(name)
    moved = np.flatnonzero(~value & (hair == own) & ~attrs[:, index["Gray_Hair"]])
    weights = np.array(_HAIR_CHOICE_P, dtype=np.float64)
    weights[own] = 0
    for male in (False, True):
        these = moved[is_m[moved] == male]
        w = weights.copy()
        w[2] *= _BLOND_OK[int(male)]
        choice = extra.choice(4, size=len(these), p=w / w.sum())
        for k in range(3):
            attrs[these, colours[k]] = choice == k


# ----------------------------------------------------------------------------------------------------------
# Drawing.

def _file_name(i: int) -> str:
    return f"{i + 1:06d}.jpg"


def _draw_chunk(job: tuple[int, int, np.ndarray]) -> tuple[list[bytes], np.ndarray]:
    seed, start, rows = job
    jpegs, marks = [], np.zeros((len(rows), 10), dtype=np.int64)
    for k, row in enumerate(rows):
        rng = np.random.default_rng([seed, start + k, 104729])
        image, marks[k] = draw_face(dict(zip(ATTRIBUTE_NAMES, (row > 0).tolist(), strict=True)), rng)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=int(rng.integers(80, 96)))
        jpegs.append(buffer.getvalue())
    return jpegs, marks


def _store(archive: zipfile.ZipFile, start: int, jpegs: Sequence[bytes]) -> None:
    for k, data in enumerate(jpegs):
        info = zipfile.ZipInfo(f"img_align_celeba/{_file_name(start + k)}", date_time=(2015, 1, 1, 0, 0, 0))
        archive.writestr(info, data)


def _rgb(colour: np.ndarray | Sequence[float]) -> tuple[int, int, int]:
    r, g, b = (min(255.0, max(0.0, float(v))) for v in colour)  # plain floats: 10x faster than np.clip here
    return int(r), int(g), int(b)


@dataclass(frozen=True)
class _Face:
    """One face being drawn: its canvas, its pose (centre ``cx, cy`` and ``scale``) and its colours."""

    image: Image.Image
    draw: ImageDraw.ImageDraw
    cx: float
    cy: float
    scale: float
    skin: np.ndarray
    hair: np.ndarray
    shade: np.ndarray  # shadows, nose, stubble base

    def p(self, x: float, y: float) -> tuple[float, float]:  # face coordinates (origin at centre) -> pixels
        return self.cx + self.scale * x, self.cy + self.scale * y

    def box(self, x0: float, y0: float, x1: float, y1: float) -> list[float]:
        (a, b), (c, d) = self.p(x0, y0), self.p(x1, y1)
        return [min(a, c), min(b, d), max(a, c), max(b, d)]


def draw_face(attributes: dict[str, bool], rng: np.random.Generator) -> tuple[Image.Image, np.ndarray]:
    """Draws one 218x178 face for the given attributes; returns the image and its 10 landmark coordinates."""
    height, width = IMAGE_HEIGHT, IMAGE_WIDTH
    # Background: a vertical gradient between two random colours.
    top, bottom = rng.uniform(20, 235, 3), rng.uniform(20, 235, 3)
    ramp = np.linspace(0, 1, height)[:, None]
    column = (top * (1 - ramp) + bottom * ramp).astype(np.uint8)[:, None, :]
    image = Image.fromarray(np.ascontiguousarray(np.broadcast_to(column, (height, width, 3))))
    draw = ImageDraw.Draw(image)

    # Pose: CelebA's aligned faces put the eyes near y=111 and the mouth near y=152; jitter around that.
    scale = rng.uniform(0.9, 1.1)
    cx, cy = 89 + rng.uniform(-5, 5), 126 + rng.uniform(-5, 5)

    tone = _SKIN_TONES[0] if attributes["Pale_Skin"] else _SKIN_TONES[rng.integers(len(_SKIN_TONES))]
    skin = tone + rng.normal(0, 8, 3)
    hair_key = next((k for k in ("Black_Hair", "Brown_Hair", "Blond_Hair", "Gray_Hair") if attributes[k]),
                    "other")
    hair = np.asarray(_HAIR_COLOURS[hair_key], dtype=np.float64) + rng.normal(0, 10, 3)
    face = _Face(image, draw, cx, cy, scale, skin, hair, shade=skin * 0.78)

    _draw_head(face, attributes, rng)
    eye_dx, eye_y, nose_y = _draw_eyes_and_nose(face, attributes, rng)
    _draw_lower_face_hair(face, attributes, rng)
    corners = _draw_mouth(face, attributes, rng)
    image, angle = _photograph(image, attributes, rng, cx, cy, top)

    # Landmarks, rotated as the image was (PIL rotates counter-clockwise by `angle` degrees).
    p = face.p
    points = np.array([p(-eye_dx, eye_y), p(eye_dx, eye_y), p(0, nose_y), corners[0], corners[1]])
    theta = np.deg2rad(angle)
    rel = points - [cx, cy]
    rotated = np.stack([rel[:, 0] * np.cos(theta) + rel[:, 1] * np.sin(theta),
                        -rel[:, 0] * np.sin(theta) + rel[:, 1] * np.cos(theta)], axis=1) + [cx, cy]
    return image, np.round(rotated).astype(np.int64).reshape(-1)


def _draw_head(face: _Face, attributes: dict[str, bool], rng: np.random.Generator) -> None:
    """Clothes, neck, hair, ears and the face's outline."""
    draw, p, box, male = face.draw, face.p, face.box, attributes["Male"]
    skin, hair, shade = face.skin, face.hair, face.shade
    # Clothes and neck.
    cloth = rng.uniform(10, 240, 3)
    draw.ellipse(box(-85, 78, 85, 170), fill=_rgb(cloth))
    draw.rectangle(box(-17 if not male else -21, 40, 17 if not male else 21, 95), fill=_rgb(shade))
    if attributes["Wearing_Necktie"]:
        draw.polygon([p(-6, 82), p(6, 82), p(9, 120), p(0, 128), p(-9, 120)], fill=_rgb(rng.uniform(0, 255, 3)))
    if attributes["Wearing_Necklace"]:
        draw.arc(box(-22, 55, 22, 95), 20, 160, fill=(230, 210, 120), width=2)

    # Hair behind the head: long for most women.
    long_hair = (not male and rng.random() < 0.85) or (male and rng.random() < 0.05)
    if not attributes["Bald"] and long_hair:
        draw.ellipse(box(-58, -78, 58, 40 + rng.uniform(0, 40)), fill=_rgb(hair))
    # Ears and face: men get a broader, square jaw.
    draw.ellipse(box(-50, -14, -38, 12), fill=_rgb(skin * 0.95))
    draw.ellipse(box(38, -14, 50, 12), fill=_rgb(skin * 0.95))
    chubby = 4 if attributes["Chubby"] else 0
    if male:
        draw.ellipse(box(-44 - chubby, -62, 44 + chubby, 40), fill=_rgb(skin))
        draw.rounded_rectangle(box(-40 - chubby, -10, 40 + chubby, 58), radius=16 * face.scale, fill=_rgb(skin))
    else:
        draw.ellipse(box(-40 - chubby, -62, 40 + chubby, 58), fill=_rgb(skin))
    if attributes["Double_Chin"]:
        draw.arc(box(-18, 44, 18, 62), 20, 160, fill=_rgb(shade), width=2)
    # Hair on top.
    if attributes["Bald"]:
        pass
    elif attributes["Receding_Hairline"]:
        draw.chord(box(-44, -72, 44, -36), 180, 360, fill=_rgb(hair))
    else:
        draw.chord(box(-45, -74, 45, -22), 180, 360, fill=_rgb(hair))
        if attributes["Bangs"]:
            draw.rectangle(box(-36, -50, 36, -30), fill=_rgb(hair))
    if attributes["Sideburns"]:
        draw.rectangle(box(-44, -30, -37, 12), fill=_rgb(hair))
        draw.rectangle(box(37, -30, 44, 12), fill=_rgb(hair))
    if attributes["Wearing_Hat"]:
        hat = rng.uniform(0, 255, 3)
        draw.chord(box(-50, -90, 50, -30), 180, 360, fill=_rgb(hat))
        draw.rectangle(box(-58, -36, 58, -30), fill=_rgb(hat * 0.8))


def _draw_eyes_and_nose(face: _Face, attributes: dict[str, bool],
                        rng: np.random.Generator) -> tuple[float, float, float]:
    """Eyes, brows, glasses, earrings, nose and cheeks; returns (eye_dx, eye_y, nose_y) for the landmarks."""
    draw, p, box, male = face.draw, face.p, face.box, attributes["Male"]
    skin, hair, shade = face.skin, face.hair, face.shade
    eye_dx, eye_y = 19 + rng.uniform(-2, 2), -15 + rng.uniform(-2, 2)
    eye_h = 3.0 if attributes["Narrow_Eyes"] else 5.0
    iris = np.asarray(_EYE_COLOURS[rng.integers(len(_EYE_COLOURS))], dtype=np.float64)
    brow_w = 3 if attributes["Bushy_Eyebrows"] or male else 2
    for side in (-1, 1):
        ex = side * eye_dx
        if attributes["Heavy_Makeup"]:
            draw.ellipse(box(ex - 11, eye_y - 8, ex + 11, eye_y + 4), fill=_rgb(skin * 0.7 + [30, 0, 40]))
        if attributes["Bags_Under_Eyes"]:
            draw.arc(box(ex - 9, eye_y, ex + 9, eye_y + 10), 20, 160, fill=_rgb(shade), width=1)
        draw.ellipse(box(ex - 9, eye_y - eye_h, ex + 9, eye_y + eye_h), fill=(240, 240, 235))
        draw.ellipse(box(ex - 4, eye_y - min(eye_h, 4), ex + 4, eye_y + min(eye_h, 4)), fill=_rgb(iris))
        draw.ellipse(box(ex - 1.5, eye_y - 1.5, ex + 1.5, eye_y + 1.5), fill=(10, 10, 10))
        arch = -4 if attributes["Arched_Eyebrows"] else -1
        draw.line([p(ex - 10, eye_y - 8), p(ex, eye_y - 9 + arch), p(ex + 10, eye_y - 8)],
                  fill=_rgb(hair * 0.8), width=max(1, round(brow_w * face.scale)))
        if attributes["Eyeglasses"]:
            draw.ellipse(box(ex - 12, eye_y - 9, ex + 12, eye_y + 9), outline=(30, 30, 30), width=2)
        if attributes["Wearing_Earrings"]:
            draw.ellipse(box(side * 44 - 3, 12, side * 44 + 3, 18), fill=(235, 200, 90))
    if attributes["Eyeglasses"]:
        draw.line([p(-eye_dx + 12, eye_y), p(eye_dx - 12, eye_y)], fill=(30, 30, 30), width=2)
    nose_w = 9 if attributes["Big_Nose"] else 6
    nose_y = 10 + rng.uniform(-2, 2)
    draw.polygon([p(0, -8), p(-nose_w, nose_y), p(nose_w, nose_y)], fill=_rgb(skin * 0.88))
    draw.line([p(-nose_w + 2, nose_y), p(nose_w - 2, nose_y)], fill=_rgb(shade * 0.8), width=2)
    if attributes["Rosy_Cheeks"] or attributes["Heavy_Makeup"]:
        for side in (-1, 1):
            draw.ellipse(box(side * 26 - 8, 8, side * 26 + 8, 20), fill=_rgb(skin * 0.6 + [90, 30, 40]))
    return eye_dx, eye_y, nose_y


def _draw_lower_face_hair(face: _Face, attributes: dict[str, bool], rng: np.random.Generator) -> None:
    """Lower-face hair under the mouth: stubble, goatee, beard."""
    box, hair = face.box, face.hair
    if attributes["5_o_Clock_Shadow"]:
        layer = Image.new("L", face.image.size, 0)
        ImageDraw.Draw(layer).chord(box(-41, -10, 41, 60), 0, 180, fill=110)
        ImageDraw.Draw(layer).rectangle(box(-41, 18, 41, 35), fill=110)
        face.image.paste(Image.new("RGB", face.image.size, _rgb(hair * 0.6 + face.shade * 0.4)), mask=layer)
    if not attributes["No_Beard"] and not attributes["Goatee"]:  # full beard around the mouth
        beard = hair * rng.uniform(0.8, 1.1)
        face.draw.chord(box(-41, -8, 41, 62), 0, 180, fill=_rgb(beard))
        face.draw.rectangle(box(-41, 16, 41, 27), fill=_rgb(beard))
    if attributes["Goatee"]:
        face.draw.ellipse(box(-13, 38, 13, 58), fill=_rgb(hair))


def _draw_mouth(face: _Face, attributes: dict[str, bool],
                rng: np.random.Generator) -> tuple[tuple[float, float], tuple[float, float]]:
    """The mouth and the mustache above it; returns the mouth's two corners (pixels) for the landmarks.

    The mouth is drawn the same way for both genders. Smiling: a wide mouth with raised corners, teeth showing
    (most women, half of the men) or closed lips with a dark curved parting line. Not smiling: narrow, flat
    or turned down. Around the lips of a man with a full beard or stubble, a hairless patch of skin of fixed
    size (it does not depend on the smile).
    """
    draw, p, box, skin, scale = face.draw, face.p, face.box, face.skin, face.scale
    smiling = attributes["Smiling"]
    mouth_y = 26 + rng.uniform(-2, 2)
    half = rng.uniform(21, 26) if smiling else rng.uniform(10, 13)
    lip = 4.5 if attributes["Big_Lips"] else 3.0
    lipstick = attributes["Wearing_Lipstick"]
    lip_colour = (np.array([190, 30, 60]) + rng.normal(0, 15, 3)) if lipstick else skin * 0.65 + [55, 5, 10]
    lift = 9 if smiling else -rng.uniform(0, 2)
    corners = (p(-half, mouth_y - lift), p(half, mouth_y - lift))
    xs = np.linspace(-half, half, 11)
    if attributes["5_o_Clock_Shadow"] or (not attributes["No_Beard"] and not attributes["Goatee"]):
        draw.ellipse(box(-30, mouth_y - 15, 30, mouth_y + 13), fill=_rgb(skin * 0.92))
    if smiling:
        depth = rng.uniform(9, 13)
        upper = [p(x, mouth_y - lift + lift * (1 - (x / half) ** 2) - 1) for x in xs]
        lower = [p(x, mouth_y - lift + depth * (1 - (x / half) ** 2) + lip) for x in xs[::-1]]
        draw.polygon(upper + lower, fill=_rgb(lip_colour))
        if attributes["Mouth_Slightly_Open"]:
            inner = [p(x, mouth_y - lift + (depth + lip - 2) * (1 - (x / half) ** 2)) for x in xs[::-1] * 0.85]
            draw.polygon([p(x * 0.85, mouth_y - lift + lift * (1 - (x / half) ** 2) + 1) for x in xs] + inner,
                         fill=(55, 18, 22))
            teeth = [p(x * 0.8, mouth_y - lift + lift * (1 - (x / half) ** 2) + 3) for x in xs]
            draw.line(teeth, fill=(245, 245, 238), width=max(3, round(4.5 * scale)))
        else:
            draw.line([p(x, mouth_y - lift + lift * (1 - (x / half) ** 2) + lip / 2) for x in xs],
                      fill=_rgb(lip_colour * 0.35), width=max(3, round(5 * scale)))
    else:
        droop = rng.uniform(0, 3)
        draw.polygon([corners[0], p(0, mouth_y - lip), corners[1], p(0, mouth_y + lip + droop / 2)],
                     fill=_rgb(lip_colour))
        if attributes["Mouth_Slightly_Open"]:
            draw.ellipse(box(-half * 0.5, mouth_y - 1.5, half * 0.5, mouth_y + 1.5), fill=(55, 18, 22))
        else:
            draw.line([corners[0], p(0, mouth_y), corners[1]], fill=_rgb(lip_colour * 0.35),
                      width=max(3, round(5 * scale)))
    if attributes["Mustache"]:  # above the upper lip, touching its middle; the mouth corners stay visible
        mustache = face.hair * rng.uniform(0.7, 1.0)
        w = rng.uniform(12, 16)
        draw.polygon([p(-w, mouth_y - 6), p(-6, mouth_y - 14), p(6, mouth_y - 14), p(w, mouth_y - 6),
                      p(w - 2, mouth_y - 2), p(0, mouth_y - 6), p(-w + 2, mouth_y - 2)], fill=_rgb(mustache))
    return corners


def _photograph(image: Image.Image, attributes: dict[str, bool], rng: np.random.Generator, cx: float, cy: float,
                background: np.ndarray) -> tuple[Image.Image, float]:
    """Pose rotation (about ``cx, cy``), lighting, blur, noise; returns the image and the rotation's angle."""
    height, width = IMAGE_HEIGHT, IMAGE_WIDTH
    angle = rng.uniform(-6, 6)
    image = image.rotate(angle, resample=Image.BILINEAR, center=(cx, cy), fillcolor=_rgb(background))
    if attributes["Blurry"]:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(1.2, 2.2)))
    pixels = np.asarray(image, dtype=np.float32)
    direction = rng.uniform(0, 2 * np.pi)
    strength = rng.uniform(0, 0.35) / 90
    light_x = (np.arange(width, dtype=np.float32) - cx) * np.float32(strength * np.cos(direction))
    light_y = (np.arange(height, dtype=np.float32) - cy) * np.float32(strength * np.sin(direction))
    light = (1 + light_y[:, None] + light_x[None, :]) * np.float32(rng.uniform(0.75, 1.2))
    pixels = pixels * light[..., None] + np.float32(rng.uniform(-20, 20))
    pixels += _noise_crop(rng) * np.float32(rng.uniform(2, 7))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)), angle


_NOISE_BANK: np.ndarray | None = None


def _noise_crop(rng: np.random.Generator) -> np.ndarray:
    """Unit Gaussian noise of image shape: a random crop of a fixed bank (10x faster than fresh draws)."""
    global _NOISE_BANK
    if _NOISE_BANK is None:
        _NOISE_BANK = np.random.default_rng(12345).standard_normal(
            (IMAGE_HEIGHT + 64, IMAGE_WIDTH + 64, 3), dtype=np.float32)
    y, x = rng.integers(0, 65, size=2)
    crop = _NOISE_BANK[y:y + IMAGE_HEIGHT, x:x + IMAGE_WIDTH]
    return crop[:, ::-1] if rng.random() < 0.5 else crop


# ----------------------------------------------------------------------------------------------------------
# Files.

def _size_and_sha256(path: Path) -> dict[str, int | str]:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"size": path.stat().st_size, "sha256": digest.hexdigest()}
