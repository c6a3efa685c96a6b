"""Importers: a tiny synthetic fixture of every publisher layout → the canonical folder, its
dataset.json, the one-line refusals, no half-written folder, and the folder read back by
load_metadata / load_sources / scripts.evaluate."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from common.errors import DataError
from data_pipeline import splits as splits_module
from data_pipeline.ham10000 import load_metadata
from data_pipeline.importers import import_dataset
from data_pipeline.sources import load_sources
from data_pipeline.splits import (
    DEFAULT_SPLITS,
    lesions_crossing_splits,
    load_splits,
    save_splits,
    split_groups,
)

HAM_COLUMNS = ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"]


def img(path: Path, seed: int = 0, fmt: str | None = None) -> Path:
    """A 40×36 noise image (the loaders need at least 32 px a side)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (36, 40, 3), dtype=np.uint8)).save(path, format=fmt)
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run(src: Path, fmt: str, out: Path, **kw) -> tuple[dict, pd.DataFrame]:
    lines: list[str] = []
    manifest = import_dataset(src, fmt, out, echo=lines.append, **kw)
    assert json.loads((out / "dataset.json").read_text()) == manifest
    assert any("label mapping" in line for line in lines)  # the mapping is printed
    df = pd.read_csv(out / "HAM10000_metadata.csv", dtype=str, keep_default_na=False)
    assert list(df.columns[:7]) == HAM_COLUMNS and "source_label" in df.columns
    for image_id in df["image_id"]:
        assert len(list((out / "images").glob(f"{image_id}.*"))) == 1
    load_metadata(out)  # the rest of the project reads it
    return manifest, df


# --- fixtures of each layout ----------------------------------------------------------------


def isic2017(root: Path) -> Path:
    gt = {"Training": [("ISIC_0000001", 1, 0), ("ISIC_0000002", 0, 1), ("ISIC_0000003", 0, 0)]}
    gt["Validation"] = [("ISIC_0000010", 0, 0), ("ISIC_0000011", 1, 0)]
    for part, rows in gt.items():
        write_csv(
            root / f"ISIC-2017_{part}_Part3_GroundTruth.csv",
            [
                {"image_id": i, "melanoma": float(m), "seborrheic_keratosis": float(s)}
                for i, m, s in rows
            ],
        )
        write_csv(
            root / f"ISIC-2017_{part}_Data" / f"ISIC-2017_{part}_Data_metadata.csv",
            [
                {"image_id": i, "age_approximate": "unknown" if k else 55, "sex": "female"}
                for k, (i, _, _) in enumerate(rows)
            ],
        )
        for k, (i, _, _) in enumerate(rows):
            img(root / f"ISIC-2017_{part}_Data" / f"{i}.jpg", k, "JPEG")
            img(root / f"ISIC-2017_{part}_Data" / f"{i}_superpixels.png", k)
    return root


def test_isic2017_official_parts_become_the_split(tmp_path):
    src = isic2017(tmp_path / "src")
    manifest, df = run(src, "isic2017", tmp_path / "out")
    assert dict(zip(df["image_id"], df["dx"], strict=True)) == {
        "ISIC_0000001": "mel",
        "ISIC_0000002": "bkl",
        "ISIC_0000003": "nv",
        "ISIC_0000010": "nv",
        "ISIC_0000011": "mel",
    }
    assert set(df["split"]) == {"train", "val"}
    assert manifest["counts"]["by_split"]["val"]["total"] == 2
    assert (df["lesion_id"] == df["image_id"]).all()
    assert df.loc[df["image_id"] == "ISIC_0000002", "age"].item() == ""  # 'unknown' → blank
    gt = src / "ISIC-2017_Training_Part3_GroundTruth.csv"
    assert {"path": str(gt), "bytes": gt.stat().st_size, "sha256": sha(gt)} in manifest["inputs"]


