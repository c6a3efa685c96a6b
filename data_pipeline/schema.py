"""Class sets, the metadata vocabulary and its encoding, shared by training, inference and the app.

Everything that must agree between a checkpoint and the code that feeds it lives here: the class
set (:class:`ClassSet`: codes in logit order, names, malignant codes; HAM10000's is :data:`HAM7`),
the body-site and sex vocabularies, and the fixed-length float vector that the metadata MLP
reads. A checkpoint stores its class set and :func:`vocabulary` so a model trained today still
decodes tomorrow.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from common.errors import DataError, MetadataError
from common.text import clip, echo


class ClassSetError(DataError):
    """A class set (codes, names, malignant codes) that a checkpoint or dataset cannot use."""


#: A class code: what ``predictions.predicted_class`` (String(8)) stores and CSV columns name.
CODE_PATTERN = re.compile(r"[a-z0-9_]{1,8}")


@dataclass(frozen=True)
class ClassSet:
    """The classes a model predicts: codes in logit order, display names, malignant codes.

    Like timm's ``label_names`` it belongs to the checkpoint, not the code: HAM10000's seven
    (:data:`HAM7`), ISIC 2019's eight, a publisher's native classes or melanoma vs the rest.
    Stored in every checkpoint config (:meth:`to_dict`); a config without one means HAM7.
    """

    codes: tuple[str, ...]
    names: tuple[str, ...]
    malignant: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if len(self.codes) < 2:
            raise ClassSetError(f"A class set needs at least two classes, got {list(self.codes)}.")
        for code in self.codes:
            if not isinstance(code, str) or not CODE_PATTERN.fullmatch(code):
                raise ClassSetError(
                    f"Class code {echo(code)} is not 1-8 characters of a-z, 0-9 or _."
                )
        dup = sorted({c for c in self.codes if self.codes.count(c) > 1})
        if dup:
            raise ClassSetError(f"Class code {dup[0]!r} appears twice in the class set.")
        if len(self.names) != len(self.codes):
            raise ClassSetError(
                f"The class set has {len(self.codes)} codes but {len(self.names)} names."
            )
        for code, name in zip(self.codes, self.names, strict=True):
            if not isinstance(name, str) or not name.strip() or "\n" in name:
                raise ClassSetError(
                    f"Class {code!r} needs a one-line display name, got {echo(name)}."
                )
        unknown = sorted(self.malignant - set(self.codes))
        if unknown:
            raise ClassSetError(f"Malignant code {unknown[0]!r} is not one of the class codes.")

    @classmethod
    def build(
        cls,
        codes: Sequence[str],
        names: Mapping[str, str] | Sequence[str] | None = None,
        malignant: Iterable[str] = (),
    ) -> ClassSet:
        """From codes, names (a list in code order or a code → name mapping; missing: the code)
        and malignant codes."""
        codes = tuple(codes)
        if names is None:
            names = {}
        if isinstance(names, Mapping):
            resolved = tuple(str(names.get(c, c)) for c in codes)
        else:
            resolved = tuple(names)
        return cls(codes, resolved, frozenset(malignant))

    @classmethod
    def from_dict(cls, d: Any) -> ClassSet:
        """Inverse of :meth:`to_dict`; a malformed entry is a one-line :class:`ClassSetError`."""
        if not isinstance(d, Mapping) or not isinstance(d.get("codes"), list):
            raise ClassSetError(
                "A class set must be {codes: [...], names: [...], malignant: [...]}, "
                f"got {echo(d)}."
            )
        return cls.build(d["codes"], d.get("names"), d.get("malignant") or ())

    @classmethod
    def from_entries(cls, entries: Any) -> ClassSet:
        """From a dataset manifest's ``classes`` list: ``[{code, name, malignant}, ...]`` in
        label order."""
        if not isinstance(entries, list) or not all(
            isinstance(e, Mapping) and "code" in e for e in entries
        ):
            raise ClassSetError(
                f"A classes list must be [{{code, name, malignant}}, ...], got {echo(entries)}."
            )
        return cls.build(
            [e["code"] for e in entries],
            [e.get("name") or e["code"] for e in entries],
            [e["code"] for e in entries if e.get("malignant")],
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "codes": list(self.codes),
            "names": list(self.names),
            "malignant": [c for c in self.codes if c in self.malignant],
        }

    def __len__(self) -> int:
        return len(self.codes)

    def __iter__(self) -> Iterator[str]:
        return iter(self.codes)

    def __contains__(self, code: object) -> bool:
        return code in self.codes

    def index(self, code: str) -> int:
        return self.codes.index(code)

    def name(self, code: str) -> str:
        """The display name of one of this set's codes (the code itself for any other)."""
        return self.names[self.codes.index(code)] if code in self.codes else code

    @property
    def names_by_code(self) -> dict[str, str]:
        return dict(zip(self.codes, self.names, strict=True))

    @property
    def has_melanoma(self) -> bool:
        """Whether melanoma-specific figures (melanoma AUC, sensitivity) apply."""
        return MELANOMA in self.codes

    @property
    def malignant_codes(self) -> tuple[str, ...]:
        """Malignant codes in logit order."""
        return tuple(c for c in self.codes if c in self.malignant)

    def describe(self) -> str:
        """``cnv, anv, mel (malignant: mel)`` for messages and model cards."""
        mal = ", ".join(self.malignant_codes) or "none"
        return f"{', '.join(self.codes)} (malignant: {mal})"


#: The melanoma code: melanoma-specific figures are reported for any class set that has it.
MELANOMA = "mel"

