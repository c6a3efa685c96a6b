"""The docs stay true to what they describe: the README stays a short landing page whose test
command is the one CI runs and whose links resolve, and the model card's figures are the ones
stored in the shipped checkpoint (so replacing the model without updating the card fails here,
with the block to paste). `mkdocs build --strict` in .ci/run checks the site's own links."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
MODEL_CARD = REPO / "docs" / "model-card.md"
SHIPPED_CONFIG = REPO / "model" / "shipped" / "config.json"
TEST_COMMAND = "./setup.sh --dev && .venv/bin/python -m pytest -q"
START, END = "<!-- metrics:start -->", "<!-- metrics:end -->"

#: interval keys of metrics.intervals.sets.<set>, in table order, with their column names
COLUMNS = {
    "balanced_accuracy": "balanced accuracy",
    "macro_auc": "macro AUC",
    "mel_auc": "melanoma AUC",
    "mel_recall": "melanoma recall",
    "mel_sens_at_spec90": "mel. sens. @ 90 % spec.",
    "malignant_auc": "malignant AUC",
}
SET_NAMES = {"val": "HAM10000 val", "test": "HAM10000 test", "isic2017-val": "ISIC 2017 val"}


def metrics_table(config: dict[str, Any]) -> str:
    """The model card's metrics block, rebuilt from a checkpoint's config.json."""
    metrics = config["metrics"]
    sets = metrics["intervals"]["sets"]
    lines = [
        "| set | role | images | " + " | ".join(COLUMNS.values()) + " |",
        "|---|---|---|" + "---|" * len(COLUMNS),
    ]
    order = ["val", "test", *sorted(k for k in sets if k not in ("val", "test"))]
    for key in order:
        if key not in sets:
            continue
        stored = metrics[key] if key in ("val", "test") else metrics["external"][key]
        role = {"val": "validation (selection)", "test": "held-out test"}.get(
            key, "external validation (selection)"
        )
        cells = []
        for name in COLUMNS:
            ci = sets[key][name]
            cells.append(f"{ci['value']:.3f} [{ci['low']:.3f}, {ci['high']:.3f}]")
        lines.append(
            f"| {SET_NAMES.get(key, key)} | {role} | {stored['n']} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def test_readme_is_a_short_landing_page() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; move detail into docs/"
    assert "not a diagnosis" in README.read_text()


def test_readme_test_command_is_what_ci_runs() -> None:
    assert TEST_COMMAND in README.read_text().splitlines()
    ci = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line.strip()]
    assert ci[-1] == TEST_COMMAND


def test_readme_links_resolve() -> None:
    """README is not part of the MkDocs build, so its relative links are checked here."""
    text = README.read_text()
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    assert targets, "README links nowhere"
    missing = [
        t
        for t in targets
        if not re.match(r"[a-z]+:", t)
        and not t.startswith("#")
        and not (REPO / t.split("#")[0]).exists()
    ]
    assert not missing, f"README links to missing files: {missing}"


def test_model_card_figures_are_the_shipped_checkpoints() -> None:
    config = json.loads(SHIPPED_CONFIG.read_text())
    card = MODEL_CARD.read_text()
    assert START in card and END in card, f"{MODEL_CARD} lost its {START} / {END} markers"
    block = card.split(START, 1)[1].split(END, 1)[0].strip()
    expected = metrics_table(config)
    assert block == expected, (
        f"docs/model-card.md's metrics differ from {SHIPPED_CONFIG.relative_to(REPO)}; "
        f"replace the block between the markers with:\n{expected}"
    )
    assert f"`{config['name']}@{config['weights_sha256'][:12]}`" in card, (
        "the model card does not name the shipped model's version"
    )