def test_isic2018_one_hot_and_lesion_groupings(tmp_path):
    src = tmp_path / "src"
    cols = ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
    rows = [("ISIC_0024306", "NV"), ("ISIC_0024307", "AKIEC"), ("ISIC_0024308", "VASC")]
    records = [{"image": i, **{c: float(c == d) for c in cols}} for i, d in rows]
    records.append({"image": "ISIC_0024309", **{c: 0.0 for c in cols}})  # not one-hot
    write_csv(
        src / "ISIC2018_Task3_Training_GroundTruth" / "ISIC2018_Task3_Training_GroundTruth.csv",
        records,
    )
    write_csv(
        src / "ISIC2018_Task3_Training_LesionGroupings.csv",
        [
            {"image": i, "lesion_id": "HAM_1", "diagnosis_confirm_type": "histopathology"}
            for i, _ in rows
        ],
    )
    for k, (i, _) in enumerate([*rows, ("ISIC_0024309", "")]):
        img(src / "ISIC2018_Task3_Training_Input" / f"{i}.jpg", k, "JPEG")
    manifest, df = run(src, "isic2018", tmp_path / "out")
    assert list(df["dx"]) == ["nv", "akiec", "vasc"] and set(df["lesion_id"]) == {"HAM_1"}
    assert set(df["dx_type"]) == {"histo"}  # diagnosis_confirm_type, in HAM10000's words
    assert "split" not in df.columns  # one part only: no official split to keep
    assert any("only the Training part" in n for n in manifest["notes"])
    assert manifest["dropped"]["total"] == 1
    assert "not one-hot" in next(iter(manifest["dropped"]["reasons"]))


def isic2019(root: Path) -> Path:
    cols = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]
    rows = [
        ("ISIC_0000001", "MEL"),
        ("ISIC_0000002", "SCC"),
        ("ISIC_0000003", "AK"),
        ("ISIC_0000004", "NV"),
    ]
    write_csv(
        root / "ISIC_2019_Training_GroundTruth.csv",
        [{"image": i, **{c: float(c == d) for c in cols}} for i, d in rows],
    )
    sites = ["posterior torso", "palms/soles", "head/neck", "nail"]
    write_csv(
        root / "ISIC_2019_Training_Metadata.csv",
        [
            {
                "image": i,
                "age_approx": 40 + k,
                "anatom_site_general": sites[k],
                "lesion_id": f"L{k // 2}",
                "sex": "male",
            }
            for k, (i, _) in enumerate(rows)
        ],
    )
    for k, (i, _) in enumerate(rows):
        # some of the release's MSK images carry this suffix on disk
        name = f"{i}_downsampled" if k == 3 else i
        img(root / "ISIC_2019_Training_Input" / f"{name}.jpg", k, "JPEG")
    return root


def test_isic2019_ham7_drops_scc_and_maps_sites(tmp_path):
    manifest, df = run(isic2019(tmp_path / "src"), "isic2019", tmp_path / "out")
    assert list(df["dx"]) == ["mel", "akiec", "nv"]
    assert manifest["label_mapping"]["SCC"] is None
    assert manifest["dropped"]["reasons"] == {"label 'SCC': no ham7 class (excluded)": 1}
    assert list(df["localization"]) == ["back", "unknown", "unknown"]
    assert manifest["site_mapping"]["posterior torso"] == "back"
    assert manifest["site_mapping"]["head/neck"] == "unknown"  # spans face/scalp/ear/neck
    assert manifest["unmapped_sites"] == {"nail": 1}
    assert manifest["counts"]["by_class"]["mel"] == 1 and manifest["counts"]["total"] == 3


def test_isic2019_native_keeps_scc(tmp_path):
    manifest, df = run(isic2019(tmp_path / "src"), "isic2019", tmp_path / "out", classes="native")
    assert list(df["dx"]) == ["mel", "scc", "ak", "nv"]
    codes = {c["code"]: c["malignant"] for c in manifest["classes"]}
    assert codes == {"mel": True, "nv": False, "ak": True, "scc": True}
    assert load_metadata(tmp_path / "out")["label"].tolist() == [0, 3, 2, 1]


def test_isic2020_patients_and_native_target(tmp_path):
    src = tmp_path / "src"
    rows = [
        ("ISIC_1", "IP_1", "nevus", 0, "torso"),
        ("ISIC_2", "IP_1", "melanoma", 1, "lower extremity"),
        ("ISIC_3", "IP_2", "unknown", 0, ""),
        ("ISIC_4", "IP_3", "cafe-au-lait macule", 0, "oral/genital"),
    ]
    write_csv(
        src / "train.csv",
        [
            {
                "image_name": i,
                "patient_id": p,
                "sex": "female",
                "age_approx": 50,
                "anatom_site_general_challenge": s,
                "diagnosis": d,
                "benign_malignant": "malignant" if t else "benign",
                "target": t,
            }
            for i, p, d, t, s in rows
        ],
    )
    for k, row in enumerate(rows):
        img(src / "jpeg" / "train" / f"{row[0]}.jpg", k, "JPEG")
    manifest, df = run(src, "isic2020", tmp_path / "ham7")
    assert list(df["dx"]) == ["nv", "mel"] and list(df["patient_id"]) == ["IP_1", "IP_1"]
    assert manifest["dropped"]["total"] == 2
    manifest, df = run(src, "isic2020", tmp_path / "native", classes="native")
    assert list(df["dx"]) == ["other", "mel", "other", "other"]
    assert list(df["source_label"]) == [r[2] for r in rows]


