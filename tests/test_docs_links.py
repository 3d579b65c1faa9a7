"""Every docs/NAME.md that README.md or another document names exists (docs/ is the README's map)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_named_document_exists():
    missing = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for name in sorted(set(re.findall(r"\bdocs/([\w-]+\.md)\b", page.read_text(encoding="utf-8")))):
            if not (ROOT / "docs" / name).is_file():
                missing.append(f"{page.relative_to(ROOT)} names docs/{name}")
    assert not missing, "; ".join(missing)
