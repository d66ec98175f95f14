"""Every relative link in README.md and docs/**/*.md resolves: the file or folder exists, and a
#fragment names a heading of the target (GitHub's slugs)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def anchors(md: Path) -> set[str]:
    return {re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            for m in re.finditer(r"^#+\s+(.*)$", md.read_text(), flags=re.M)}


def test_every_relative_link_in_the_documentation_resolves():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    assert len(pages) >= 7  # the README, the index, adding-a-family and a page per family
    broken, checked = [], 0
    for md in pages:
        text = re.sub(r"```.*?```", "", md.read_text(), flags=re.S)  # code blocks hold no links
        for target in LINK.findall(text):
            if re.match(r"[a-z]+:", target):  # http:, mailto:
                continue
            checked += 1
            path, _, fragment = target.partition("#")
            dest = (md.parent / path).resolve() if path else md
            ok = dest.exists() and (not fragment or (dest.is_file() and fragment in anchors(dest)))
            if not ok:
                broken.append(f"{md.relative_to(ROOT)}: {target}")
    assert checked > 50 and broken == []


def test_every_registered_family_has_a_page():
    from gensuite.registry import families

    # gensuite's own (families from outside, e.g. the hook tests' toy family, join the registry when used)
    built_in = {name for name, cls in families().items() if cls.__module__.startswith("gensuite.families.")}
    assert {p.stem for p in (ROOT / "docs" / "families").glob("*.md")} == built_in
    assert len(built_in) >= 8