def test_isic_archive_old_and_hierarchical_columns(tmp_path):
    old = tmp_path / "old"
    write_csv(
        old / "metadata.csv",
        [
            {
                "isic_id": "ISIC_A1",
                "diagnosis": "basal cell carcinoma",
                "anatom_site_general": "anterior torso",
                "age_approx": 70,
                "sex": "male",
                "lesion_id": "IL_1",
                "patient_id": "IP_9",
                "copyright_license": "CC-BY",
            },
            {
                "isic_id": "ISIC_A2",
                "diagnosis": "scar",
                "anatom_site_general": "",
                "age_approx": "",
                "sex": "",
                "lesion_id": "",
                "patient_id": "",
                "copyright_license": "CC-BY",
            },
        ],
    )
    for k in (1, 2):
        img(old / f"ISIC_A{k}.jpg", k, "JPEG")
    manifest, df = run(old, "isic-archive", tmp_path / "old_out")
    assert list(df["dx"]) == ["bcc"] and list(df["localization"]) == ["trunk"]
    assert manifest["licence"] == "CC-BY (2 images)"
    assert list(df["patient_id"]) == ["IP_9"]
    new = tmp_path / "new"
    mel = ("Malignant", "Malignant melanocytic proliferations (Melanoma)", "Melanoma in situ")
    seb = ("Benign", "Benign epidermal proliferations", "Seborrheic keratosis")
    cyst = ("Benign", "Cysts", "")
    rows = [
        ("ISIC_B1", mel, ("Head and neck", "Head", "Face")),
        ("ISIC_B2", seb, ("Trunk", "Posterior trunk", "Upper back")),
        ("ISIC_B3", cyst, ("Lower extremity", "Buttock", "")),
        # a hierarchical site with no mapping: the row's general site is used instead
        ("ISIC_B4", seb, ("Torso of sorts", "", "")),
    ]
    write_csv(
        new / "metadata.csv",
        [
            {
                "isic_id": i,
                **{f"diagnosis_{n + 1}": v for n, v in enumerate(d)},
                **{f"anatom_site_{n + 1}": v for n, v in enumerate(s)},
                "anatom_site_general": "posterior torso" if i == "ISIC_B4" else "",
                "image_type": "dermoscopic",
            }
            for i, d, s in rows
        ],
    )
    for k, (i, _, _) in enumerate(rows):
        img(new / f"{i}.jpg", k, "JPEG")
    manifest, df = run(new, "isic-archive", tmp_path / "new_out")
    assert list(df["dx"]) == ["mel", "bkl", "bkl"]
    assert list(df["localization"]) == ["face", "back", "back"]
    assert df["source_label"].iloc[0] == "::".join(mel)
    manifest, df = run(new, "isic-archive", tmp_path / "native_out", classes="native")
    classes = {c["code"]: (c["name"], c["malignant"]) for c in manifest["classes"]}
    assert classes["mel_is"] == ("Melanoma in situ", True) and len(classes) == 3
    assert classes["sk"] == ("Seborrheic keratosis", False)


def derm7pt(root: Path) -> Path:
    rows = [
        (1, "basal cell carcinoma", "back"),
        (2, "lentigo", "posterior torso"),  # a site derm7pt does not use: unmapped
        (3, "melanosis", "abdomen"),
        (4, "melanoma (in situ)", "head neck"),
        (5, "reed or spitz nevus", "lower limbs"),
    ]
    write_csv(
        root / "meta" / "meta.csv",
        [
            {
                "case_num": n,
                "diagnosis": d,
                "location": s,
                "sex": "female",
                "clinic": f"A/c{n}.jpg",
                "derm": f"A/d{n}.jpg",
            }
            for n, d, s in rows
        ],
    )
    for name, idx in (("train", [0, 1, 2]), ("valid", [3]), ("test", [4])):
        write_csv(root / "meta" / f"{name}_indexes.csv", [{"indexes": i} for i in idx])
    for n, _, _ in rows:
        img(root / "images" / "A" / f"d{n}.jpg", n, "JPEG")
        img(root / "images" / "A" / f"c{n}.jpg", n + 10, "JPEG")
    return root


