"""The docs stay true: every setting is documented, the README's file table lists exactly the repository's
files, and no doc points at a file the repository does not have."""

from __future__ import annotations

import re
import subprocess

from app.config import PROJECT_ROOT, Settings

README = (PROJECT_ROOT / "README.md").read_text(encoding="utf-8")


def test_the_settings_page_is_written_from_the_settings():
    """docs/settings.md is exactly what the settings' own declarations give (python -m app.settings_doc)."""
    from app.settings_doc import render

    documented = (PROJECT_ROOT / "docs" / "settings.md").read_text(encoding="utf-8")
    assert documented == render(), "run: python -m app.settings_doc > docs/settings.md"
    assert all(f"`TUNEBOARD_{name.upper()}`" in documented for name in Settings.model_fields)
    assert len(Settings.model_fields) <= 26  # one setting per thing an operator chooses
    assert "docs/settings.md" in README


def test_a_retired_setting_is_named_at_start_with_what_to_do_instead(monkeypatch, caplog):
    from app.config import RETIRED, load_settings

    monkeypatch.setenv("TUNEBOARD_GENERATION_PORT", "8002")
    with caplog.at_level("WARNING", logger="tuneboard"):
        load_settings()
    assert any(
        "TUNEBOARD_GENERATION_PORT is no longer a setting" in r.message
        and RETIRED["TUNEBOARD_GENERATION_PORT"] in r.message
        for r in caplog.records
    )
    assert not set(RETIRED) & {f"TUNEBOARD_{name.upper()}" for name in Settings.model_fields}


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
