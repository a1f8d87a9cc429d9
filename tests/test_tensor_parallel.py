"""Tensor parallelism as transformers does it: a model loaded with `tp_plan="auto"` under
`torch.distributed.run` (2 processes, gloo, CPU), then `model.compile(backend="mla")`.

Each rank holds half the query heads and its column slice of kv_b_proj (the latent replicated); its
graph is matched with those heads, the forms run over that rank's W_UK / W_UV, and o_proj's reduction
stays where transformers put it. Against the unsharded model's eager tokens and logits; the backend
adds no collective to any graph.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mla_compile.tiny import tiny_model
from tests.helpers.e2e import rel_err

pytest.importorskip("accelerate", reason="transformers' tensor parallelism needs accelerate")

ROOT = Path(__file__).resolve().parents[1]
RANKS = 2


@pytest.mark.parametrize("family,form", [("deepseek_v3", "auto"), ("deepseek_v3", "absorbed"),
                                         ("deepseek_v32", "sparse_absorbed")])
def test_sharded_model_gives_the_unsharded_eager_answer(tmp_path, family, form):
    model = tiny_model(family, layers=2, seed=3)
    heads = model.config.num_attention_heads
    model.save_pretrained(tmp_path / "model")
    ids = torch.randint(3, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(4))
    torch.save(ids, tmp_path / "model" / "ids.pt")
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=4, do_sample=False)
        want_logits = model(want).logits

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={RANKS}",
                          str(ROOT / "tests" / "helpers" / "tp_worker.py"), str(tmp_path / "model"), form,
                          str(tmp_path / "out")], capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-4000:]
    for rank in range(RANKS):
        got = json.loads((tmp_path / f"out.{rank}.json").read_text())
        assert got["tokens"] == want.tolist(), f"rank {rank}"
        assert rel_err(torch.tensor(got["logits"]), want_logits) < 1e-4, f"rank {rank}"
        rewritten = [r for r in got["log"] if r["status"] == "rewritten"]
        assert rewritten and all(r["heads"] == heads // RANKS for r in rewritten), got["log"]
        assert {r["module"] for r in rewritten} == {f"model.layers.{i}.self_attn" for i in range(2)}, got["log"]
        assert not [r for r in got["log"] if r["status"] != "rewritten"], got["log"]
        if form != "auto":
            assert {r["form"] for r in rewritten} == {form}, got["log"]
        assert all(g["after"] == g["before"] for g in got["graphs"]), got["graphs"]