def test_derm7pt_keeps_official_split_and_records_mappings(tmp_path):
    src = derm7pt(tmp_path / "src")
    manifest, df = run(src, "derm7pt", tmp_path / "out")
    assert list(df["dx"]) == ["bcc", "bkl", "mel", "nv"]
    assert list(df["split"]) == ["train", "train", "val", "test"]
    assert manifest["label_mapping"]["lentigo"] == "bkl"
    assert manifest["label_mapping"]["melanosis"] is None
    assert manifest["dropped"]["reasons"] == {"label 'melanosis': no ham7 class (excluded)": 1}
    assert manifest["unmapped_sites"] == {"posterior torso": 1}
    # the folder the release zip unpacks into, with release_v0/ inside, is read the same way
    derm7pt(tmp_path / "download" / "release_v0")
    again, df2 = run(tmp_path / "download", "derm7pt", tmp_path / "out2")
    assert list(df2["dx"]) == list(df["dx"]) and again["counts"] == manifest["counts"]
    assert list(df["localization"]) == ["back", "unknown", "unknown", "lower extremity"]
    assert manifest["counts"]["by_split"]["train"] == {
        "total": 2,
        **{c: int(c in ("bcc", "bkl")) for c in manifest["counts"]["by_class"]},
    }
    # the dermoscopic image of each case, byte for byte
    assert sha(tmp_path / "out" / "images" / "derm7pt_0001.jpg") == sha(
        src / "images" / "A" / "d1.jpg"
    )
    assert manifest["official_split"] is True


def test_ph2_txt_native_and_bmp_converted(tmp_path):
    src = tmp_path / "PH2Dataset"
    header = "||   Name || Histological Diagnosis || Clinical Diagnosis || Asymmetry || Colors ||"
    body = [
        "|| IMD003 ||    ||  0  || 0 || 3 4 ||",
        "|| IMD009 ||    ||  1  || 0 || 3 ||",
        "|| IMD058 || Melanoma ||  2  || 2 | T || 1 ||",
    ]
    (src).mkdir(parents=True)
    (src / "PH2_dataset.txt").write_text(
        "\n".join([header, *body, "", "Legends:", "Clinical Diagnosis: 0 - Common Nevus"])
    )
    for k, name in enumerate(["IMD003", "IMD009", "IMD058"]):
        img(
            src / "PH2 Dataset images" / name / f"{name}_Dermoscopic_Image" / f"{name}.bmp",
            k,
            "BMP",
        )
        img(src / "PH2 Dataset images" / name / f"{name}_lesion" / f"{name}_lesion.bmp", k, "BMP")
    manifest, df = run(src, "ph2", tmp_path / "native", classes="native")
    assert list(df["dx"]) == ["cn", "an", "mel"]
    assert [c["code"] for c in manifest["classes"]] == ["cn", "an", "mel"]
    assert manifest["images"]["converted_to_png"] == 3
    original = np.asarray(
        Image.open(src / "PH2 Dataset images/IMD058/IMD058_Dermoscopic_Image/IMD058.bmp")
    )
    assert np.array_equal(
        np.asarray(Image.open(tmp_path / "native" / "images" / "IMD058.png")), original
    )
    _, df = run(src, "ph2", tmp_path / "ham7")
    assert list(df["dx"]) == ["nv", "nv", "mel"]


def _xlsx(path: Path, rows: list[list[str]]) -> None:
    """A minimal .xlsx (inline strings) — what PH2_dataset.xlsx holds, without openpyxl."""

    def cell(r: int, c: int, v: str) -> str:
        ref = f"{chr(65 + c)}{r + 1}"
        return f'<c r="{ref}" t="inlineStr"><is><t>{v}</t></is></c>'

    sheet = "".join(
        f'<row r="{r + 1}">' + "".join(cell(r, c, v) for c, v in enumerate(row) if v) + "</row>"
        for r, row in enumerate(rows)
    )
    ns = "http://schemas.openxmlformats.org/spreadsheetml/2006/main"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(
            "xl/worksheets/sheet1.xml",
            f'<worksheet xmlns="{ns}"><sheetData>{sheet}</sheetData></worksheet>',
        )


