"""derm7pt, PH2 and PAD-UFES-20 releases, read as their publishers distribute them.

* **derm7pt** (Kawahara et al., IEEE JBHI 2018; the release's ``meta/meta.csv`` and the
  publisher's ``derm7pt`` Python module, github.com/jeremykawahara/derm7pt): ``meta/meta.csv``
  with ``case_num, diagnosis, …, elevation, location, sex, management, clinic, derm`` (``derm``
  and ``clinic`` are image paths under ``images/``), and the official split as 0-based row
  indexes in ``meta/{train,valid,test}_indexes.csv`` (column ``indexes``). The diagnosis strings
  are the module's 15 categories (melanoma in five stages: ``melanoma``, ``melanoma (in situ)``,
  ``melanoma (less than 0.76 mm)``, ``melanoma (0.76 to 1.5 mm)``, ``melanoma (more than 1.5
  mm)``, ``melanoma metastasis``); locations ``abdomen, acral, back, buttocks, chest, genital
  areas, head neck, lower limbs, upper limbs``. No age.
* **PH2** (Mendonça et al., IEEE EMBC 2013; fc.up.pt/addi/ph2 database): ``PH2_dataset.txt``, a
  ``||``-delimited table whose columns start ``Name || Histological Diagnosis || Clinical
  Diagnosis`` with clinical diagnosis ``0`` common nevus, ``1`` atypical nevus, ``2`` melanoma
  (80 / 80 / 40 images), or ``PH2_dataset.xlsx`` with the same content as X marks under
  ``Common Nevus / Atypical Nevus / Melanoma``; images ``PH2 Dataset images/IMDxxx/
  IMDxxx_Dermoscopic_Image/IMDxxx.bmp`` (768×560 BMP, converted losslessly to PNG). No age,
  sex or site.
* **PAD-UFES-20** (Pacheco et al., Data in Brief 32:106221, 2020; Mendeley Data
  doi:10.17632/zr7vgbcyr2.1, CC BY 4.0): ``metadata.csv`` with ``patient_id, lesion_id, img_id,
  diagnostic, age, gender, region, fitspatrick, …`` and PNG images (``images/`` or the release's
  ``imgs_part_1..3``). Diagnostic codes ``ACK, BCC, MEL, NEV, SCC, SEK`` (Bowen's disease is
  folded into SCC); regions ``ABDOMEN, ARM, BACK, CHEST, EAR, FACE, FOOT, FOREARM, HAND, LIP,
  NECK, NOSE, SCALP, THIGH``. ``lesion_id`` is unique only within a patient, so the lesion key
  is ``patient_id`` + ``lesion_id``. These are **smartphone clinical photographs, not
  dermoscopy**.
"""

from __future__ import annotations

import re
import zipfile
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

from common.errors import DataError
from data_pipeline.importers.core import (
    ClassInfo,
    Row,
    Spec,
    clean,
    dict_map,
    find_file,
    find_optional,
    index_images,
    read_csv,
)

# --- derm7pt ----------------------------------------------------------------------------------

_MELANOMA = [
    "melanoma",
    "melanoma (in situ)",
    "melanoma (less than 0.76 mm)",
    "melanoma (0.76 to 1.5 mm)",
    "melanoma (more than 1.5 mm)",
    "melanoma metastasis",
]
#: (publisher's abbreviation, name, malignant, HAM10000 class) per derm7pt diagnosis.
DERM7PT_DIAGNOSES: dict[str, tuple[str, str, bool, str | None]] = {
    "basal cell carcinoma": ("bcc", "Basal cell carcinoma", True, "bcc"),
    "blue nevus": ("bln", "Blue nevus", False, "nv"),
    "clark nevus": ("cn", "Clark nevus", False, "nv"),
    "combined nevus": ("cbn", "Combined nevus", False, "nv"),
    "congenital nevus": ("cgn", "Congenital nevus", False, "nv"),
    "dermal nevus": ("dn", "Dermal nevus", False, "nv"),
    "dermatofibroma": ("df", "Dermatofibroma", False, "df"),
    "lentigo": ("lt", "Lentigo", False, "bkl"),
    **{m: ("mel", "Melanoma", True, "mel") for m in _MELANOMA},
    "melanosis": ("mls", "Melanosis", False, None),
    "miscellaneous": ("misc", "Miscellaneous", False, None),
    "recurrent nevus": ("rn", "Recurrent nevus", False, "nv"),
    "reed or spitz nevus": ("rsn", "Reed or Spitz nevus", False, "nv"),
    "seborrheic keratosis": ("sk", "Seborrheic keratosis", False, "bkl"),
    "vascular lesion": ("vl", "Vascular lesion", False, "vasc"),
}
#: The ISIC hierarchy files the buttock under the lower extremity; ``head neck`` spans four
#: HAM10000 sites (face, scalp, ear, neck) and stays unknown.
DERM7PT_SITES: dict[str, str | None] = {
    "abdomen": "abdomen",
    "acral": "acral",
    "back": "back",
    "buttocks": "lower extremity",
    "chest": "chest",
    "genital areas": "genital",
    "head neck": None,
    "lower limbs": "lower extremity",
    "upper limbs": "upper extremity",
}


