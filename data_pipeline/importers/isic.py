"""ISIC challenge releases (2017, 2018, 2019, 2020) and ISIC Archive metadata exports.

What each reader relies on, from the publishers' documentation and release files:

* **ISIC 2017** (Codella et al. 2017, arXiv:1710.05006; challenge.isic-archive.com/data#2017):
  ``ISIC-2017_{Training,Validation,Test_v2}_Part3_GroundTruth.csv`` with ``image_id, melanoma,
  seborrheic_keratosis`` (1.0 / 0.0; neither = benign nevus), ``..._Data_metadata.csv`` with
  ``image_id, age_approximate, sex`` (``unknown`` for blanks), images in ``..._Data/``. No
  lesion ids and no body site.
* **ISIC 2018 Task 3** (Codella et al. 2019, arXiv:1902.03368; Tschandl et al. 2018):
  ``ISIC2018_Task3_{Training,Validation,Test}_GroundTruth.csv`` one-hot ``image, MEL, NV, BCC,
  AKIEC, BKL, DF, VASC``; ``ISIC2018_Task3_Training_LesionGroupings.csv`` (``image,
  lesion_id, diagnosis_confirm_type``). Its training part *is* HAM10000.
* **ISIC 2019** (Combalia et al. 2019, arXiv:1908.02288): ``ISIC_2019_{Training,Test}_
  GroundTruth.csv`` one-hot ``image, MEL, NV, BCC, AK, BKL, DF, VASC, SCC, UNK`` and
  ``..._Metadata.csv`` (``image, age_approx, anatom_site_general, lesion_id, sex``).
* **ISIC 2020** (Rotemberg et al. 2021, Sci Data 8:34): ``train.csv`` (Kaggle) or
  ``ISIC_2020_Training_GroundTruth[_v2].csv`` with ``image_name, patient_id, sex, age_approx,
  anatom_site_general_challenge, diagnosis, benign_malignant, target`` (v2 adds
  ``lesion_id``); diagnoses ``nevus, melanoma, seborrheic keratosis, lentigo NOS, lichenoid
  keratosis, solar lentigo, cafe-au-lait macule, atypical melanocytic proliferation, unknown``.
* **ISIC Archive** (isic-archive wiki "Image" data dictionary; the ``isic`` CLI's
  ``metadata.csv``): ``isic_id`` plus either the older ``diagnosis`` / ``benign_malignant`` /
  ``anatom_site_general`` or the newer hierarchical ``diagnosis_1..5`` (``Benign`` /
  ``Malignant`` / ``Indeterminate`` :: family :: entity :: subtype, e.g. ``Malignant::Malignant
  melanocytic proliferations (Melanoma)::Melanoma in situ``) and ``anatom_site_1..5``
  (``Head and neck:Head:Face``, ``Trunk:Posterior trunk``, ``Lower extremity:Buttock`` …);
  ``anatom_site_general`` values ``head/neck, upper extremity, lower extremity, anterior torso,
  posterior torso, lateral torso, palms/soles, oral/genital``.

Sites are mapped onto HAM10000's ``localization`` words; a site that spans several of them
(``head/neck``: face, scalp, ear or neck) becomes ``unknown`` rather than a guess.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from common.errors import DataError
from data_pipeline.ham10000 import DOWNSAMPLED_SUFFIX
from data_pipeline.importers.core import (
    ClassInfo,
    Row,
    Spec,
    blank,
    clean,
    dict_map,
    find_optional,
    index_images,
    read_csv,
    short_code,
)

ISIC_LICENCE = "CC BY-NC 4.0 (ISIC Archive images; see each image's attribution)"

#: ISIC ``anatom_site_general`` (2019, Archive) and ``anatom_site_general_challenge`` (2020).
ISIC_SITES: dict[str, str | None] = {
    "head/neck": None,
    "upper extremity": "upper extremity",
    "lower extremity": "lower extremity",
    "anterior torso": "trunk",
    "posterior torso": "back",
    "lateral torso": "trunk",
    "torso": "trunk",
    "palms/soles": "acral",
    "oral/genital": "genital",
}
#: Terms of the Archive's hierarchical ``anatom_site_1..5``; the deepest mapped term wins.
ARCHIVE_SITE_TERMS: dict[str, str | None] = {
    "head and neck": None,
    "head": None,
    "scalp": "scalp",
    "ear": "ear",
    "face": "face",
    "neck": "neck",
    "trunk": "trunk",
    "anterior trunk": "trunk",
    "lateral trunk": "trunk",
    "posterior trunk": "back",
    "anterior chest": "chest",
    "lateral chest": "chest",
    "chest": "chest",
    "anterior abdomen": "abdomen",
    "lateral abdomen": "abdomen",
    "abdomen": "abdomen",
    "upper back": "back",
    "lower back": "back",
    "upper extremity": "upper extremity",
    "hand": "hand",
    "palm of hand": "acral",
    "lower extremity": "lower extremity",
    "foot": "foot",
    "sole of foot": "acral",
    "anogenital region": "genital",
    "genital region": "genital",
    "perianal region": "genital",
}

#: HAM10000's classes for the older Archive / ISIC 2020 ``diagnosis`` strings. HAM10000's
#: ``akiec`` is actinic keratosis and intraepithelial carcinoma (Bowen's), so invasive SCC has
#: no HAM10000 class; ``bkl`` covers solar lentigines, seborrheic and lichen-planus-like
#: keratoses; ``vasc`` angiomas, angiokeratomas, pyogenic granulomas and haemorrhage
#: (Tschandl et al. 2018).
DIAGNOSIS_HAM7: dict[str, str | None] = {
    "nevus": "nv",
    "melanoma": "mel",
    "melanoma metastasis": "mel",
    "basal cell carcinoma": "bcc",
    "actinic keratosis": "akiec",
    "squamous cell carcinoma": None,
    "seborrheic keratosis": "bkl",
    "pigmented benign keratosis": "bkl",
    "solar lentigo": "bkl",
    "lentigo nos": "bkl",
    "lichenoid keratosis": "bkl",
    "dermatofibroma": "df",
    "vascular lesion": "vasc",
    "angioma": "vasc",
    "angiokeratoma": "vasc",
    "pyogenic granuloma": "vasc",
    "hemorrhage": "vasc",
}
#: Terms of the hierarchical ``diagnosis_2..5``; the deepest mapped term wins.
HIERARCHY_HAM7: dict[str, str | None] = {
    "benign melanocytic proliferations": "nv",
    "nevus": "nv",
    "malignant melanocytic proliferations (melanoma)": "mel",
    "melanoma, nos": "mel",
    "melanoma in situ": "mel",
    "melanoma invasive": "mel",
    "melanoma metastasis": "mel",
    "basal cell carcinoma": "bcc",
    "solar or actinic keratosis": "akiec",
    "squamous cell carcinoma in situ": "akiec",
    "squamous cell carcinoma, invasive": None,
    "squamous cell carcinoma, nos": None,
    "seborrheic keratosis": "bkl",
    "pigmented benign keratosis": "bkl",
    "solar lentigo": "bkl",
    "lentigo nos": "bkl",
    "lichen planus like keratosis": "bkl",
    "dermatofibroma": "df",
    "benign soft tissue proliferations - vascular": "vasc",
    "hemangioma": "vasc",
    "angiokeratoma": "vasc",
    "pyogenic granuloma": "vasc",
    "atypical melanocytic neoplasm": None,
    "atypical intraepithelial melanocytic proliferation": None,
}
HIERARCHY_SEP = "::"
#: Native class codes of common Archive diagnoses (the usual abbreviations); any other
#: diagnosis gets :func:`short_code`'s.
ARCHIVE_CODES: dict[str, str] = {
    "nevus": "nv",
    "melanoma": "mel",
    "melanoma, nos": "mel",
    "melanoma in situ": "mel_is",
    "melanoma invasive": "mel_inv",
    "melanoma metastasis": "mel_met",
    "basal cell carcinoma": "bcc",
    "actinic keratosis": "ak",
    "solar or actinic keratosis": "ak",
    "squamous cell carcinoma": "scc",
    "squamous cell carcinoma, nos": "scc",
    "squamous cell carcinoma in situ": "scc_is",
    "squamous cell carcinoma, invasive": "scc_inv",
    "seborrheic keratosis": "sk",
    "pigmented benign keratosis": "pbk",
    "solar lentigo": "sl",
    "lentigo nos": "lentigo",
    "lichenoid keratosis": "lplk",
    "lichen planus like keratosis": "lplk",
    "dermatofibroma": "df",
    "vascular lesion": "vasc",
    "hemangioma": "hemang",
    "angioma": "angioma",
    "angiokeratoma": "angiok",
    "pyogenic granuloma": "pyog_gr",
    "atypical melanocytic neoplasm": "amn",
    "atypical melanocytic proliferation": "amp",
}


def _sites(table: dict[str, str | None]) -> tuple:
    known = {clean(k) for k in table}
    return dict_map(table), (lambda raw: clean(raw) in known)


@dataclass
class _Release:
    """A challenge release split in parts (training, validation, test), as it is read: each
    part's ground-truth CSV, the images under ``src``, and the rows, input files, notes and
    drop counts gathered so far (the 2017, 2018 and 2019 readers share this)."""

    src: Path
    parts: dict[str, Path]  # {split: ground-truth CSV}
    images: dict[str, Path]
    rows: list[Row] = field(default_factory=list)
    inputs: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    dropped: Counter[str] = field(default_factory=Counter)

    @classmethod
    def find(cls, src: Path, pattern: str, parts: dict[str, str], what: str) -> _Release:
        """The parts present under ``src`` (``pattern`` with ``{part}``; none: refused)."""
        found: dict[str, Path] = {}
        for part, split in parts.items():
            path = find_optional(src, [pattern.format(part=part)])
            if path is not None and split not in found:
                found[split] = path
        if not found:
            raise DataError(f"{src}: no {pattern.format(part='*')} found ({what}).")
        release = cls(src, found, index_images(src))
        names = {split: part for part, split in reversed(parts.items())}
        missing = [
            pattern.format(part=names[s]) for s in dict.fromkeys(parts.values()) if s not in found
        ]
        if missing:
            have = " and ".join(names[s] for s in found)
            release.notes.append(
                f"only the {have} part{'s' if len(found) > 1 else ''} found (no "
                f"{', '.join(missing)})" + ("" if len(found) > 1 else ": no official split is kept")
            )
        return release

    def metadata(self, name: str, key: str, fields: str) -> dict[str, dict]:
        """{image id: metadata row} of a part's metadata CSV; a part downloaded without it is
        imported with those fields unknown (and says so)."""
        path = find_optional(self.src, [name])
        if path is None:
            self.notes.append(f"no {name}: {fields} unknown")
            return {}
        self.inputs.append(path)
        return read_csv(path, (key,)).drop_duplicates(key).set_index(key).to_dict("index")

    def image(self, image_id: str) -> Path | None:
        """The file of a ground-truth id, given with or without :data:`DOWNSAMPLED_SUFFIX` (ISIC
        2019's input folder holds some MSK images as ``ISIC_xxxxxxx_downsampled.jpg``)."""
        base = image_id.removesuffix(DOWNSAMPLED_SUFFIX)
        return (
            self.images.get(image_id)
            or self.images.get(base + DOWNSAMPLED_SUFFIX)
            or self.images.get(base)
        )

    def split_of(self, split: str) -> str:
        """A row's official split, recorded only when the folder holds more than one part."""
        return split if len(self.parts) > 1 else ""


def _one_hot(
    df: pd.DataFrame, columns: list[str], path: Path, dropped: Counter
) -> list[str | None]:
    """The column name holding the single 1 of each row (None where not exactly one)."""
    values = df[columns].apply(pd.to_numeric, errors="coerce").fillna(0.0)
    hot = values > 0.5
    ok = hot.sum(axis=1) == 1
    if (~ok).any():
        dropped[f"{path.name}: ground truth not one-hot"] += int((~ok).sum())
    return [str(c) if k else None for c, k in zip(hot.idxmax(axis=1), ok, strict=True)]


# --- ISIC 2017 --------------------------------------------------------------------------------


def read_isic2017(src: Path) -> Spec:
    release = _Release.find(
        src,
        "ISIC-2017_{part}_Part3_GroundTruth.csv",
        {"Training": "train", "Validation": "val", "Test_v2": "test", "Test": "test"},
        "the Part 3 ground truth of the training, validation or test set",
    )
    for split, gt_path in release.parts.items():
        gt = read_csv(gt_path, ("image_id", "melanoma", "seborrheic_keratosis"))
        part = gt_path.name.removeprefix("ISIC-2017_").removesuffix("_Part3_GroundTruth.csv")
        release.inputs.append(gt_path)
        meta = release.metadata(f"ISIC-2017_{part}_Data_metadata.csv", "image_id", "age and sex")
        for image_id, mel, sk in zip(
            gt["image_id"], gt["melanoma"], gt["seborrheic_keratosis"], strict=True
        ):
            label = (
                "melanoma"
                if float(mel or 0) > 0.5
                else ("seborrheic keratosis" if float(sk or 0) > 0.5 else "nevus")
            )
            m = meta.get(image_id, {})
            release.rows.append(
                Row(
                    image_id,
                    release.image(image_id),
                    label,
                    age=m.get("age_approximate"),
                    sex=m.get("sex"),
                    split=release.split_of(split),
                )
            )
    release.notes.append("ISIC 2017 gives no lesion ids (lesion_id = image_id) and no body site")
    site, known = _sites({})
    return Spec(
        name="ISIC 2017 (Part 3: lesion classification)",
        citation=(
            "Codella N. et al. Skin lesion analysis toward melanoma detection: a challenge at the "
            "2017 ISBI, hosted by the ISIC. arXiv:1710.05006."
        ),
        licence=ISIC_LICENCE,
        rows=release.rows,
        inputs=release.inputs,
        ham7=dict_map({"melanoma": "mel", "seborrheic keratosis": "bkl", "nevus": "nv"}),
        native_classes=[
            ClassInfo("mel", "Melanoma", True),
            ClassInfo("sk", "Seborrheic keratosis", False),
            ClassInfo("nv", "Nevus", False),
        ],
        native=dict_map({"melanoma": "mel", "seborrheic keratosis": "sk", "nevus": "nv"}),
        site=site,
        known_site=known,
        notes=release.notes,
        dropped=release.dropped,
    )


# --- ISIC 2018 / 2019: one-hot ground truth ---------------------------------------------------

_2018 = ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
_2019 = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]
_NAMES = {
    "MEL": ("mel", "Melanoma", True),
    "NV": ("nv", "Melanocytic nevus", False),
    "BCC": ("bcc", "Basal cell carcinoma", True),
    "AKIEC": ("akiec", "Actinic keratosis / intraepithelial carcinoma", True),
    "AK": ("ak", "Actinic keratosis", True),
    "BKL": ("bkl", "Benign keratosis-like lesion", False),
    "DF": ("df", "Dermatofibroma", False),
    "VASC": ("vasc", "Vascular lesion", False),
    "SCC": ("scc", "Squamous cell carcinoma", True),
}