def test_ph2_xlsx(tmp_path):
    src = tmp_path / "PH2Dataset"
    src.mkdir()
    _xlsx(
        src / "PH2_dataset.xlsx",
        [
            ["Image Name", "Histological Diagnosis", "Clinical Diagnosis"],
            ["", "", "Common Nevus", "Atypical Nevus", "Melanoma"],
            ["IMD002", "", "X", "", ""],
            ["IMD061", "Melanoma", "", "", "X"],
        ],
    )
    for k, name in enumerate(["IMD002", "IMD061"]):
        img(
            src / "PH2_Dataset_images" / name / f"{name}_Dermoscopic_Image" / f"{name}.bmp",
            k,
            "BMP",
        )
    _, df = run(src, "ph2", tmp_path / "out")
    assert list(df["dx"]) == ["nv", "mel"]


def test_pad_ufes_20_is_clinical_and_patient_grouped(tmp_path):
    src = tmp_path / "src"
    rows = [
        ("PAT_1", 10, "PAT_1_10_111.png", "BCC", "NOSE"),
        ("PAT_1", 11, "PAT_1_11_112.png", "SCC", "FOREARM"),
        ("PAT_2", 10, "PAT_2_10_113.png", "ACK", "ELBOW"),
        ("PAT_3", 12, "PAT_3_12_114.png", "SEK", "BACK"),
    ]
    write_csv(
        src / "metadata.csv",
        [
            {
                "patient_id": p,
                "lesion_id": lesion,
                "img_id": i,
                "diagnostic": d,
                "age": 60,
                "gender": "FEMALE",
                "region": r,
                "fitspatrick": 2.0,
            }
            for p, lesion, i, d, r in rows
        ],
    )
    for k, row in enumerate(rows):
        img(src / "images" / f"imgs_part_{k % 2 + 1}" / row[2], k)
    manifest, df = run(src, "pad-ufes-20", tmp_path / "out")
    assert manifest["modality"] == "clinical" and any("CLINICAL" in n for n in manifest["notes"])
    assert list(df["dx"]) == ["bcc", "akiec", "bkl"] and list(df["localization"]) == [
        "face",
        "unknown",
        "back",
    ]
    assert list(df["lesion_id"]) == [
        "PAT_1_10",
        "PAT_2_10",
        "PAT_3_12",
    ]  # lesion ids repeat across patients
    assert list(df["sex"]) == ["female"] * 3 and list(df["fitzpatrick"]) == ["2"] * 3
    assert manifest["unmapped_sites"] == {"ELBOW": 1}


def test_csv_mapping_file(tmp_path):
    src = tmp_path / "clinic"
    write_csv(
        src / "export.csv",
        [
            {
                "file": "a.png",
                "dx": "Melanoma",
                "pat": "P1",
                "les": "L1",
                "where": "left arm",
                "yrs": 40,
                "s": "F",
            },
            {
                "file": "sub/b.jpg",
                "dx": "naevus",
                "pat": "P1",
                "les": "L2",
                "where": "back",
                "yrs": "",
                "s": "M",
            },
            {
                "file": "c.png",
                "dx": "scar",
                "pat": "P2",
                "les": "L3",
                "where": "toe",
                "yrs": 200,
                "s": "x",
            },
        ],
    )
    img(src / "photos" / "a.png", 1)
    img(src / "photos" / "sub" / "b.jpg", 2, "JPEG")
    img(src / "photos" / "c.png", 3)
    mapping = tmp_path / "map.yaml"
    mapping.write_text(
        "name: Clinic X\ncsv: export.csv\nimages: photos\n"
        "columns: {image: file, label: dx, patient: pat, lesion: les, site: where, age: yrs,"
        " sex: s}\n"
        "labels: {melanoma: mel, naevus: nv, scar: null}\nsites: {left arm: upper extremity}\n"
    )
    manifest, df = run(src, "csv", tmp_path / "out", mapping=mapping)
    assert list(df["dx"]) == ["mel", "nv"] and list(df["patient_id"]) == ["P1", "P1"]
    assert list(df["localization"]) == ["upper extremity", "back"]
    assert manifest["name"] == "Clinic X" and sha(mapping) in {
        i["sha256"] for i in manifest["inputs"]
    }
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"columns": {"image": "file"}}))
    with pytest.raises(DataError, match=r"missing columns\.label"):
        import_dataset(src, "csv", tmp_path / "bad", mapping=bad, echo=lambda s: None)