def _known(table: dict[str, str | None]):
    keys = {clean(k) for k in table}
    return lambda raw: clean(raw) in keys


def _label_maps(table: Mapping[str, tuple[str, str, bool, str | None]]) -> dict[str, Any]:
    """``ham7`` / ``native_classes`` / ``native`` of a :class:`Spec` from one table of
    publisher label → (native code, name, malignant, HAM10000 class)."""
    seen: dict[str, ClassInfo] = {}
    for code, name, malignant, _ in table.values():
        seen.setdefault(code, ClassInfo(code, name, malignant))
    return {
        "ham7": dict_map({k: v[3] for k, v in table.items()}),
        "native_classes": list(seen.values()),
        "native": dict_map({k: v[0] for k, v in table.items()}),
    }


def read_derm7pt(src: Path) -> Spec:
    if not (src / "meta").is_dir():  # the folder the release zip unpacks into: release_v0/ inside
        inner = sorted(p.parent.parent for p in src.glob("*/meta/meta.csv"))
        if len(inner) == 1:
            src = inner[0]
    meta_path = src / "meta" / "meta.csv"
    if not meta_path.is_file():
        raise DataError(f"{src}: missing meta/meta.csv (the derm7pt release folder has meta/).")
    meta = read_csv(meta_path, ("case_num", "diagnosis", "derm"))
    split_of: dict[int, str] = {}
    inputs = [meta_path]
    for split, name in (("train", "train"), ("val", "valid"), ("test", "test")):
        path = src / "meta" / f"{name}_indexes.csv"
        if not path.is_file():
            raise DataError(f"{src}: missing meta/{name}_indexes.csv (the official split).")
        inputs.append(path)
        for index in read_csv(path, ("indexes",))["indexes"]:
            split_of[int(index)] = split
    image_root = src / "images"
    if not image_root.is_dir():
        raise DataError(f"{src}: missing images/ (the folder meta.csv's derm paths point into).")
    dropped: Counter[str] = Counter()
    rows = []
    for i, r in enumerate(meta.to_dict("records")):
        if i not in split_of:
            dropped["case in no official split index"] += 1
            continue
        path = image_root / str(r["derm"]).strip()
        rows.append(
            Row(
                f"derm7pt_{int(r['case_num']):04d}",
                path if path.is_file() else None,
                r["diagnosis"],
                sex=r.get("sex"),
                site=r.get("location", ""),
                split=split_of[i],
            )
        )
    return Spec(
        name="derm7pt (seven-point checklist dermatology dataset)",
        citation=(
            "Kawahara J., Daneshvar S., Argenziano G., Hamarneh G. Seven-point checklist and skin "
            "lesion classification using multitask multimodal neural nets. IEEE J Biomed Health "
            "Inform 23(2):538-546 (2019). doi:10.1109/JBHI.2018.2824327"
        ),
        licence="research use under the derm7pt terms of use (derm.cs.sfu.ca)",
        rows=rows,
        inputs=inputs,
        **_label_maps(DERM7PT_DIAGNOSES),
        site=dict_map(DERM7PT_SITES),
        known_site=_known(DERM7PT_SITES),
        notes=[
            "the dermoscopic image (column derm) of each case; the clinical photo is not used",
            "derm7pt gives no age and one lesion per case (lesion_id = image_id)",
        ],
        dropped=dropped,
    )


# --- PH2 --------------------------------------------------------------------------------------