def read_isic2018(src: Path) -> Spec:
    release = _Release.find(
        src,
        "ISIC2018_Task3_{part}_GroundTruth.csv",
        {"Training": "train", "Validation": "val", "Test": "test"},
        "the Task 3 ground truth of the training, validation or test set",
    )
    groups_path = find_optional(src, ["ISIC2018_Task3_Training_LesionGroupings.csv"])
    lesions: dict[str, str] = {}
    confirm: dict[str, str] = {}
    release.inputs.extend(release.parts.values())
    release.notes.extend(
        [
            "the ISIC 2018 Task 3 training set is HAM10000 itself (same image ids): do not "
            "combine it with ../ham10000 (the leak check refuses shared ids)",
            "ISIC 2018 Task 3 ships no age, sex or body site (HAM10000's metadata has them)",
        ]
    )
    if groups_path is not None:
        release.inputs.append(groups_path)
        g = read_csv(groups_path, ("image", "lesion_id"))
        lesions = dict(zip(g["image"], g["lesion_id"], strict=True))
        if "diagnosis_confirm_type" in g.columns:
            confirm = dict(zip(g["image"], g["diagnosis_confirm_type"], strict=True))
    elif "train" in release.parts:
        release.notes.append("no ISIC2018_Task3_Training_LesionGroupings.csv: lesion_id = image_id")
    for split, gt_path in release.parts.items():
        gt = read_csv(gt_path, ["image", *_2018])
        labels = _one_hot(gt, _2018, gt_path, release.dropped)
        for image_id, label in zip(gt["image"], labels, strict=True):
            if label is not None:
                release.rows.append(
                    Row(
                        image_id,
                        release.image(image_id),
                        label,
                        lesion_id=lesions.get(image_id, ""),
                        split=release.split_of(split),
                        confirm_type=confirm.get(image_id),
                    )
                )
    return _one_hot_spec(
        "ISIC 2018 (Task 3: lesion diagnosis)",
        "Codella N. et al. Skin lesion analysis toward melanoma detection 2018: a challenge "
        "hosted by the ISIC. arXiv:1902.03368; Tschandl P. et al. The HAM10000 dataset. "
        "Sci Data 5:180161 (2018).",
        release,
        _2018,
        {"MEL": "mel", "NV": "nv", "BCC": "bcc", "AKIEC": "akiec", "BKL": "bkl", "DF": "df"}
        | {"VASC": "vasc"},
        {},
    )


