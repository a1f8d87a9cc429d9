"""The README's supported-families table is generated from the family tests, never typed by hand.

Each family test calls `note(family, column, forms)`; when the test run ends, if every family test
ran, tests/test_family_table.py's check compares the README section with the table the tests
produced (and rewrites it under MLA_COMPILE_WRITE_TABLE=1).
"""

from __future__ import annotations

from collections import defaultdict

RESULTS: dict[str, dict[str, set]] = defaultdict(lambda: defaultdict(set))


def note(family: str, column: str, forms: set) -> None:
    RESULTS[family][column] |= set(forms)
