"""The canonical dataset folder every importer writes, and the one writer they share.

A canonical folder is a HAM10000-format folder (:mod:`data_pipeline.ham10000` reads it unchanged)::

    DIR/HAM10000_metadata.csv   lesion_id, image_id, dx, dx_type, age, sex, localization
                                [+ patient_id] [+ split] + source_label [+ fitzpatrick]
    DIR/images/<image_id>.<jpg|jpeg|png>
    DIR/dataset.json            name, citation, licence, source format, modality, class set,
                                label and site mappings applied, counts per class and split,
                                what was dropped and why, SHA-256 of every input file

An importer only *reads* a publisher's layout into :class:`Spec` (rows with the publisher's own
strings); mapping labels and sites onto HAM10000's vocabulary (or onto the publisher's native
classes), counting what is dropped, copying images and writing the folder happen here, once, so
every format is mapped, reported and refused the same way. The folder is built next to ``out``
and renamed into place only when complete: an interrupted import leaves nothing half-written.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image, UnidentifiedImageError

from common.errors import DataError, DermError
from data_pipeline.ham10000 import MANIFEST_FILENAME, METADATA_FILENAME
from data_pipeline.schema import HAM7, SITES, UNKNOWN, ClassSet, Metadata

#: Class-set choices of ``scripts.import_data --classes``.
CLASS_SETS: tuple[str, ...] = ("ham7", "native")
#: Image files copied byte for byte (what :mod:`data_pipeline.ham10000` looks up).
COPY_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png")
#: Image files converted losslessly to PNG (PH2 ships BMP).
CONVERT_SUFFIXES: tuple[str, ...] = (".bmp", ".tif", ".tiff")
IMAGE_SUFFIXES = COPY_SUFFIXES + CONVERT_SUFFIXES
MANIFEST_VERSION = 1
_SAFE_ID = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class ClassInfo:
    """One class of a class set: code (the ``dx`` value), display name, and whether the app
    flags it (malignant or pre-malignant, as :data:`data_pipeline.schema.MALIGNANT`)."""

    code: str
    name: str
    malignant: bool

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "name": self.name, "malignant": self.malignant}


#: HAM10000's seven classes in the same form.
HAM7_CLASSES: tuple[ClassInfo, ...] = tuple(
    ClassInfo(c, HAM7.name(c), c in HAM7.malignant) for c in HAM7.codes
)


def short_code(text: str, taken: set[str], preferred: Mapping[str, str] | None = None) -> str:
    """A class code the class set accepts (1-8 of a-z, 0-9, _) for a native class name,
    distinct from ``taken``: ``preferred[name]`` when given and free, else the name itself when
    short enough, else its first word cut short plus the initials of the others
    (``Melanoma in situ`` → ``melan_is``, ``Melanoma invasive`` → ``melano_i``), so that
    names sharing a first word stay told apart."""
    slug = re.sub(r"[^a-z0-9]+", "_", clean(text)).strip("_") or "class"
    words = slug.split("_")
    wanted = (preferred or {}).get(clean(text), "")
    if wanted and wanted not in taken and re.fullmatch(r"[a-z0-9_]{1,8}", wanted):
        taken.add(wanted)
        return wanted
    if len(slug) <= 8 or len(words) == 1:
        code = slug[:8].rstrip("_")
    else:
        tail = "".join(w[0] for w in words[1:])[:4]
        code = f"{words[0][: 7 - len(tail)]}_{tail}"
    n = 1
    while code in taken:
        n += 1
        code = f"{slug[:5].rstrip('_')}_{n}"
    taken.add(code)
    return code


@dataclass
class Row:
    """One image as the publisher describes it (strings as published, not yet mapped)."""

    image_id: str
    image: Path | None
    label: str
    lesion_id: str = ""
    patient_id: str = ""
    age: Any = None
    sex: Any = None
    site: str = ""
    split: str = ""
    fitzpatrick: Any = None
    #: the native class code when the publisher's native class is not a function of ``label``
    native: str | None = None
    #: how the diagnosis was confirmed, as published (``diagnosis_confirm_type``); blank: the
    #: ``dx_type`` column holds the source format
    confirm_type: Any = None


#: HAM10000's ``dx_type`` words for the ISIC ``diagnosis_confirm_type`` values.
CONFIRM_TYPES: dict[str, str] = {
    "histopathology": "histo",
    "histo": "histo",
    "serial imaging showing no change": "follow_up",
    "follow up": "follow_up",
    "single image expert consensus": "consensus",
    "consensus": "consensus",
    "confocal microscopy with consensus dermoscopy": "confocal",
    "confocal": "confocal",
}


def dx_type(row: Row, source_format: str) -> str:
    """The ``dx_type`` of a row: HAM10000's word for its published confirmation type, the
    published value itself when it has none, else the source format."""
    raw = clean(row.confirm_type)
    if not raw:
        return source_format
    return CONFIRM_TYPES.get(raw, re.sub(r"[^a-z0-9]+", "_", raw).strip("_")[:32])


LabelMap = Callable[[str], str | None]


@dataclass
class Spec:
    """What an importer read: rows plus everything needed to map and describe them."""

    name: str
    citation: str
    licence: str
    rows: list[Row]
    inputs: list[Path]
    ham7: LabelMap
    native_classes: list[ClassInfo]
    native: LabelMap
    site: Callable[[str], str | None]
    #: site strings the mapping knows; anything else is counted as unmapped
    known_site: Callable[[str], bool]
    modality: str = "dermoscopy"
    notes: list[str] = field(default_factory=list)
    #: rows the reader itself had to drop, by reason (e.g. ground truth not one-hot)
    dropped: Counter[str] = field(default_factory=Counter)


def dict_map(table: Mapping[str, str | None]) -> LabelMap:
    """A label / site mapping from a table, matched case- and separator-insensitively."""
    norm = {clean(k): v for k, v in table.items()}
    return lambda value: norm.get(clean(value))


def clean(value: Any) -> str:
    """Lower-case, trimmed, ``_``/``-`` as spaces, single spaces (``''`` for blanks / NaN)."""
    if value is None or (isinstance(value, float) and value != value):
        return ""
    text = str(value).strip().lower().replace("_", " ")
    return " ".join(text.split())


def blank(value: Any) -> bool:
    return clean(value) in ("", "nan", "none", "unknown", "unk", "n/a", "na")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_csv(path: Path, required: Iterable[str] = (), what: str = "") -> pd.DataFrame:
    """A publisher CSV as strings; refuses it in one line naming the file and missing column."""
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a readable CSV ({str(exc).splitlines()[0]}).") from None
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataError(
            f"{path}: missing column {missing[0]!r}{' ' + what if what else ''} "
            f"(found: {', '.join(df.columns)})."
        )
    return df


def find_file(src: Path, names: Iterable[str], what: str, depth: int = 3) -> Path:
    """The first of ``names`` found in ``src`` or up to ``depth`` folders below it."""
    found = find_optional(src, names, depth)
    if found is None:
        names = list(names)
        raise DataError(f"{src}: no {what} found (looked for {' or '.join(names)}).")
    return found


def find_optional(src: Path, names: Iterable[str], depth: int = 3) -> Path | None:
    for name in names:
        for level in range(depth + 1):
            hits = sorted(src.glob("/".join(["*"] * level + [name])))
            hits = [h for h in hits if h.is_file() and "__MACOSX" not in h.parts]
            if hits:
                return hits[0]
    return None


def index_images(root: Path, skip: Callable[[Path], bool] = lambda p: False) -> dict[str, Path]:
    """Image stem -> file under ``root`` (any depth); the shallowest file wins a duplicate stem.

    Segmentation masks and superpixel maps that releases ship next to the images are skipped.
    """
    index: dict[str, Path] = {}
    paths = sorted(
        (p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
        key=lambda p: (len(p.parts), str(p)),
    )
    for path in paths:
        stem = path.stem
        if (
            "__MACOSX" in path.parts
            or stem.startswith(".")
            or stem.endswith(("_superpixels", "_segmentation", "_lesion", "_mask"))
            or skip(path)
        ):
            continue
        index.setdefault(stem, path)
    return index


def normalise_split(value: Any) -> str:
    token = clean(value)
    aliases = {"training": "train", "valid": "val", "validation": "val", "testing": "test"}
    token = aliases.get(token, token)
    if token and token not in ("train", "val", "test"):
        raise DataError(f"Unknown split value {value!r}: expected train, val or test.")
    return token


# --- mapping and writing --------------------------------------------------------------------


@dataclass
class Mapped:
    """The canonical table and what mapping it took."""

    table: pd.DataFrame
    classes: list[ClassInfo]
    label_mapping: dict[str, str | None]
    label_counts: Counter[str]
    site_mapping: dict[str, str]
    unmapped_sites: Counter[str]
    dropped: Counter[str]
    unknown_fields: Counter[str]
    sources: dict[str, Path]


def map_rows(spec: Spec, class_set: str, source_format: str) -> Mapped:
    """Apply the label / site mapping to every row; count every exclusion by its reason."""
    if class_set not in CLASS_SETS:
        raise DataError(f"Unknown class set {class_set!r}: use {' or '.join(CLASS_SETS)}.")
    classes = list(HAM7_CLASSES) if class_set == "ham7" else list(spec.native_classes)
    codes = {c.code for c in classes}
    to_class = spec.ham7 if class_set == "ham7" else spec.native
    dropped: Counter[str] = Counter(spec.dropped)
    unknown_fields: Counter[str] = Counter()
    label_mapping: dict[str, str | None] = {}
    label_counts: Counter[str] = Counter()
    site_mapping: dict[str, str] = {}
    unmapped: Counter[str] = Counter()
    records, sources = [], {}
    for row in spec.rows:
        label = str(row.label).strip()
        label_counts[label] += 1
        if class_set == "native" and row.native is not None:
            code: str | None = row.native or None
        else:
            code = to_class(label)
        label_mapping.setdefault(label, code)
        if code is None:
            dropped[f"label {label!r}: no {class_set} class (excluded)"] += 1
            continue
        if code not in codes:
            raise DataError(f"internal: label {label!r} mapped to {code!r}, not in the class set.")
        if row.image is None:
            dropped["image file not found"] += 1
            continue
        image_id = _SAFE_ID.sub("_", row.image_id.strip())
        if image_id in sources:
            dropped["image id listed twice (second row dropped)"] += 1
            continue
        site = _map_site(spec, row.site, site_mapping, unmapped)
        meta = _metadata(row, unknown_fields)
        sources[image_id] = row.image
        records.append(
            {
                "lesion_id": (row.lesion_id or "").strip() or image_id,
                "image_id": image_id,
                "dx": code,
                "dx_type": dx_type(row, source_format),
                "age": meta.age,
                "sex": meta.sex,
                "localization": site,
                "patient_id": (row.patient_id or "").strip(),
                "split": normalise_split(row.split),
                "source_label": label,
                "fitzpatrick": _fitzpatrick(row.fitzpatrick),
            }
        )
    if not records:
        raise DataError(
            f"{spec.name}: no image left to import"
            + (f" ({_top_reason(dropped)})" if dropped else "")
            + "."
        )
    table = pd.DataFrame.from_records(records)
    splits = set(table["split"])
    if "" in splits and len(splits) > 1:
        raise DataError(f"{spec.name}: some rows have an official split and others none.")
    if splits == {""}:
        table = table.drop(columns="split")
    if not (table["patient_id"] != "").any():
        table = table.drop(columns="patient_id")
    if table["fitzpatrick"].isna().all():
        table = table.drop(columns="fitzpatrick")
    present = set(table["dx"])
    classes = [c for c in classes if class_set == "ham7" or c.code in present]
    try:
        ClassSet.from_entries([c.to_dict() for c in classes])
    except DermError as exc:
        raise DataError(f"{spec.name}: the {class_set} class set is not usable ({exc})") from None
    return Mapped(
        table,
        classes,
        label_mapping,
        label_counts,
        site_mapping,
        unmapped,
        dropped,
        unknown_fields,
        sources,
    )


def _top_reason(dropped: Counter[str]) -> str:
    reason, n = dropped.most_common(1)[0]
    return f"{sum(dropped.values())} dropped, most for: {reason} ×{n}"


def _map_site(spec: Spec, raw: str, seen: dict[str, str], unmapped: Counter[str]) -> str:
    if blank(raw):
        return UNKNOWN
    key = str(raw).strip()
    if key not in seen:
        site = spec.site(key) if spec.known_site(key) else None
        seen[key] = site if site in SITES else UNKNOWN
    if not spec.known_site(key):
        unmapped[key] += 1
    return seen[key]


def _metadata(row: Row, unknown_fields: Counter[str]) -> Metadata:
    """Age and sex validated by the schema; an unusable value becomes unknown and is counted."""
    age = None if blank(row.age) else row.age
    try:
        age_value = Metadata.parse(age=age).age
    except DermError:
        unknown_fields[f"age {str(row.age)[:20]!r}"] += 1
        age_value = None
    sex = None if blank(row.sex) else row.sex
    try:
        sex_value = Metadata.parse(sex=sex).sex
    except DermError:
        unknown_fields[f"sex {str(row.sex)[:20]!r}"] += 1
        sex_value = UNKNOWN
    return Metadata(age_value, sex_value)


def _fitzpatrick(value: Any) -> int | None:
    """Fitzpatrick skin type 1-6 when the publisher records it (``I``-``VI`` or digits)."""
    token = clean(value).upper().removeprefix("TYPE ").strip()
    roman = {"I": 1, "II": 2, "III": 3, "IV": 4, "V": 5, "VI": 6}
    if token in roman:
        return roman[token]
    try:
        n = int(float(token))
    except ValueError:
        return None
    return n if 1 <= n <= 6 else None


def check_out(out: Path | str) -> Path:
    """Refuse an ``--out`` that exists and is not an empty folder (nothing is overwritten)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out} already exists and is not empty; choose a new --out folder.")
    return out


