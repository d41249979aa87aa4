"""The docs stay true: every setting is documented, the README's file table lists exactly the repository's
files, and no doc points at a file the repository does not have."""

from __future__ import annotations

import re
import subprocess

from app.config import PROJECT_ROOT, Settings

README = (PROJECT_ROOT / "README.md").read_text(encoding="utf-8")


def test_every_setting_is_documented():
    documented = (PROJECT_ROOT / "docs" / "settings.md").read_text(encoding="utf-8")
    missing = [name for name in Settings.model_fields if f"`TUNEBOARD_{name.upper()}`" not in documented]
    assert missing == [], f"document these in docs/settings.md: {missing}"
    assert "docs/settings.md" in README


def test_the_readme_file_table_matches_the_repository():
    files = subprocess.run(
        ["git", "ls-files"], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    table = README.split("## Files", 1)[1].split("```")[1]
    listed = {line.split()[0] for line in table.splitlines() if line.strip()}
    folders = {name for name in listed if name.endswith("/")}
    unlisted = [
        f
        for f in files
        if f not in listed
        and f not in ("README.md", ".gitignore")
        and not any(f.startswith(d) for d in folders)
    ]
    assert unlisted == [], f"add these to the README's file table: {unlisted}"
    gone = sorted(name for name in listed - folders if name not in files)
    assert gone == [], f"the README lists files that no longer exist: {gone}"


def test_docs_link_only_to_files_in_the_repository():
    for doc in [PROJECT_ROOT / "README.md", *(PROJECT_ROOT / "docs").glob("*.md")]:
        text = doc.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
            if target.startswith(("http://", "https://")):
                continue
            assert (doc.parent / target).exists(), f"{doc.name} links to {target}, which does not exist"
        assert "RECIPE.md" not in text, f"{doc.name} cites a file outside the repository"