def read_isic2019(src: Path) -> Spec:
    release = _Release.find(
        src,
        "ISIC_2019_{part}_GroundTruth.csv",
        {"Training": "train", "Test": "test"},
        "ISIC_2019_Training_GroundTruth.csv or ISIC_2019_Test_GroundTruth.csv",
    )
    for split, gt_path in release.parts.items():
        part = "Training" if split == "train" else "Test"
        gt = read_csv(gt_path, ["image", *_2019[:-1]])
        cols = [c for c in _2019 if c in gt.columns]
        release.inputs.append(gt_path)
        meta = release.metadata(f"ISIC_2019_{part}_Metadata.csv", "image", "age, sex and site")
        labels = _one_hot(gt, cols, gt_path, release.dropped)
        for image_id, label in zip(gt["image"], labels, strict=True):
            if label is None:
                continue
            m = meta.get(image_id, {})
            release.rows.append(
                Row(
                    image_id,
                    release.image(image_id),
                    label,
                    lesion_id=m.get("lesion_id", ""),
                    age=m.get("age_approx"),
                    sex=m.get("sex"),
                    site=m.get("anatom_site_general", ""),
                    split=release.split_of(split),
                )
            )
    release.notes.append(
        "the ISIC 2019 training set contains HAM10000 (ISIC_0024306 … ISIC_0034320) and ISIC "
        "2017 images: do not combine it with those folders (the leak check refuses shared ids)"
    )
    return _one_hot_spec(
        "ISIC 2019",
        "Tschandl P. et al. Sci Data 5:180161 (2018); Codella N. et al. arXiv:1710.05006; "
        "Combalia M. et al. BCN20000: dermoscopic lesions in the wild. arXiv:1908.02288.",
        release,
        [c for c in _2019 if c != "UNK"],
        {"MEL": "mel", "NV": "nv", "BCC": "bcc", "AK": "akiec", "BKL": "bkl", "DF": "df"}
        | {"VASC": "vasc", "SCC": None, "UNK": None},
        ISIC_SITES,
    )