def write_dataset(
    spec: Spec,
    out: Path,
    source_format: str,
    class_set: str = "ham7",
    command: str = "",
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Map ``spec`` and write the canonical folder ``out`` atomically; returns the manifest."""
    out = check_out(out)
    mapped = map_rows(spec, class_set, source_format)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.importing-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        (tmp / "images").mkdir(parents=True)
        copied, converted, digests = _write_images(mapped, tmp / "images", echo)
        table = mapped.table
        ext = {image_id: name.rsplit(".", 1)[1] for image_id, name in copied.items()}
        table = table[table["image_id"].isin(ext)]
        if table.empty:
            raise DataError(f"{spec.name}: no image could be read.")
        table.to_csv(tmp / METADATA_FILENAME, index=False)
        manifest = _manifest(spec, mapped, table, source_format, class_set, command)
        manifest["images"] = {
            "n": len(table),
            "copied": len(table) - converted,
            "converted_to_png": converted,
            "sha256_of_sources": hashlib.sha256(
                "".join(f"{k} {digests[k]}\n" for k in sorted(digests)).encode()
            ).hexdigest(),
        }
        (tmp / MANIFEST_FILENAME).write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report(manifest, echo)
    return manifest


def _write_images(
    mapped: Mapped, folder: Path, echo: Callable[[str], None]
) -> tuple[dict[str, str], int, dict[str, str]]:
    """Copy (JPEG / PNG) or losslessly convert (BMP / TIFF → PNG) every source image."""
    written: dict[str, str] = {}
    digests: dict[str, str] = {}
    converted = 0
    n = len(mapped.sources)
    for i, (image_id, src) in enumerate(mapped.sources.items(), 1):
        data = src.read_bytes()
        digests[image_id] = hashlib.sha256(data).hexdigest()
        suffix = src.suffix.lower()
        if suffix in COPY_SUFFIXES:
            name = f"{image_id}{suffix}"
            (folder / name).write_bytes(data)
        else:
            name = f"{image_id}.png"
            try:
                with Image.open(src) as img:
                    img.save(folder / name, format="PNG")
            except (UnidentifiedImageError, OSError) as exc:
                raise DataError(f"{src}: cannot convert to PNG ({exc}).") from None
            converted += 1
        written[image_id] = name
        if n >= 2000 and i % 2000 == 0:
            echo(f"  images: {i}/{n}")
    return written, converted, digests


def _manifest(
    spec: Spec,
    mapped: Mapped,
    table: pd.DataFrame,
    source_format: str,
    class_set: str,
    command: str,
) -> dict[str, Any]:
    by_class = {c.code: int((table["dx"] == c.code).sum()) for c in mapped.classes}
    manifest: dict[str, Any] = {
        "manifest_version": MANIFEST_VERSION,
        "name": spec.name,
        "citation": spec.citation,
        "licence": spec.licence,
        "source_format": source_format,
        "modality": spec.modality,
        "class_set": class_set,
        "classes": [c.to_dict() for c in mapped.classes],
        "label_mapping": dict(sorted(mapped.label_mapping.items())),
        "source_label_counts": dict(sorted(mapped.label_counts.items())),
        "site_mapping": dict(sorted(mapped.site_mapping.items())),
        "unmapped_sites": dict(sorted(mapped.unmapped_sites.items())),
        "counts": {"total": len(table), "by_class": by_class},
        "dropped": {
            "total": int(sum(mapped.dropped.values())),
            "reasons": dict(mapped.dropped.most_common()),
        },
        "set_unknown": dict(mapped.unknown_fields.most_common()),
        "official_split": "split" in table.columns,
        "columns": list(table.columns),
        "inputs": [
            {"path": str(p), "bytes": p.stat().st_size, "sha256": file_sha256(p)}
            for p in spec.inputs
        ],
        "notes": list(spec.notes),
        "command": command,
    }
    if "split" in table.columns:
        manifest["counts"]["by_split"] = {
            s: {
                "total": int((table["split"] == s).sum()),
                **{c: int(((table["split"] == s) & (table["dx"] == c)).sum()) for c in by_class},
            }
            for s in ("train", "val", "test")
        }
    return manifest


def report(manifest: dict[str, Any], echo: Callable[[str], None] = print) -> None:
    """Print what the import mapped, dropped and wrote (the same facts as dataset.json)."""
    echo(f"{manifest['name']} ({manifest['source_format']}, {manifest['modality']})")
    for note in manifest["notes"]:
        echo(f"  note: {note}")
    echo(f"label mapping ({manifest['class_set']}):")
    counts = manifest["source_label_counts"]
    for label, code in manifest["label_mapping"].items():
        echo(f"  {label!r:40s} -> {code or 'excluded'}  (n={counts.get(label, 0)})")
    if manifest["site_mapping"]:
        echo("site mapping:")
        for raw, site in manifest["site_mapping"].items():
            flag = "  (unmapped)" if raw in manifest["unmapped_sites"] else ""
            echo(f"  {raw!r:40s} -> {site}{flag}")
    dropped = manifest["dropped"]
    if dropped["reasons"]:
        echo(f"dropped {dropped['total']} row(s):")
        for reason, n in dropped["reasons"].items():
            echo(f"  {n:6d}  {reason}")
        missing = dropped["reasons"].get("image file not found", 0)
        if missing:
            echo(
                f"warning: {missing} listed image(s) were not found: is part of the download "
                "missing (an unzipped images folder, e.g. one of several image parts)?"
            )
    if manifest["set_unknown"]:
        echo("values set to unknown (rows kept):")
        for value, n in manifest["set_unknown"].items():
            echo(f"  {n:6d}  {value}")
    by_class = ", ".join(f"{c} {n}" for c, n in manifest["counts"]["by_class"].items())
    echo(f"kept {manifest['counts']['total']} image(s): {by_class}")
    for split, row in manifest["counts"].get("by_split", {}).items():
        echo(f"  {split}: {row['total']}")
