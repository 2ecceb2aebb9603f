"""The README's and docs/'s links stay inside the repository and resolve.

Every link in README.md and docs/*.md (inline, image, reference-style, autolinks and bare URLs, outside
code blocks and code spans) must be a relative path to a file or directory of the repository, and an
anchor must name a heading of its target (as GitHub makes anchors from headings). No link may leave the
repository: no http(s), mailto or file URL, no absolute path, no path above the repository's root. The
only outside address the repository carries is the one inside LICENSE, which is the license's own text
and not documentation. URLs inside code (``curl http://127.0.0.1:9187/...``) are examples, not links.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])

_FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.MULTILINE | re.DOTALL)
_CODE_SPAN = re.compile(r"(`+)(?!`).*?(?<!`)\1(?!`)", re.DOTALL)
_INLINE = re.compile(
    r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^()\s<>]*(?:\([^()\s]*\)[^()\s<>]*)*)>?(?:\s+\"[^\"]*\")?\s*\)"
)
_REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.MULTILINE)
_AUTOLINK = re.compile(r"<([A-Za-z][A-Za-z0-9+.-]*:[^\s<>]*)>")
_BARE_URL = re.compile(r"\b(?:https?|ftp|file|mailto):[^\s)<>\]]+", re.IGNORECASE)
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", re.MULTILINE)


def prose(text: str) -> str:
    """The text without fenced code blocks and code spans (whose contents are never links)."""
    return _CODE_SPAN.sub("", _FENCE.sub("", text))


def links(text: str) -> list[str]:
    body = prose(text)
    found = _INLINE.findall(body) + _REFERENCE.findall(body) + _AUTOLINK.findall(body)
    found += _BARE_URL.findall(_AUTOLINK.sub("", _INLINE.sub("", body)))
    return found


def anchors(path: Path) -> set[str]:
    """GitHub's anchors for the headings of a Markdown file: lower case, punctuation dropped, spaces to
    hyphens, a repeated one numbered -1, -2, ..."""
    seen: dict[str, int] = {}
    out = set()
    for heading in _HEADING.findall(_FENCE.sub("", path.read_text())):
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
        slug = re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def problems(doc: Path, text: str | None = None) -> list[str]:
    """What is wrong with the links of ``doc`` (or of ``text``, read as if it were ``doc``)."""
    out = []
    for target in links(doc.read_text() if text is None else text):
        where = f"{doc.relative_to(ROOT)}: {target}"
        if not target:
            out.append(f"{where}: empty link")
            continue
        if _SCHEME.match(target):
            out.append(f"{where}: points outside the repository")
            continue
        path_part, _, anchor = target.partition("#")
        if path_part.startswith("/"):
            out.append(f"{where}: absolute path (use a path relative to the file)")
            continue
        resolved = (doc.parent / path_part).resolve() if path_part else doc
        if not resolved.is_relative_to(ROOT):
            out.append(f"{where}: leaves the repository")
            continue
        if not resolved.exists():
            out.append(f"{where}: no such file")
            continue
        if anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            out.append(f"{where}: no heading makes the anchor #{anchor}")
    return out


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve_inside_the_repository(doc: Path) -> None:
    assert problems(doc) == []


def test_the_readme_links_the_docs_it_names() -> None:
    found = links((ROOT / "README.md").read_text())
    assert {"docs/fail-closed.md", "docs/rotation.md", "LICENSE", "#limitations"} <= set(found)


def test_the_checker_sees_bad_links() -> None:
    text = (
        "[a](https://example.org/x) <https://example.org> see http://example.net/y\n"
        "[b](missing.md) [c](../../outside.md) [d](/etc/passwd) [e](design.md#no-such-heading)\n"
        "[f](design.md#the-data-path) [g](../LICENSE) `[h](https://in-code.example)`\n"
        "```\n[i](https://in-a-fence.example)\n```\n"
    )
    found = links(text)
    assert "https://in-code.example" not in found
    assert "https://in-a-fence.example" not in found
    assert {"https://example.org/x", "https://example.org", "http://example.net/y"} <= set(found)
    # Read as if it lived in docs/: everything but [f] and [g] is a problem.
    reported = problems(ROOT / "docs" / "probe.md", text)
    assert len(reported) == 7, reported
    assert not [r for r in reported if "the-data-path" in r or "LICENSE" in r]


def test_docs_name_nothing_outside_the_repository() -> None:
    for doc in DOCS:
        text = doc.read_text()
        for outside in ("/work/", "shared/DESIGN", "shared/STYLE", "DESIGN.md", "STYLE.md"):
            assert outside not in text, f"{doc.relative_to(ROOT)} names {outside}"


def test_license_is_the_apache_license_the_package_declares() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text
    assert "Version 2.0, January 2004" in text
    assert 'license = { text = "Apache-2.0" }' in (ROOT / "pyproject.toml").read_text()
