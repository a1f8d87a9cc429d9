"""The README's family table: one row per MLA family of the installed transformers (checked here,
alone), and equal to what the family tests found (checked when the session ends, once every family
test has run: `check_family_table` below, called from tests/conftest.py's pytest_sessionfinish)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from mla_compile.tiny import DSA_FAMILIES, HYBRID_FAMILIES, MLA_FAMILIES
from tests.helpers.family_table import RESULTS

README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN, END = "<!-- families:begin -->", "<!-- families:end -->"


def _cell(forms: set) -> str:
    return ", ".join(sorted(forms)) if forms else "-"


def family_table() -> str:
    rows = ["| family | DSA | hybrid | eager: chosen forms | sdpa: chosen forms | forced forms, each equal to eager |",
            "|---|---|---|---|---|---|"]
    for f in MLA_FAMILIES:
        r = RESULTS.get(f, {})
        rows.append(f"| {f} | {'yes' if f in DSA_FAMILIES else ''} | {'yes' if f in HYBRID_FAMILIES else ''} | "
                    f"{_cell(r.get('eager', set()))} | {_cell(r.get('sdpa', set()))} | {_cell(r.get('forced', set()))} |")
    return "\n".join(rows)


def _readme_rows() -> list[list[str]]:
    current = re.search(re.escape(BEGIN) + r"\n?(.*?)\n?" + re.escape(END), README.read_text(), re.S)
    assert current, f"README.md has no {BEGIN} section"
    lines = current.group(1).strip().splitlines()[2:]
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines]


def test_readme_family_table_lists_every_family():
    """Runs alone too: the table has one row per MLA family of the installed transformers, with its
    DSA and hybrid marks."""
    rows = _readme_rows()
    assert [r[0] for r in rows] == MLA_FAMILIES, "regenerate the README's family table (see its section)"
    for family, dsa, hybrid, *_ in rows:
        assert (dsa == "yes") == (family in DSA_FAMILIES), family
        assert (hybrid == "yes") == (family in HYBRID_FAMILIES), family


def check_family_table() -> str | None:
    """None when the README's table is what this session's family tests found, or when they did not
    all run; else what differs. Under MLA_COMPILE_WRITE_TABLE=1 the table is rewritten instead."""
    if set(RESULTS) != set(MLA_FAMILIES) or any(
            not RESULTS[f].get("eager") or not RESULTS[f].get("forced") for f in MLA_FAMILIES):
        return None
    table = family_table()
    text = README.read_text()
    current = re.search(re.escape(BEGIN) + r"\n?(.*?)\n?" + re.escape(END), text, re.S)
    if os.environ.get("MLA_COMPILE_WRITE_TABLE") == "1":
        new = text.replace(current.group(0), f"{BEGIN}\n{table}\n{END}") if current else text + f"\n{BEGIN}\n{table}\n{END}\n"
        README.write_text(new)
        return None
    if current is None:
        return f"README.md has no {BEGIN} section"
    if current.group(1) != table:
        return ("README family table differs from what the family tests found; regenerate it with "
                "MLA_COMPILE_WRITE_TABLE=1 python -m pytest tests/test_families.py\nfound:\n" + table)
    return None
