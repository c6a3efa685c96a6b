"""Data pipeline: schema encoding, CSV/layout loading and validation, splits, transforms."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from common.errors import DataError, ImageError, MetadataError
from data_pipeline.dataset import (
    LesionDataset,
    class_counts,
    expected_class_share,
    make_weighted_sampler,
)
from data_pipeline.ham10000 import load_metadata, verify_images
from data_pipeline.images import load_rgb
from data_pipeline.schema import (
    CLASSES,
    FIELD_SLICES,
    META_DIM,
    SEXES,
    SITES,
    UNKNOWN_VECTOR,
    Metadata,
    blank_fields,
)
from data_pipeline.splits import (
    attach_splits,
    lesions_crossing_splits,
    load_or_make_splits,
    load_splits,
    make_splits,
    save_splits,
)
from data_pipeline.transforms import ImageTransform, Preprocessing, crop_to_aspect
from tests.conftest import write_synthetic_ham

# --- schema -------------------------------------------------------------------------------


def test_vocabulary_sizes():
    assert len(CLASSES) == 7
    assert len(SITES) == 15 and SITES[-1] == "unknown"
    assert SEXES == ("female", "male", "unknown")
    assert META_DIM == 2 + 3 + 15


def test_metadata_encoding_layout():
    vec = Metadata.parse(60, "Male", "lower_extremity").encode()
    assert vec.shape == (META_DIM,) and vec.dtype == np.float32
    assert vec[0] == pytest.approx(0.6) and vec[1] == 0.0
    assert vec[FIELD_SLICES["sex"]].tolist() == [0, 1, 0]
    site = vec[FIELD_SLICES["site"]]
    assert site.sum() == 1 and site[SITES.index("lower extremity")] == 1


def test_blank_metadata_encodes_unknown():
    vec = Metadata.parse(None, "", None).encode()
    assert vec[0] == 0.0 and vec[1] == 1.0  # explicit "age missing" flag
    assert np.array_equal(vec, UNKNOWN_VECTOR)
    full = Metadata.parse(45, "female", "back").encode()
    blanked = blank_fields(full, ["site"])
    assert np.array_equal(blanked[FIELD_SLICES["site"]], UNKNOWN_VECTOR[FIELD_SLICES["site"]])
    assert np.array_equal(blanked[FIELD_SLICES["age"]], full[FIELD_SLICES["age"]])


@pytest.mark.parametrize(
    ("age", "sex", "site", "fragment"),
    [
        (-5, None, None, "outside 0-120"),
        (300, None, None, "outside 0-120"),
        ("abc", None, None, "not a number"),
        (None, "robot", None, "Unknown sex"),
        (None, None, "elbow", "Unknown body site"),
    ],
)
def test_bad_metadata_messages(age, sex, site, fragment):
    with pytest.raises(MetadataError, match=fragment):
        Metadata.parse(age, sex, site)


# --- loading -------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["flat", "parts"])
def test_load_both_layouts(tmp_path, layout):
    root = write_synthetic_ham(tmp_path / layout, per_class=4, layout=layout)
    df = load_metadata(root)
    assert len(df) == 28
    assert df["path"].map(lambda p: p.endswith(".jpg")).all()
    if layout == "parts":
        assert df["path"].str.contains("HAM10000_images_part_1").any()
        assert df["path"].str.contains("HAM10000_images_part_2").any()
    assert set(df["label"]) == set(range(7))
    assert df["age"].isna().sum() == 7  # first image of each class has no age
    verify_images(df)


def test_missing_column_is_named(synthetic_ham):
    csv = synthetic_ham / "HAM10000_metadata.csv"
    pd.read_csv(csv).drop(columns=["dx"]).to_csv(csv, index=False)
    with pytest.raises(DataError, match=r"missing required column\(s\) dx"):
        load_metadata(synthetic_ham)


def test_unknown_dx_names_line(synthetic_ham):
    csv = synthetic_ham / "HAM10000_metadata.csv"
    df = pd.read_csv(csv)
    df.loc[3, "dx"] = "melanoma"
    df.to_csv(csv, index=False)
    with pytest.raises(DataError, match=r"line 5: unknown dx 'melanoma'"):
        load_metadata(synthetic_ham)


def test_missing_image_is_named(synthetic_ham):
    df = pd.read_csv(synthetic_ham / "HAM10000_metadata.csv")
    victim = df["image_id"].iloc[2]
    (synthetic_ham / "images" / f"{victim}.jpg").unlink()
    with pytest.raises(DataError, match=rf"image '{victim}' not found"):
        load_metadata(synthetic_ham)


def test_corrupt_image_is_named(synthetic_ham):
    df = load_metadata(synthetic_ham)
    bad = df["path"].iloc[5]
    with open(bad, "wb") as fh:
        fh.write(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    with pytest.raises(DataError, match=df["image_id"].iloc[5]):
        verify_images(df)


def test_bad_age_in_csv_names_line(synthetic_ham):
    csv = synthetic_ham / "HAM10000_metadata.csv"
    df = pd.read_csv(csv)
    df.loc[0, "age"] = 250
    df.to_csv(csv, index=False)
    with pytest.raises(DataError, match=r"line 2: Age 250"):
        load_metadata(synthetic_ham)


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_metadata(tmp_path / "nope")


# --- images ---------------------------------------------------------------------------------


def test_image_conversions(tmp_path):
    rgba = Image.new("RGBA", (64, 48), (10, 20, 30, 128))
    gray16 = Image.fromarray((np.arange(64 * 48).reshape(48, 64) * 20).astype(np.uint16))
    cmyk = Image.new("CMYK", (64, 48), (0, 128, 128, 0))
    for img in (rgba, gray16, cmyk, Image.new("L", (64, 48), 7)):
        path = tmp_path / f"x_{img.mode.replace(';', '')}.{'jpg' if img.mode == 'CMYK' else 'png'}"
        img.save(path)
        arr = load_rgb(path)
        assert arr.shape == (48, 64, 3) and arr.dtype == np.uint8


def test_image_refusals(tmp_path):
    with pytest.raises(ImageError, match="not an image"):
        load_rgb(b"definitely not an image")
    with pytest.raises(ImageError, match="empty"):
        load_rgb(b"")
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (1, 1)).save(tiny)
    with pytest.raises(ImageError, match="too small"):
        load_rgb(tiny)


def test_decompression_bomb_refused(tmp_path):
    # A 10000×10000 1-bit PNG is ~tiny on disk but 100 MP when decoded.
    bomb = tmp_path / "bomb.png"
    Image.new("1", (10000, 10000)).save(bomb)
    assert bomb.stat().st_size < 200_000
    with pytest.raises(ImageError, match="too large"):
        load_rgb(bomb)


# --- splits ---------------------------------------------------------------------------------


def test_splits_grouped_reproducible(tmp_path):
    root = write_synthetic_ham(tmp_path / "ham", per_class=20)
    df = load_metadata(root)
    a = make_splits(df, seed=1)
    b = make_splits(df, seed=1)
    assert a.equals(b)
    merged = attach_splits(df, a)
    assert lesions_crossing_splits(merged) == []
    assert set(merged["split"]) == {"train", "val", "test"}
    # every class in every split (stratification)
    assert (merged.groupby("split")["dx"].nunique() == 7).all()
    path = tmp_path / "splits.csv"
    h1 = save_splits(a, path)
    again, h2 = load_or_make_splits(df, path, seed=999)  # existing file wins over the seed
    assert h1 == h2
    assert again.set_index("image_id")["split"].equals(merged.set_index("image_id")["split"])
    assert list(load_splits(path).columns) == ["image_id", "lesion_id", "dx", "split"]


def test_split_file_must_cover_dataset(synthetic_ham, tmp_path):
    df = load_metadata(synthetic_ham)
    splits = make_splits(df).iloc[:-1]
    with pytest.raises(DataError, match="not in the split file"):
        attach_splits(df, splits)


# --- transforms & dataset -------------------------------------------------------------------


def test_crop_to_aspect():
    img = np.zeros((300, 300, 3), np.uint8)
    assert crop_to_aspect(img, 4 / 3).shape == (225, 300, 3)
    assert crop_to_aspect(np.zeros((150, 200, 3), np.uint8), 4 / 3).shape == (150, 200, 3)
    assert crop_to_aspect(np.zeros((100, 400, 3), np.uint8), 4 / 3).shape == (100, 133, 3)


@pytest.mark.parametrize("train", [False, True])
def test_transform_output(train):
    pre = Preprocessing(height=96, width=128)
    out = ImageTransform(pre, train=train)(np.full((450, 600, 3), 128, np.uint8))
    assert out.shape == (3, 96, 128) and out.dtype == torch.float32


def test_eval_transform_deterministic():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (150, 200, 3), dtype=np.uint8)
    tf = ImageTransform(Preprocessing(), train=False)
    assert torch.equal(tf(img), tf(img))


def test_dataset_items(synthetic_ham):
    df = load_metadata(synthetic_ham)
    ds = LesionDataset(df, ImageTransform(Preprocessing(height=64, width=64)))
    image, meta, label = ds[0]
    assert image.shape == (3, 64, 64)
    assert meta.shape == (META_DIM,)
    assert label == df["label"].iloc[0]


def test_dataset_blanking_only_touches_whole_fields(synthetic_ham):
    df = load_metadata(synthetic_ham)
    ds = LesionDataset(df, ImageTransform(Preprocessing(height=32, width=32)), blank_prob=1.0)
    _, meta, _ = ds[3]
    assert np.array_equal(meta.numpy(), UNKNOWN_VECTOR)


# --- sampler --------------------------------------------------------------------------------


@pytest.mark.parametrize("power", [0.0, 0.5, 1.0])
def test_sampler_distribution_follows_power(power):
    counts = np.array([600, 100, 50, 10, 200, 6000, 40])
    labels = np.repeat(np.arange(7), counts)
    sampler = make_weighted_sampler(labels, power=power, num_samples=200_000, seed=0)
    drawn = class_counts(labels[np.fromiter(iter(sampler), dtype=np.int64)])
    share = drawn / drawn.sum()
    expected = expected_class_share(counts, power)
    assert np.allclose(share, expected, atol=0.01)
    if power == 1.0:
        assert np.allclose(share, 1 / 7, atol=0.01)
    if power == 0.0:
        assert np.allclose(expected, counts / counts.sum())


def test_sampler_rejects_bad_power():
    with pytest.raises(ValueError):
        make_weighted_sampler([0, 1, 1], power=1.5)


# --- real data ------------------------------------------------------------------------------


@pytest.mark.realdata
def test_real_data_counts_and_no_lesion_leak(real_data):
    from data_pipeline.splits import DEFAULT_SPLITS

    df = load_metadata(real_data)
    assert len(df) == 9007
    assert df["lesion_id"].nunique() == 6723
    merged = attach_splits(df, load_splits(DEFAULT_SPLITS))
    assert lesions_crossing_splits(merged) == []
    for split in ("train", "val", "test"):
        assert set(merged.loc[merged["split"] == split, "dx"]) == set(CLASSES)
    # the committed split is what make_splits produces with the default seed
    fresh = attach_splits(df, make_splits(df, seed=42))
    assert (
        fresh.set_index("image_id")["split"]
        .sort_index()
        .equals(merged.set_index("image_id")["split"].sort_index())
    )
