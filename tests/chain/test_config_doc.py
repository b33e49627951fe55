"""docs/config.md is generated from the config dataclasses and is up to date; it names every field."""

import dataclasses
from pathlib import Path

from chain.config_doc import SECTIONS, render

DOC = Path(__file__).resolve().parents[2] / "docs" / "config.md"


def test_committed_reference_is_up_to_date():
    assert DOC.read_text() == render(), "docs/config.md is stale: run `python -m chain.config_doc docs/config.md`"


def test_every_field_is_documented_with_its_default():
    text = render()
    for section, cls in SECTIONS:
        assert f"## [{section}]" in text
        for f in dataclasses.fields(cls):
            if not dataclasses.is_dataclass(f.default):
                assert f"| `{f.metadata.get('key', f.name)}` |" in text, f"{section}.{f.name}"


def test_user_docs_cite_no_team_internal_files():
    for path in DOC.parent.glob("*.md"):
        text = path.read_text()
        for name in ("DESIGN.md", "MODEL.md", "REFERENCE.md", "STYLE.md"):
            assert name not in text, f"{path.name} cites {name}"
