"""The mla-compile command line: explain (table, --json schema, --emit-mlir, --plot, --measured),
calibrate, and TORCH_LOGS="+mla_compile"."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from mla_compile import cli
from mla_compile.tiny import mla_attention_modules, tiny_config, tiny_model


def _explain(capsys, *argv):
    assert cli.main(["explain", *argv]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("family", ["deepseek_v3", "deepseek_v32"])
def test_explain_table(capsys, family):
    out = _explain(capsys, family, "--prompt-len", "6", "--decode-steps", "1")
    modules = [n for n, _ in mla_attention_modules(tiny_model(family))]
    lines = out.splitlines()
    header = next(i for i, ln in enumerate(lines) if ln.startswith("graph"))
    for col in ("module", "form", "shapes", "reason"):
        assert col in lines[header]
    for m in modules:                              # one row for the prefill, one for the decode step
        rows = [ln for ln in lines[header + 2:] if ln.split()[1:2] == [m] and "rewritten" in ln]
        assert len(rows) == 2, (m, out)
    assert "region(s) rewritten" in out


@pytest.mark.parametrize("family", ["deepseek_v3", "deepseek_v32"])
def test_explain_plans_agree_with_the_decisions(capsys, family):
    """--verbose's plans and the plot's curves re-ask the cost model what the decision asked (the same
    shapes, and the causal / mask flags the record holds): the same costs and the same form."""
    from mla_compile.plot import predicted_curves

    doc = json.loads(_explain(capsys, family, "--prompt-len", "16", "--decode-steps", "1", "--json",
                              "--cost-device", "h200"))
    static = [r for r in doc["records"] if r["status"] == "rewritten" and r["costs"]]
    assert static and all(r["flags"] == {"causal": True, "mask": True} for r in static)
    for r in static:
        p = cli._plan_for(r["shapes"], torch.float32, "h200", r["flags"])
        assert p.form == r["form"] and p.costs == pytest.approx(r["costs"]), r["module"]
        Ts, curves, _ = predicted_curves(r["shapes"], "h200", torch.float32, T_min=r["shapes"]["T"],
                                         T_max=r["shapes"]["T"], points=2, flags=r["flags"])
        assert {f: ys[0] for f, ys in curves.items()} == pytest.approx(r["costs"]), r["module"]


def test_explain_json_schema(capsys):
    out = _explain(capsys, "deepseek_v32", "--prompt-len", "6", "--decode-steps", "1", "--json",
                   "--cost-device", "h200")
    doc = json.loads(out)
    cli.validate_explain_json(doc)
    assert doc["schema"] == cli.JSON_SCHEMA_ID and doc["family"] == "deepseek_v32"
    rewritten = [r for r in doc["records"] if r["status"] == "rewritten"]
    assert len(rewritten) == doc["rewritten"] >= 4
    assert all(r["costs"] and r["device"]["name"] == "h200" for r in rewritten if r["form"] != "auto")
    bad = dict(doc, records=[dict(doc["records"][0], status="maybe")])
    with pytest.raises(ValueError):
        cli.validate_explain_json(bad)


def test_explain_config_dir_emit_mlir(tmp_path, capsys):
    pytest.importorskip("torch_mlir.fx")
    # a config directory (config.json only, no weights), dense MLPs so every output type lowers
    cfg = tiny_config("deepseek_v3", first_k_dense_replace=2, vocab_size=100)
    cfg.save_pretrained(tmp_path / "model")
    out = _explain(capsys, str(tmp_path / "model"), "--prompt-len", "6", "--decode-steps", "0",
                   "--form", "absorbed", "--emit-mlir", str(tmp_path / "mlir"))
    assert "model.layers.1.self_attn" in out and "absorbed" in out
    files = sorted(p.name for p in (tmp_path / "mlir").iterdir())
    assert files == sorted(f"model.{ot}.mlir" for ot in ("torch", "linalg-on-tensors", "stablehlo", "tosa")), out
    assert "torch.mla.absorbed" in (tmp_path / "mlir" / "model.torch.mlir").read_text()
    assert "linalg." in (tmp_path / "mlir" / "model.linalg-on-tensors.mlir").read_text()


def test_explain_plot_with_measured(tmp_path, capsys):
    measured = tmp_path / "bench.csv"
    measured.write_text("form,T,seconds\nabsorbed,64,2e-5\nabsorbed,4096,4e-5\nexpanded,4096,4e-4\n")
    png = tmp_path / "forms.png"
    out = _explain(capsys, "deepseek_v3", "--prompt-len", "4", "--decode-steps", "1", "--plot", str(png),
                   "--measured", str(measured), "--cost-device", "h200", "--plot-q-len", "1")
    assert f"plot: {png}" in out
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_measured_json_and_errors(tmp_path):
    from mla_compile.plot import load_measured

    p = tmp_path / "m.json"
    p.write_text(json.dumps({"measurements": [{"form": "absorbed", "T": 128, "seconds": 1e-5, "S": 1}]}))
    assert load_measured(p) == [{"form": "absorbed", "T": 128, "seconds": 1e-5, "S": 1}]
    p = tmp_path / "m.csv"
    p.write_text("form,T\nabsorbed,12\n")
    with pytest.raises(ValueError, match="seconds"):
        load_measured(p)


def test_verbose_prints_plan(capsys):
    out = _explain(capsys, "deepseek_v3", "--prompt-len", "4", "--decode-steps", "0", "--verbose")
    assert "MLA cost plan on cpu" in out and "<- chosen" in out


def test_calibrate(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("MLA_COMPILE_CACHE_DIR", str(tmp_path))
    assert cli.main(["calibrate", "--device", "cpu", "--no-save", "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["mem_bw"] > 0 and figures["measured"]


def test_torch_logs_shows_our_logger():
    env = dict(os.environ, TORCH_LOGS="+mla_compile")
    r = subprocess.run([sys.executable, "-m", "mla_compile", "explain", "deepseek_v3", "--prompt-len", "4",
                        "--decode-steps", "0"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "rewrote model.layers.0.self_attn (deepseek_v3) as" in r.stderr, r.stderr[-2000:]


def test_torch_logs_register():
    from mla_compile import torch_logs
    from torch._logging import _internal

    assert torch_logs.register()
    assert "mla_compile" in _internal.log_registry.log_alias_to_log_qnames
    import logging

    assert logging.getLogger("mla_compile") is not None


def test_readme_explain_output_is_what_the_command_prints(capsys):
    """The README pastes one `mla-compile explain` run; the same command must print it today."""
    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")).read()
    block = readme.split("$ mla-compile explain ", 1)[1].split("```", 1)[0]
    argv, pasted = block.split("\n", 1)
    printed = _explain(capsys, *argv.split())
    assert _without_timings(printed).rstrip("\n") == _without_timings(pasted).rstrip("\n")


def _without_timings(text: str) -> str:
    """The output with the seconds of its compile-time lines blanked (they differ from run to run)."""
    head, sep, times = text.partition("compile time (")
    return head + sep + re.sub(r"\d+\.\d+", "#", times)
