"""Any CSV + image folder, described by a small JSON or YAML mapping file.

Example (``mapping.yaml``; only ``columns.image`` and ``columns.label`` are required)::

    name: My clinic, 2024 export
    citation: Dermatology department, Hospital X (internal)
    licence: internal use only
    modality: dermoscopy            # or clinical
    csv: export.csv                 # relative to SRC; default: the only CSV in SRC
    images: photos                  # folder relative to SRC; default: SRC itself (any depth)
    columns: {image: file, label: diagnosis, age: age, sex: sex, site: body_site,
              lesion: lesion_no, patient: patient_no, split: subset}
    labels: {melanoma: mel, naevus: nv, "seb. keratosis": bkl, scar: null}
    sites: {"left forearm": upper extremity, "back": back}
    classes:                        # the class set kept by --classes native (optional)
      - {code: mel, name: Melanoma, malignant: true}
      - {code: nv, name: Nevus, malignant: false}

With ``--classes ham7`` a label is mapped by ``labels`` (``null`` excludes it) or kept when it
already is a HAM10000 code; anything else is excluded and counted. With ``--classes native``
the labels map to ``classes`` codes (default: every distinct label value becomes a class).
A site is mapped by ``sites`` or kept when it already is a HAM10000 site, else it becomes
``unknown`` and is counted as unmapped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml  # type: ignore[import-untyped]

from common.errors import DataError
from data_pipeline.importers.core import (
    ClassInfo,
    Row,
    Spec,
    blank,
    clean,
    index_images,
    read_csv,
    short_code,
)
from data_pipeline.schema import CLASSES, SITES

COLUMN_KEYS = ("image", "label", "age", "sex", "site", "lesion", "patient", "split")


def read_mapping(path: Path | None) -> dict[str, Any]:
    if path is None:
        raise DataError("--format csv needs --mapping FILE (JSON or YAML; see the guide).")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Mapping file {path} does not exist.")
    text = path.read_text(errors="replace")
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise DataError(f"{path}: not valid {path.suffix.lstrip('.') or 'YAML'} ({exc}).") from None
    if not isinstance(data, dict) or not isinstance(data.get("columns"), dict):
        raise DataError(f"{path}: missing 'columns' (a mapping with at least image and label).")
    for key in ("image", "label"):
        if not data["columns"].get(key):
            raise DataError(f"{path}: missing columns.{key} (the CSV column holding the {key}).")
    unknown = [k for k in data["columns"] if k not in COLUMN_KEYS]
    if unknown:
        raise DataError(f"{path}: unknown key columns.{unknown[0]} (use {', '.join(COLUMN_KEYS)}).")
    return data


def read_csv_mapped(src: Path, mapping_path: Path | None) -> Spec:
    mapping = read_mapping(mapping_path)
    assert mapping_path is not None
    cols: dict[str, str] = mapping["columns"]
    if mapping.get("csv"):
        csv_path = (
            (src / mapping["csv"])
            if not Path(mapping["csv"]).is_absolute()
            else Path(mapping["csv"])
        )
        if not csv_path.is_file():
            raise DataError(f"{csv_path}: the CSV named in the mapping file does not exist.")
    else:
        csvs = sorted(src.glob("*.csv"))
        if len(csvs) != 1:
            raise DataError(
                f"{src}: {'no CSV' if not csvs else 'several CSVs'} found; name it with 'csv:' "
                "in the mapping file."
            )
        csv_path = csvs[0]
    df = read_csv(csv_path, [c for c in cols.values() if c], "(named in the mapping file)")
    image_root = src / mapping["images"] if mapping.get("images") else src
    if not image_root.is_dir():
        raise DataError(f"{image_root}: the image folder named in the mapping file is missing.")
    images = index_images(image_root)
    by_path = {str(p.relative_to(image_root)): p for p in images.values()}
    rows = []
    for r in df.to_dict("records"):
        ref = str(r[cols["image"]]).strip()
        path = by_path.get(ref) or images.get(Path(ref).stem)
        rows.append(
            Row(
                Path(ref).stem,
                path,
                r[cols["label"]],
                lesion_id=r.get(cols.get("lesion") or "", ""),
                patient_id=r.get(cols.get("patient") or "", ""),
                age=r.get(cols.get("age") or ""),
                sex=r.get(cols.get("sex") or ""),
                site=r.get(cols.get("site") or "", ""),
                split=r.get(cols.get("split") or "", ""),
            )
        )
    labels = {clean(k): v for k, v in (mapping.get("labels") or {}).items()}
    sites = {clean(k): v for k, v in (mapping.get("sites") or {}).items()}
    for value in sites.values():
        if value is not None and value not in SITES:
            raise DataError(
                f"{mapping_path}: site {value!r} is not a HAM10000 site ({', '.join(SITES)})."
            )

    def ham7(label: str) -> str | None:
        key = clean(label)
        if key in labels:
            code = labels[key]
            if code is not None and code not in CLASSES:
                raise DataError(
                    f"{mapping_path}: label {label!r} maps to {code!r}, not a HAM10000 class "
                    f"({', '.join(CLASSES)}); use --classes native for another class set."
                )
            return code
        return key if key in CLASSES else None

    declared = [
        ClassInfo(str(c["code"]), str(c.get("name", c["code"])), bool(c.get("malignant", False)))
        for c in mapping.get("classes") or []
    ]
    by_value: dict[str, str] = {}
    if not declared:
        taken: set[str] = set()
        values = sorted({str(labels.get(clean(r.label), r.label) or "") for r in rows} - {""})
        for v in values:
            if not blank(v):
                by_value[clean(v)] = short_code(v, taken)
        declared = [ClassInfo(by_value[clean(v)], v, False) for v in values if clean(v) in by_value]
    codes = {c.code for c in declared}

    def native(label: str) -> str | None:
        key = clean(label)
        value = labels.get(key, label) if key in labels else label
        if value is None or blank(value):
            return None
        code = str(value) if str(value) in codes else by_value.get(clean(str(value)))
        return code if code in codes else None

    def site(raw: str) -> str | None:
        key = clean(raw)
        return sites.get(key, key if key in SITES else None)

    def known(raw: str) -> bool:
        key = clean(raw)
        return key in sites or key in SITES

    notes = [f"columns: {json.dumps(cols)}"]
    if not mapping.get("classes"):
        notes.append("for --classes native: no 'classes' in the mapping, so the label values are")
        notes[-1] += " the classes and none is marked malignant"
    return Spec(
        name=str(mapping.get("name") or src.name),
        citation=str(mapping.get("citation") or ""),
        licence=str(mapping.get("licence") or mapping.get("license") or ""),
        rows=rows,
        inputs=[csv_path, Path(mapping_path)],
        ham7=ham7,
        native_classes=declared,
        native=native,
        site=site,
        known_site=known,
        modality=str(mapping.get("modality") or "dermoscopy"),
        notes=notes,
    )
