"""benchmarks/e2e.py --smoke: the end-to-end benchmark's table, written from a CPU run of a tiny model.

Each mla row must generate hf-eager's tokens and logits in float32: the script's own check compares
the first decode step's logits, and this test reads its verdict and the token agreement back.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_e2e_smoke(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join("benchmarks", "e2e.py"), "--smoke", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    md, table = tmp_path / "e2e-cpu-smoke.md", tmp_path / "e2e-cpu-smoke.csv"
    assert md.exists() and table.exists(), os.listdir(tmp_path)
    text = md.read_text()
    assert "- command: `python benchmarks/e2e.py --smoke" in text
    rows = {r["system"]: r for r in csv.DictReader(open(table))}
    assert set(rows) == {"hf-eager", "mla-static", "mla"}, rows
    for system in rows:
        assert f"| {system} |" in text
        assert float(rows[system]["decode_ms"]) > 0, rows[system]
        assert rows[system]["note"] == "", rows[system]
    for system in ("mla-static", "mla"):
        mla = rows[system]
        assert mla["logits_ok"] == "pass", mla
        assert float(mla["prefill_logits_diff"]) <= 1e-4, mla
        decode_diff, sequences = mla["decode_logits_diff"].split()
        assert float(decode_diff) <= 1e-4 and sequences == "(1/1)", mla
        assert float(mla["token_agreement"]) == 1.0, mla
        assert mla["forms"], f"the {system} row names no form: the backend rewrote nothing"
        # the first call's split: our passes took time, and less than the whole first call
        assert 0 < float(mla["passes_s"]) < float(mla["first_call_s"]), mla