PH2_CLASSES = {
    "common nevus": ("cn", "Common nevus", False, "nv"),
    "atypical nevus": ("an", "Atypical nevus", False, "nv"),
    "melanoma": ("mel", "Melanoma", True, "mel"),
}
_PH2_CODES = {"0": "common nevus", "1": "atypical nevus", "2": "melanoma"}
_IMD = re.compile(r"^IMD\d+$", re.IGNORECASE)


def _ph2_txt(path: Path) -> dict[str, str]:
    """{image name: clinical diagnosis} from PH2_dataset.txt's ``||`` table."""
    lines = path.read_text(errors="replace").splitlines()
    header = next((ln for ln in lines if "||" in ln and "Name" in ln), None)
    if header is None:
        raise DataError(f"{path}: no '|| Name || ... || Clinical Diagnosis ||' header line.")
    cols = [c.strip() for c in header.split("||")]
    if "Clinical Diagnosis" not in cols:
        raise DataError(f"{path}: missing column 'Clinical Diagnosis'.")
    name_at, dx_at = cols.index("Name"), cols.index("Clinical Diagnosis")
    out = {}
    for line in lines:
        cells = [c.strip() for c in line.split("||")]
        if len(cells) > dx_at and _IMD.match(cells[name_at]):
            out[cells[name_at]] = _PH2_CODES.get(cells[dx_at], cells[dx_at])
    return out


def _xlsx_rows(path: Path) -> list[list[str]]:
    """The first worksheet of an .xlsx as rows of strings (stdlib only: zip + XML)."""
    ns = {"m": "http://schemas.openxmlformats.org/spreadsheetml/2006/main"}
    try:
        with zipfile.ZipFile(path) as zf:
            shared: list[str] = []
            if "xl/sharedStrings.xml" in zf.namelist():
                root = ElementTree.fromstring(zf.read("xl/sharedStrings.xml"))
                shared = ["".join(t.text or "" for t in si.iter(f"{{{ns['m']}}}t")) for si in root]
            sheets = sorted(n for n in zf.namelist() if n.startswith("xl/worksheets/sheet"))
            if not sheets:
                raise DataError(f"{path}: no worksheet inside.")
            sheet = ElementTree.fromstring(zf.read(sheets[0]))
    except (zipfile.BadZipFile, ElementTree.ParseError) as exc:
        raise DataError(f"{path}: not a readable .xlsx ({exc}).") from None
    rows = []
    for row in sheet.iter(f"{{{ns['m']}}}row"):
        cells: dict[int, str] = {}
        for c in row.iter(f"{{{ns['m']}}}c"):
            ref = re.match(r"([A-Z]+)", c.get("r", "A"))
            col = 0
            for ch in ref.group(1) if ref else "A":
                col = col * 26 + ord(ch) - 64
            v = c.find("m:v", ns)
            text = "".join(t.text or "" for t in c.iter(f"{{{ns['m']}}}t"))
            if c.get("t") == "s" and v is not None:
                text = shared[int(v.text or 0)]
            elif v is not None and not text:
                text = v.text or ""
            cells[col - 1] = text.strip()
        rows.append([cells.get(i, "") for i in range(max(cells, default=-1) + 1)])
    return rows


def _ph2_xlsx(path: Path) -> dict[str, str]:
    """{image name: clinical diagnosis} from PH2_dataset.xlsx (X marks under the three
    Clinical Diagnosis columns)."""
    rows = _xlsx_rows(path)
    cols: dict[str, int] = {}
    for row in rows:
        for i, cell in enumerate(row):
            if clean(cell) in PH2_CLASSES:
                cols.setdefault(clean(cell), i)
    if len(cols) < 3:
        missing = next(c for c in PH2_CLASSES if c not in cols)
        raise DataError(f"{path}: missing column {missing.title()!r} (Clinical Diagnosis).")
    out = {}
    for row in rows:
        name = next((c for c in row if _IMD.match(c)), None)
        if name is None:
            continue
        marked = [dx for dx, i in cols.items() if i < len(row) and row[i].strip()]
        out[name] = marked[0] if len(marked) == 1 else "unmarked or several"
    return out