def _one_hot_spec(
    name: str,
    citation: str,
    release: _Release,
    native_cols: list[str],
    ham7: Mapping[str, str | None],
    sites: dict[str, str | None],
) -> Spec:
    site, known = _sites(sites)
    native = [ClassInfo(*_NAMES[c]) for c in native_cols]
    return Spec(
        name=name,
        citation=citation,
        licence=ISIC_LICENCE,
        rows=release.rows,
        inputs=release.inputs,
        ham7=dict_map(ham7),
        native_classes=native,
        native=dict_map({c: _NAMES[c][0] for c in native_cols}),
        site=site,
        known_site=known,
        notes=release.notes,
        dropped=release.dropped,
    )


# --- ISIC 2020 --------------------------------------------------------------------------------


def read_isic2020(src: Path) -> Spec:
    gt_path = find_optional(
        src,
        [
            "ISIC_2020_Training_GroundTruth_v2.csv",
            "ISIC_2020_Training_GroundTruth.csv",
            "train.csv",
        ],
    )
    if gt_path is None:
        raise DataError(f"{src}: no train.csv or ISIC_2020_Training_GroundTruth[_v2].csv found.")
    gt = read_csv(gt_path, ("image_name", "diagnosis", "target"))
    images = index_images(src)
    rows = [
        Row(
            r["image_name"],
            images.get(r["image_name"]),
            r["diagnosis"],
            lesion_id=r.get("lesion_id", ""),
            patient_id=r.get("patient_id", ""),
            age=r.get("age_approx"),
            sex=r.get("sex"),
            site=r.get("anatom_site_general_challenge", ""),
            native="mel" if clean(r["target"]) in ("1", "1.0") else "other",
        )
        for r in gt.to_dict("records")
    ]
    site, known = _sites(ISIC_SITES)
    return Spec(
        name="ISIC 2020 (SIIM-ISIC melanoma classification)",
        citation=(
            "Rotemberg V. et al. A patient-centric dataset of images and metadata for "
            "identifying melanomas using clinical context. Sci Data 8:34 (2021)."
        ),
        licence="CC BY-NC 4.0",
        rows=rows,
        inputs=[gt_path],
        ham7=dict_map(DIAGNOSIS_HAM7),
        native_classes=[
            ClassInfo("other", "Not melanoma", False),
            ClassInfo("mel", "Melanoma", True),
        ],
        native=lambda label: None,
        site=site,
        known_site=known,
        notes=[
            "most ISIC 2020 images have diagnosis 'unknown' (benign, no diagnosis): they have no "
            "HAM10000 class; --classes native keeps every image as melanoma vs other (target)",
            "no official split; training makes a patient- and lesion-grouped one",
        ],
    )


