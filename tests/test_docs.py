"""The README and config.toml document every configuration key there is."""

from __future__ import annotations

import re
from pathlib import Path

from bomstream.config_load import describe_keys

ROOT = Path(__file__).resolve().parent.parent


def test_readme_config_table_lists_every_key() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [key for key, _env, _default in describe_keys() if f"`{key}`" not in readme]
    assert missing == []


def test_config_toml_documents_every_key() -> None:
    text = (ROOT / "config.toml").read_text()
    section = ""
    documented = set()
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("[") and stripped.endswith("]"):
            section = stripped[1:-1]
        elif stripped.startswith("# ") and " = " in stripped:
            documented.add(f"{section}.{stripped[2:].split(' = ')[0].strip()}")
    missing = [key for key, _env, _default in describe_keys() if key not in documented]
    assert missing == []


def test_doc_links_and_cited_results_exist() -> None:
    """docs/scaling.md derives each figure from a results file; a link or a
    citation that points nowhere would leave a figure without its source."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    missing = []
    for page in pages:
        text = page.read_text()
        for target in re.findall(r"\]\(([^)#\s]+)\)", text):
            if "://" not in target and not (page.parent / target).exists():
                missing.append(f"{page.name}: {target}")
        for cited in re.findall(r"`(bench/results/[^`\s<]+\.json)`", text):
            if not (ROOT / cited).exists():
                missing.append(f"{page.name}: {cited}")
    assert missing == []
    assert "](docs/scaling.md)" in (ROOT / "README.md").read_text()