def read_ph2(src: Path) -> Spec:
    table = find_optional(src, ["PH2_dataset.txt", "PH2_dataset.xlsx"])
    if table is None:
        raise DataError(f"{src}: missing PH2_dataset.txt (or PH2_dataset.xlsx).")
    labels = _ph2_txt(table) if table.suffix == ".txt" else _ph2_xlsx(table)
    if not labels:
        raise DataError(f"{table}: no IMDxxx rows found.")
    folder = next(
        (
            table.parent / n
            for n in ("PH2 Dataset images", "PH2_Dataset_images")
            if (table.parent / n).is_dir()
        ),
        None,
    )
    if folder is None:
        raise DataError(f"{table.parent}: missing 'PH2 Dataset images/' (or PH2_Dataset_images/).")
    rows = []
    for name, label in sorted(labels.items()):
        path = folder / name / f"{name}_Dermoscopic_Image" / f"{name}.bmp"
        rows.append(Row(name, path if path.is_file() else None, label))
    return Spec(
        name="PH2 dermoscopic image database",
        citation=(
            "Mendonça T., Ferreira P. M., Marques J. S., Marçal A. R. S., Rozeira J. PH2 - a "
            "dermoscopic image database for research and benchmarking. 35th IEEE EMBC, 2013."
        ),
        licence="research and education use under the PH2 terms (fc.up.pt/addi)",
        rows=rows,
        inputs=[table],
        **_label_maps(PH2_CLASSES),
        site=lambda raw: None,
        known_site=lambda raw: False,
        notes=[
            "the clinical diagnosis (common / atypical nevus, melanoma); BMP converted to PNG",
            "PH2 gives no age, sex, site or lesion ids (one image per lesion)",
        ],
    )


# --- PAD-UFES-20 ------------------------------------------------------------------------------

PAD_CLASSES = {
    "ACK": ("ack", "Actinic keratosis", True, "akiec"),
    "BCC": ("bcc", "Basal cell carcinoma", True, "bcc"),
    "MEL": ("mel", "Melanoma", True, "mel"),
    "NEV": ("nev", "Nevus", False, "nv"),
    "SCC": ("scc", "Squamous cell carcinoma (incl. Bowen's disease)", True, None),
    "SEK": ("sek", "Seborrheic keratosis", False, "bkl"),
}
PAD_SITES: dict[str, str | None] = {
    "ABDOMEN": "abdomen",
    "ARM": "upper extremity",
    "BACK": "back",
    "CHEST": "chest",
    "EAR": "ear",
    "FACE": "face",
    "FOOT": "foot",
    "FOREARM": "upper extremity",
    "HAND": "hand",
    "LIP": "face",
    "NECK": "neck",
    "NOSE": "face",
    "SCALP": "scalp",
    "THIGH": "lower extremity",
}


def read_pad_ufes_20(src: Path) -> Spec:
    meta_path = find_file(src, ["metadata.csv"], "PAD-UFES-20 metadata.csv")
    meta = read_csv(meta_path, ("patient_id", "lesion_id", "img_id", "diagnostic"))
    images = index_images(src)
    if not images:
        raise DataError(f"{src}: no images found (expected images/ or imgs_part_1..3/ of PNGs).")
    rows = [
        Row(
            Path(r["img_id"]).stem,
            images.get(Path(r["img_id"]).stem),
            r["diagnostic"],
            lesion_id=f"{r['patient_id']}_{r['lesion_id']}",
            patient_id=r["patient_id"],
            age=r.get("age"),
            sex=r.get("gender"),
            site=r.get("region", ""),
            fitzpatrick=r.get("fitspatrick"),
        )
        for r in meta.to_dict("records")
    ]
    return Spec(
        name="PAD-UFES-20 (smartphone clinical images)",
        citation=(
            "Pacheco A. G. C. et al. PAD-UFES-20: a skin lesion dataset composed of patient data "
            "and clinical images collected from smartphones. Data in Brief 32:106221 (2020). "
            "doi:10.17632/zr7vgbcyr2.1"
        ),
        licence="CC BY 4.0",
        rows=rows,
        inputs=[meta_path],
        **_label_maps(PAD_CLASSES),
        site=dict_map(PAD_SITES),
        known_site=_known(PAD_SITES),
        modality="clinical",
        notes=[
            "CLINICAL smartphone photographs, not dermoscopy: the model was trained on dermoscopic "
            "images, its unreliable-input check should flag many of these, and figures on this "
            "set measure a change of modality as well as of clinic",
            "SCC (with Bowen's disease folded in) has no HAM10000 class: HAM10000's akiec covers "
            "only intraepithelial carcinoma; --classes native keeps it",
            "lesion_id is patient_id + lesion_id (PAD's lesion ids repeat across patients)",
        ],
    )