# --- ISIC Archive -----------------------------------------------------------------------------


def _hierarchy(row: dict, prefix: str, depth: int, sep: str) -> str:
    """``prefix_1 .. prefix_depth`` joined with ``sep`` (blank levels left out)."""
    levels = [str(row.get(f"{prefix}_{i}", "") or "").strip() for i in range(1, depth + 1)]
    return sep.join(v for v in levels if v and not blank(v))


def _deepest(path: str, table: dict[str, str | None], sep: str, skip_first: bool) -> str | None:
    terms = [clean(t) for t in path.split(sep) if t.strip()]
    if skip_first:
        terms = terms[1:]
    norm = {clean(k): v for k, v in table.items()}
    for term in reversed(terms):
        if term in norm:
            return norm[term] or ""
    return None


def _licences(df: pd.DataFrame) -> str:
    """The images' licences as the export lists them (``copyright_license``), with counts."""
    if "copyright_license" not in df.columns:
        return ""
    counts = Counter(v.strip() for v in df["copyright_license"] if v.strip())
    return "; ".join(f"{lic} ({n} images)" for lic, n in counts.most_common())


def read_isic_archive(src: Path) -> Spec:
    csv_path = find_optional(src, ["metadata.csv"]) or next(
        (p for p in sorted(src.glob("*.csv")) if "isic_id" in p.read_text(errors="replace")[:2000]),
        None,
    )
    if csv_path is None:
        raise DataError(f"{src}: no ISIC Archive metadata.csv (with an isic_id column) found.")
    df = read_csv(csv_path, ("isic_id",))
    hierarchical = "diagnosis_1" in df.columns
    if not hierarchical and "diagnosis" not in df.columns:
        raise DataError(
            f"{csv_path}: missing column 'diagnosis' (or the hierarchical diagnosis_1..5)."
        )
    images = index_images(src)

    # read once, used for every row: the hierarchical terms and the older general sites
    terms, general_sites = {clean(k) for k in ARCHIVE_SITE_TERMS}, {clean(k) for k in ISIC_SITES}
    general_site = dict_map(ISIC_SITES)

    def hierarchical_site(raw: str) -> bool:
        return ":" in raw or clean(raw) in terms

    def site_of(raw: str) -> str | None:
        if hierarchical_site(raw):
            return _deepest(raw, ARCHIVE_SITE_TERMS, ":", skip_first=False) or None
        return general_site(raw)

    def known(raw: str) -> bool:
        if hierarchical_site(raw):
            return _deepest(raw, ARCHIVE_SITE_TERMS, ":", skip_first=False) is not None
        return clean(raw) in general_sites

    rows: list[Row] = []
    native_names: dict[str, tuple[str, bool]] = {}
    codes: dict[str, str] = {}
    taken: set[str] = set()
    types: Counter[str] = Counter()
    for r in df.to_dict("records"):
        if hierarchical:
            label = _hierarchy(r, "diagnosis", 5, HIERARCHY_SEP)
            levels = label.split(HIERARCHY_SEP)
            native_name = levels[2] if len(levels) >= 3 else (levels[1] if len(levels) == 2 else "")
            malignant = clean(r.get("diagnosis_1")) == "malignant"
        else:
            label = str(r.get("diagnosis", "")).strip()
            native_name = label
            malignant = clean(r.get("benign_malignant")) == "malignant"
        site_path = _hierarchy(r, "anatom_site", 5, ":")
        general = str(r.get("anatom_site_general", "") or "")
        # the hierarchical site when it maps, else the same row's general site when it has one
        site = site_path if site_path and (known(site_path) or blank(general)) else general
        code = ""
        if native_name and not blank(native_name):
            if clean(native_name) not in codes:
                codes[clean(native_name)] = short_code(native_name, taken, ARCHIVE_CODES)
            code = codes[clean(native_name)]
            name, was = native_names.get(code, (native_name, False))
            native_names[code] = (name, was or malignant)
        if "image_type" in r and str(r["image_type"]).strip():
            types[str(r["image_type"]).strip()] += 1
        rows.append(
            Row(
                r["isic_id"],
                images.get(r["isic_id"]),
                label,
                lesion_id=r.get("lesion_id", ""),
                patient_id=r.get("patient_id", ""),
                age=r.get("age_approx"),
                sex=r.get("sex"),
                site=site,
                fitzpatrick=r.get("fitzpatrick_skin_type"),
                native=code,
                confirm_type=r.get("diagnosis_confirm_type"),
            )
        )

    def ham7(label: str) -> str | None:
        if hierarchical:
            return _deepest(label, HIERARCHY_HAM7, HIERARCHY_SEP, skip_first=True) or None
        return dict_map(DIAGNOSIS_HAM7)(label)

    notes = [
        f"{'hierarchical diagnosis_1..5' if hierarchical else 'older diagnosis'} columns; the "
        "most specific diagnosis with a mapping decides the class"
    ]
    non_derm = {t: n for t, n in types.items() if clean(t) != "dermoscopic"}
    if non_derm:
        notes.append(
            "not all images are dermoscopic (image_type: "
            + ", ".join(f"{t} {n}" for t, n in sorted(types.items()))
            + "); the model was trained on dermoscopy"
        )
    return Spec(
        name=f"ISIC Archive export ({csv_path.name})",
        citation="International Skin Imaging Collaboration (ISIC) Archive, "
        "https://www.isic-archive.com; cite each image's attribution (column 'attribution').",
        licence=_licences(df) or ISIC_LICENCE,
        rows=rows,
        inputs=[csv_path],
        ham7=ham7,
        native_classes=[ClassInfo(c, n, m) for c, (n, m) in sorted(native_names.items())],
        native=lambda label: None,
        site=site_of,
        known_site=known,
        modality="mixed" if non_derm else "dermoscopy",
        notes=notes,
    )
