"""The HAM10000 vocabulary and the metadata encoding shared by training, inference and the app.

Everything that must agree between a checkpoint and the code that feeds it lives here: the class
order, the body-site and sex vocabularies, and the fixed-length float vector that the metadata MLP
reads. A checkpoint stores :func:`vocabulary` so a model trained today still decodes tomorrow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from common.errors import MetadataError
from common.text import echo

#: Diagnosis codes in the fixed order used for logits, metrics and the database.
CLASSES: tuple[str, ...] = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")

CLASS_NAMES: dict[str, str] = {
    "akiec": "Actinic keratosis / intraepithelial carcinoma",
    "bcc": "Basal cell carcinoma",
    "bkl": "Benign keratosis-like lesion",
    "df": "Dermatofibroma",
    "mel": "Melanoma",
    "nv": "Melanocytic nevus",
    "vasc": "Vascular lesion",
}

#: Classes that are malignant or pre-malignant; the app flags them when they rank high.
MALIGNANT: frozenset[str] = frozenset({"akiec", "bcc", "mel"})

UNKNOWN = "unknown"

#: HAM10000 ``localization`` values; ``unknown`` is last and is what a blank field encodes to.
SITES: tuple[str, ...] = (
    "abdomen",
    "acral",
    "back",
    "chest",
    "ear",
    "face",
    "foot",
    "genital",
    "hand",
    "lower extremity",
    "neck",
    "scalp",
    "trunk",
    "upper extremity",
    UNKNOWN,
)

SEXES: tuple[str, ...] = ("female", "male", UNKNOWN)

AGE_MIN, AGE_MAX = 0.0, 120.0
#: Ages are divided by this so the MLP sees values of order 1.
AGE_SCALE = 100.0

#: Layout of the encoded vector: [age/AGE_SCALE, age_missing, sex one-hot, site one-hot].
FIELD_SLICES: dict[str, slice] = {
    "age": slice(0, 2),
    "sex": slice(2, 2 + len(SEXES)),
    "site": slice(2 + len(SEXES), 2 + len(SEXES) + len(SITES)),
}
META_DIM = 2 + len(SEXES) + len(SITES)
FIELDS: tuple[str, ...] = tuple(FIELD_SLICES)


def _clean_token(value: Any) -> str | None:
    """Lower-case, trim and unify separators; None for blanks and NaN."""
    if value is None:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    text = str(value).strip().lower().replace("_", " ").replace("-", " ")
    text = " ".join(text.split())
    return text or None


def normalize_sex(value: Any) -> str:
    """Map user input to one of :data:`SEXES`; blanks become ``unknown``."""
    token = _clean_token(value)
    if token is None:
        return UNKNOWN
    aliases = {"f": "female", "m": "male", "woman": "female", "man": "male"}
    token = aliases.get(token, token)
    if token not in SEXES:
        raise MetadataError(
            f"Unknown sex {echo(value)}: expected one of {', '.join(SEXES)} or blank."
        )
    return token


def normalize_site(value: Any) -> str:
    """Map user input to one of :data:`SITES`; blanks become ``unknown``."""
    token = _clean_token(value)
    if token is None:
        return UNKNOWN
    if token not in SITES:
        raise MetadataError(
            f"Unknown body site {echo(value)}: expected one of {', '.join(SITES)} or blank."
        )
    return token


def normalize_age(value: Any) -> float | None:
    """Parse an age in years; None when blank. Rejects non-numbers, non-finite values ("nan",
    "inf") and values outside 0-120; -0 becomes 0.

    A float NaN (not the text "nan") is pandas' missing value, as read from a CSV, and means
    unknown like a blank field.
    """
    if value is None:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, bool):
        raise MetadataError(f"Age {echo(value)} is not a number of years.")
    if isinstance(value, str):
        if not value.strip():
            return None
        try:
            age = float(value.strip())
        except ValueError:
            raise MetadataError(f"Age {echo(value)} is not a number of years.") from None
    else:
        try:
            age = float(value)
        except (TypeError, ValueError, OverflowError):
            raise MetadataError(f"Age {echo(value)} is not a number of years.") from None
    if not math.isfinite(age):
        raise MetadataError(
            f"Age {echo(value)} is not a finite number of years; leave it blank if unknown."
        )
    if not AGE_MIN <= age <= AGE_MAX:
        raise MetadataError(
            f"Age {age:g} is outside {AGE_MIN:g}-{AGE_MAX:g} years; leave it blank if unknown."
        )
    return age + 0.0  # -0.0 + 0.0 == +0.0


def normalize_target(value: Any) -> str | None:
    """The class an explanation is asked for: a code from :data:`CLASSES`, or None for blank
    (meaning "the predicted class")."""
    token = _clean_token(value)
    if token is None:
        return None
    if token not in CLASSES:
        raise MetadataError(
            f"Unknown explanation target {echo(value)}: expected one of {', '.join(CLASSES)}."
        )
    return token


@dataclass(frozen=True)
class Metadata:
    """Validated patient metadata; any field may be unknown."""

    age: float | None = None
    sex: str = UNKNOWN
    site: str = UNKNOWN

    @classmethod
    def parse(cls, age: Any = None, sex: Any = None, site: Any = None) -> Metadata:
        """Validate raw user / CSV values; raises :class:`MetadataError` with a readable message."""
        return cls(normalize_age(age), normalize_sex(sex), normalize_site(site))

    def encode(self) -> np.ndarray:
        """The fixed-length float32 vector the metadata MLP reads (see :data:`FIELD_SLICES`)."""
        vec = np.zeros(META_DIM, dtype=np.float32)
        if self.age is None:
            vec[1] = 1.0
        else:
            vec[0] = self.age / AGE_SCALE
        vec[FIELD_SLICES["sex"].start + SEXES.index(self.sex)] = 1.0
        vec[FIELD_SLICES["site"].start + SITES.index(self.site)] = 1.0
        return vec

    def as_dict(self) -> dict[str, Any]:
        return {"age": self.age, "sex": self.sex, "site": self.site}


#: The encoding of "nothing known": the baseline for metadata attributions and blanking.
UNKNOWN_VECTOR: np.ndarray = Metadata().encode()


def blank_fields(vec: np.ndarray, fields: list[str] | tuple[str, ...]) -> np.ndarray:
    """Return a copy of ``vec`` with the given fields set to their "unknown" encoding."""
    out = vec.copy()
    for field in fields:
        sl = FIELD_SLICES[field]
        out[..., sl] = UNKNOWN_VECTOR[sl]
    return out


def vocabulary() -> dict[str, Any]:
    """Everything needed to re-create the encoding; stored in every checkpoint config."""
    return {
        "classes": list(CLASSES),
        "class_names": dict(CLASS_NAMES),
        "sexes": list(SEXES),
        "sites": list(SITES),
        "age_scale": AGE_SCALE,
        "field_slices": {k: [s.start, s.stop] for k, s in FIELD_SLICES.items()},
        "meta_dim": META_DIM,
    }


def check_vocabulary(vocab: dict[str, Any]) -> None:
    """Refuse a checkpoint whose vocabulary differs from this code's encoding."""
    if vocab != vocabulary():
        raise MetadataError(
            "The checkpoint was trained with a different class / metadata vocabulary than this "
            "version of the code; retrain it or use the matching code version."
        )