#: HAM10000's seven diagnoses: the shipped model's class set, and the one a checkpoint config
#: without a ``classes`` entry (every model made before class sets existed) means.
HAM7 = ClassSet(
    codes=("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"),
    names=(
        "Actinic keratosis / intraepithelial carcinoma",
        "Basal cell carcinoma",
        "Benign keratosis-like lesion",
        "Dermatofibroma",
        "Melanoma",
        "Melanocytic nevus",
        "Vascular lesion",
    ),
    malignant=frozenset({"akiec", "bcc", "mel"}),
)

#: HAM10000's codes, names and malignant codes (:data:`HAM7`), for code that is about HAM10000
#: itself (label mapping of HAM10000-format folders, its reports); a model's classes come from
#: its checkpoint (``CheckpointConfig.classes``).
CLASSES: tuple[str, ...] = HAM7.codes
CLASS_NAMES: dict[str, str] = HAM7.names_by_code
MALIGNANT: frozenset[str] = HAM7.malignant

#: Class sets of the models loaded in this process, by model version. A stored prediction keeps
#: only class codes (its probabilities' keys); its display names are its model's, when that
#: model has been loaded here (see :func:`class_name`).
_LOADED: dict[str, ClassSet] = {}
#: Class codes found in a history database opened here (no names: its models may not be loaded).
_STORED: dict[str, None] = {}


def remember_classes(model_version: str, classes: ClassSet, *, stored: bool = False) -> None:
    """Record a loaded model's class set so its stored rows show its names. ``stored``: a class
    set read from a history database (``model_classes``): kept where a loaded model's is, and
    ranked behind the loaded models for a code without a model version."""
    if stored:
        if model_version not in _LOADED:
            rest = dict(_LOADED)
            _LOADED.clear()
            _LOADED[model_version] = classes
            _LOADED.update(rest)
        return
    _LOADED.pop(model_version, None)
    _LOADED[model_version] = classes  # most recent last


def classes_of(model_version: str | None) -> ClassSet | None:
    """The class set of a model loaded in this process, None when unknown."""
    return _LOADED.get(model_version) if model_version else None


def class_name(code: str, model_version: str | None = None) -> str:
    """A class's display name: its model's (when that model is loaded here), else HAM10000's
    for a HAM10000 code, else that of the latest loaded model having the code, else the code."""
    own = classes_of(model_version)
    if own is not None and code in own:
        return own.name(code)
    if code in HAM7:
        return HAM7.name(code)
    for classes in reversed(_LOADED.values()):
        if code in classes:
            return classes.name(code)
    return code


def row_classes(codes: Iterable[str], model_version: str | None = None) -> ClassSet:
    """The class set of a stored prediction from its probabilities' keys: its model's when that
    model is loaded here, HAM10000's when every code is one of HAM10000's (missing ones had
    probability 0), else the codes with the names :func:`class_name` gives and HAM10000's
    malignancy."""
    codes = tuple(codes)
    own = classes_of(model_version)
    if own is not None and set(own.codes) == set(codes):
        return own
    if len(codes) < 2 or set(codes) <= set(HAM7.codes):
        return HAM7
    try:
        return ClassSet.build(
            codes, {c: class_name(c, model_version) for c in codes}, HAM7.malignant & set(codes)
        )
    except ClassSetError:  # a stored key no class set allows: show it as HAM10000's row
        return HAM7


def remember_codes(codes: Iterable[str]) -> None:
    """Record the class codes a history database holds (e.g. ``scripts.query_history`` without
    a model), so its filters accept them."""
    _STORED.update(dict.fromkeys(c for c in codes if CODE_PATTERN.fullmatch(str(c))))


def known_codes() -> tuple[str, ...]:
    """HAM10000's codes, then those of every model loaded here and of a history database opened
    here: what a history filter, a confirmed diagnosis or an explanation target may name."""
    codes = dict.fromkeys(HAM7.codes)
    for classes in _LOADED.values():
        codes.update(dict.fromkeys(classes.codes))
    codes.update(_STORED)
    return tuple(codes)


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
        # The value as given: "{:g}" would print 120.0001 as "120", inside the range.
        shown = f"{age:g}" if float(f"{age:g}") == age else repr(age)
        shown = clip(value.strip()) if isinstance(value, str) else shown
        raise MetadataError(
            f"Age {shown} is outside {AGE_MIN:g}-{AGE_MAX:g} years; leave it blank if unknown."
        )
    return age + 0.0  # -0.0 + 0.0 == +0.0


def normalize_target(value: Any, classes: Sequence[str] | None = None) -> str | None:
    """The class an explanation is asked for: one of ``classes`` (None: :func:`known_codes`;
    the predictor checks its own), or None for blank (meaning "the predicted class")."""
    token = _clean_token(value)
    if token is None:
        return None
    allowed = tuple(known_codes() if classes is None else classes)
    token = token.replace(" ", "_")
    if token not in allowed:
        raise MetadataError(
            f"Unknown explanation target {echo(value)}: expected one of {', '.join(allowed)}."
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


def vocabulary(classes: ClassSet = HAM7) -> dict[str, Any]:
    """Everything needed to re-create the encoding; stored in every checkpoint config (with the
    checkpoint's class codes and names, as every config has had since the first)."""
    return {
        "classes": list(classes.codes),
        "class_names": classes.names_by_code,
        "sexes": list(SEXES),
        "sites": list(SITES),
        "age_scale": AGE_SCALE,
        "field_slices": {k: [s.start, s.stop] for k, s in FIELD_SLICES.items()},
        "meta_dim": META_DIM,
    }


def check_vocabulary(vocab: dict[str, Any], classes: ClassSet = HAM7) -> None:
    """Refuse a checkpoint whose vocabulary differs from this code's encoding (or from its own
    class set)."""
    if vocab != vocabulary(classes):
        raise MetadataError(
            "The checkpoint was trained with a different class / metadata vocabulary than this "
            "version of the code; retrain it or use the matching code version."
        )
