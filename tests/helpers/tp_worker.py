"""One rank of tests/test_tensor_parallel.py, run under `torch.distributed.run` (gloo, CPU).

    python -m torch.distributed.run --nproc-per-node 2 tests/helpers/tp_worker.py MODEL_DIR FORM OUT

Loads the saved model sharded by transformers (`tp_plan="auto"`), compiles it with backend="mla"
(form FORM, the rest of each graph eager), generates from MODEL_DIR/ids.pt, and writes OUT.<rank>.json:
the tokens, the logits of one forward over them, each rank's rewrite log, and the collective
operations of every graph before and after the rewrite (the backend must add none)."""

from __future__ import annotations

import json
import os
import re
import sys

import torch
import torch.distributed as dist

import mla_compile
import mla_compile.backend as backend

_COLLECTIVE = re.compile(r"all_gather|all_reduce|reduce_scatter|all_to_all|broadcast|redistribute|full_tensor")


def _collectives(gm) -> list[str]:
    return sorted(str(n.target) for n in gm.graph.nodes
                  if n.op in ("call_function", "call_method") and _COLLECTIVE.search(str(n.target)))


def main(path: str, form: str, out: str) -> None:
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    graphs = []
    rewrite_graph = backend.rewrite_graph

    def recording(gm, opts, graph_id, *times):
        before = _collectives(gm)
        records = rewrite_graph(gm, opts, graph_id, *times)
        graphs.append(dict(before=before, after=_collectives(gm)))
        return records

    backend.rewrite_graph = recording
    model = AutoModelForCausalLM.from_pretrained(path, distributed_config=DistributedConfig(tp_plan="auto"),
                                                 dtype=torch.float32).eval()
    ids = torch.load(os.path.join(path, "ids.pt"))
    with torch.no_grad():
        model.compile(backend="mla", options={"remainder": "eager", "form": form})
        tokens = model.generate(ids, max_new_tokens=4, do_sample=False)
        logits = model(tokens).logits
    log = [dict(module=r.module, status=r.status, form=r.form, heads=r.shapes.get("H"), reason=r.reason)
           for r in mla_compile.rewrite_log()]
    with open(f"{out}.{rank}.json", "w") as f:
        json.dump(dict(rank=rank, tokens=tokens.tolist(), logits=logits.tolist(), log=log, graphs=graphs), f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