# --- refusals and atomicity ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "breaker", "message"),
    [
        (
            "derm7pt",
            lambda s: (s / "meta" / "valid_indexes.csv").unlink(),
            "missing meta/valid_indexes.csv",
        ),
        (
            "derm7pt",
            lambda s: write_csv(s / "meta" / "meta.csv", [{"case_num": 1, "diagnosis": "x"}]),
            "missing column 'derm'",
        ),
        (
            "isic2019",
            lambda s: (s / "ISIC_2019_Training_GroundTruth.csv").unlink(),
            "ISIC_2019_Training_GroundTruth.csv",
        ),
    ],
)
def test_wrong_layout_is_one_line(tmp_path, fmt, breaker, message):
    src = (derm7pt if fmt == "derm7pt" else isic2019)(tmp_path / "src")
    breaker(src)
    with pytest.raises(DataError, match=message) as err:
        import_dataset(src, fmt, tmp_path / "out", echo=lambda s: None)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_cli_refuses_existing_out_and_leaves_no_half_folder(tmp_path, monkeypatch, capsys):
    from scripts import import_data

    src = derm7pt(tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    from common.cli import run_cli

    assert run_cli(import_data.main, [str(src), "--format", "derm7pt", "--out", str(out)]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    # a failure while writing: nothing is left behind, not even the temp folder
    import data_pipeline.importers.core as core

    def boom(*a, **k):
        raise DataError("disk full")

    monkeypatch.setattr(core.pd.DataFrame, "to_csv", boom)
    with pytest.raises(DataError, match="disk full"):
        import_dataset(src, "derm7pt", tmp_path / "new", echo=lambda s: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


# --- the rest of the project reads an imported folder --------------------------------------------


def clinic(tmp_path: Path, name: str, official: bool = False) -> Path:
    """A 60-image csv import: 30 patients × 2 lesions; ``official``: a train / test split."""
    rows = []
    for k in range(60):
        p = k // 2
        label = ["mel", "nv", "bkl"][p % 3]
        rows.append({"image": f"I{k}", "label": label, "patient": f"P{p}", "lesion": f"L{k}"})
        if official:
            rows[-1]["part"] = "test" if p >= 24 else "train"
        img(tmp_path / "clinic" / f"I{k}.png", k)
    write_csv(tmp_path / "clinic" / "x.csv", rows)
    columns = {"image": "image", "label": "label", "patient": "patient", "lesion": "lesion"}
    mapping = tmp_path / "m.json"
    mapping.write_text(json.dumps({"columns": columns | ({"split": "part"} if official else {})}))
    run(tmp_path / "clinic", "csv", tmp_path / name, mapping=mapping)
    return tmp_path / name


def test_official_split_without_val_gets_a_val_part_from_train(tmp_path, monkeypatch):
    monkeypatch.setattr(splits_module, "REPO_ROOT", tmp_path / "repo")
    folder = clinic(tmp_path, "trtest", official=True)
    table, sources, _ = load_sources(folder, DEFAULT_SPLITS)
    official = load_metadata(folder).set_index("image_id")["split"]
    got = table.set_index("image_id")["split"]
    assert (got[official == "test"] == "test").all()  # the official test part is kept
    assert set(got[official == "train"]) == {"train", "val"}
    assert (table.groupby("patient_id")["split"].nunique() == 1).all()
    assert Path(sources[0].split_file).parent == tmp_path / "repo" / "splits"


def test_load_sources_uses_official_split_or_makes_grouped_one(tmp_path, monkeypatch):
    monkeypatch.setattr(splits_module, "REPO_ROOT", tmp_path / "repo")
    run(derm7pt(tmp_path / "src"), "derm7pt", tmp_path / "d7")
    table, sources, digest = load_sources(tmp_path / "d7", DEFAULT_SPLITS)
    assert list(table["split"]) == ["train", "train", "val", "test"]
    assert sources[0].split_file == str(tmp_path / "d7" / "HAM10000_metadata.csv")
    assert digest == sha(tmp_path / "d7" / "HAM10000_metadata.csv")
    # no split column: a lesion- and patient-grouped split is made once and saved
    clinic(tmp_path, "clinic_out")
    table, sources, _ = load_sources(tmp_path / "clinic_out", DEFAULT_SPLITS)
    saved = Path(sources[0].split_file)
    assert saved.parent == tmp_path / "repo" / "splits" and saved.is_file()
    assert set(table["split"]) == {"train", "val", "test"}
    assert lesions_crossing_splits(table) == []
    assert (table.groupby("patient_id")["split"].nunique() == 1).all()  # patients never straddle
    again, _, _ = load_sources(tmp_path / "clinic_out", DEFAULT_SPLITS)
    assert again["split"].equals(table["split"])


def test_split_groups_join_lesions_through_patients():
    df = pd.DataFrame({"lesion_id": ["a", "b", "c", "d"], "patient_id": ["p", "p", "", "q"]})
    groups = split_groups(df)
    assert groups[0] == groups[1] and len(set(groups)) == 3
    assert list(split_groups(df.drop(columns="patient_id"))) == ["a", "b", "c", "d"]


def test_evaluate_reads_imported_folder(tmp_path, tiny_checkpoint):
    from model.evaluate import evaluate

    run(derm7pt(tmp_path / "src"), "derm7pt", tmp_path / "d7")
    m = evaluate(tmp_path / "d7", tiny_checkpoint, bootstrap=0, batch_size=8)
    assert m["split"] == "test" and m["n"] == 1  # its own split, test part by default
    m = evaluate(tmp_path / "d7", tiny_checkpoint, split="train", bootstrap=0)
    assert m["n"] == 2
    run(isic2019(tmp_path / "src19"), "isic2019", tmp_path / "i19")
    m = evaluate(tmp_path / "i19", tiny_checkpoint, bootstrap=0)
    assert m["split"] == "all" and m["n"] == 3  # no split anywhere: scored whole
    with pytest.raises(DataError, match="--split all"):
        evaluate(tmp_path / "i19", tiny_checkpoint, split="test", bootstrap=0)


def test_inspect_data_shows_the_official_split(tmp_path):
    from scripts.inspect_data import choose_splits

    run(derm7pt(tmp_path / "src"), "derm7pt", tmp_path / "d7")
    df, source = choose_splits(load_metadata(tmp_path / "d7"), None, 42)
    assert "official split" in source and list(df["split"]) == ["train", "train", "val", "test"]


def test_an_explicit_split_file_keeps_the_official_split(tmp_path, monkeypatch):
    # --splits names where a carved val part is saved; it never re-splits an official test part
    # into training (a user keeping split files out of the repository must not leak test rows).
    monkeypatch.setattr(splits_module, "REPO_ROOT", tmp_path / "repo")
    folder = clinic(tmp_path, "trtest", official=True)
    mine = tmp_path / "elsewhere" / "split.csv"
    table, sources, _ = load_sources(folder, mine)
    official = load_metadata(folder).set_index("image_id")["split"]
    got = table.set_index("image_id")["split"]
    assert (got[official == "test"] == "test").all() and (got[official != "test"] != "test").all()
    assert Path(sources[0].split_file) == mine and mine.is_file()
    assert not (tmp_path / "repo" / "splits").exists()
    # a file that moves official test rows into training is refused, in one line
    bad = load_splits(mine).assign(split="train")
    bad.loc[bad.index[:5], "split"] = "val"
    save_splits(bad, tmp_path / "bad.csv")
    with pytest.raises(DataError, match="official test part"):
        load_sources(folder, tmp_path / "bad.csv")
    # a folder with an official val part uses its own split whatever --splits says
    run(derm7pt(tmp_path / "src"), "derm7pt", tmp_path / "d7")
    table, sources, _ = load_sources(tmp_path / "d7", tmp_path / "unused.csv")
    assert list(table["split"]) == ["train", "train", "val", "test"]
    assert not (tmp_path / "unused.csv").exists()


def test_missing_images_are_counted_and_warned_about(tmp_path):
    src = isic2019(tmp_path / "src")
    (src / "ISIC_2019_Training_Input" / "ISIC_0000001.jpg").unlink()  # a part not unzipped
    lines: list[str] = []
    manifest = import_dataset(src, "isic2019", tmp_path / "out", echo=lines.append)
    assert manifest["dropped"]["reasons"]["image file not found"] == 1
    assert any(line.startswith("warning: 1 listed image(s) were not found") for line in lines)
