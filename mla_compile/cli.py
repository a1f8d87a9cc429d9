"""`mla-compile` (also `python -m mla_compile`): inspect what the backend does to a model.

    mla-compile explain deepseek_v3                       # a family name: tiny random-weight config
    mla-compile explain path/to/config.json --batch 8 --prompt-len 512 --decode-steps 2
    mla-compile explain path/to/model_dir --json          # a local directory with config.json (no weights read)
    mla-compile explain deepseek_v32 --verbose --emit-mlir out/ --plot forms.png --measured bench.csv
    mla-compile calibrate [--device cuda]

explain builds the model from its config (random init, nothing downloaded), compiles it with
backend="mla" (the rest of the graph eager unless --inductor), runs a prefill of --prompt-len tokens
and --decode-steps decode steps, and prints the rewrite log: one row per attention module and graph.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

# --json output: {"schema": JSON_SCHEMA_ID, "config": ..., "model": ..., "run": {...}, "records": [record, ...]}
JSON_SCHEMA_ID = "mla-compile/explain/v1"
RECORD_FIELDS: dict[str, tuple] = {      # field -> allowed JSON types
    "module": (str,), "status": (str,), "form": (str, type(None)), "family": (str, type(None)),
    "shapes": (dict,), "reason": (str,), "core": (str, type(None)), "dtype": (str, type(None)),
    "costs": (dict,), "expressions": (dict,), "crossover": (str, type(None)), "device": (dict,),
    "graph": (int, type(None)), "flags": (dict,), "runs": (dict,),
}
TOP_FIELDS: dict[str, tuple] = {"schema": (str,), "config": (str,), "model": (str,), "family": (str, type(None)),
                                "run": (dict,), "records": (list,), "skipped": (int,), "rewritten": (int,)}


def validate_explain_json(doc: dict) -> None:
    """Raise ValueError unless doc follows the --json schema (documented in docs/usage.md)."""
    for k, types in TOP_FIELDS.items():
        if k not in doc or not isinstance(doc[k], types):
            raise ValueError(f"--json: field {k!r} missing or not {types}")
    if doc["schema"] != JSON_SCHEMA_ID:
        raise ValueError(f"--json: schema {doc['schema']!r} != {JSON_SCHEMA_ID!r}")
    for i, r in enumerate(doc["records"]):
        for k, types in RECORD_FIELDS.items():
            if k not in r or not isinstance(r[k], types):
                raise ValueError(f"--json: records[{i}].{k} missing or not {types}")
        if r["status"] not in ("rewritten", "skipped"):
            raise ValueError(f"--json: records[{i}].status {r['status']!r}")
        if r["status"] == "rewritten" and not r["form"]:
            raise ValueError(f"--json: records[{i}] rewritten without a form")
        if not all(isinstance(v, (int, float)) for v in r["costs"].values()):
            raise ValueError(f"--json: records[{i}].costs must map form -> seconds")


# --------------------------------------------------------------------------------------------- #
# building the model
# --------------------------------------------------------------------------------------------- #

def _dtype(name: str):
    import torch

    try:
        dt = getattr(torch, name)
    except AttributeError:
        raise SystemExit(f"--dtype: unknown dtype {name!r}") from None
    if not isinstance(dt, torch.dtype):
        raise SystemExit(f"--dtype: {name!r} is not a dtype")
    return dt


def build_model(config: str, dtype, device: str, attn: str):
    """(model, label, family) from a family name, a config.json path or a model directory."""
    import torch

    from mla_compile.tiny import MLA_FAMILIES, _quiet, tiny_model

    if config in MLA_FAMILIES and not os.path.exists(config):
        model = tiny_model(config, dtype=dtype, attn_implementation=attn)
        return model.to(device), f"{config} (tiny config)", config
    path = Path(config)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise SystemExit(f"explain: {config!r} is neither an MLA family ({', '.join(MLA_FAMILIES)}) nor a "
                         "config.json path nor a directory holding one")
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    with _quiet():
        cfg = AutoConfig.from_pretrained(str(path.parent), local_files_only=True)
        text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        if not hasattr(text_cfg, "kv_lora_rank"):
            print(f"note: {path} has no kv_lora_rank: not an MLA model; the log will say so", file=sys.stderr)
        torch.manual_seed(0)
        try:
            model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=dtype)
        except (ValueError, KeyError):
            model = AutoModel.from_config(text_cfg, attn_implementation=attn, dtype=dtype)
    model.eval().to(device)
    return model, str(path), getattr(text_cfg, "model_type", None)


def _vocab(model) -> int:
    cfg = model.config
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return int(getattr(cfg, "vocab_size", 128) or 128)


def _run(model, batch: int, prompt_len: int, decode_steps: int, device: str):
    import torch
    from transformers import DynamicCache

    g = torch.Generator().manual_seed(0)
    vocab = _vocab(model)
    ids = torch.randint(min(3, vocab - 1), vocab, (batch, prompt_len), generator=g).to(device)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        try:
            cache = DynamicCache(config=model.config)
        except TypeError:
            cache = DynamicCache()
        out = model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        past = getattr(out, "past_key_values", None)
        for _ in range(decode_steps):
            tok = torch.randint(min(3, vocab - 1), vocab, (batch, 1), generator=g).to(device)
            mask = torch.cat([mask, torch.ones_like(tok)], dim=1)
            out = model(input_ids=tok, attention_mask=mask, past_key_values=past, use_cache=True)
            past = getattr(out, "past_key_values", past)
    return ids


# --------------------------------------------------------------------------------------------- #
# explain
# --------------------------------------------------------------------------------------------- #

def _static_shapes(rec) -> dict | None:
    s = rec.shapes
    keys = ("B", "S", "T", "H", "r", "dr", "dn", "dv")
    if all(isinstance(s.get(k), int) for k in keys):
        return s
    return None


def _plan_for(shapes: dict, dtype, device, flags: dict):
    """The plan the backend's decision made for a record (its shapes and its causal / mask flags)."""
    from mla_compile.cost import plan

    k = shapes.get("k")
    return plan(batch=shapes["B"], q_len=shapes["S"], kv_len=shapes["T"], heads=shapes["H"],
                kv_lora_rank=shapes["r"], qk_rope_head_dim=shapes["dr"], qk_nope_head_dim=shapes["dn"],
                v_head_dim=shapes["dv"], topk=k if isinstance(k, int) else None, dtype=dtype, device=device,
                **flags)


def _plot_shapes(records) -> dict | None:
    """One layer's shapes for the plot: the first rewritten record, at its query length and batch."""
    for r in records:
        if r.status != "rewritten":
            continue
        s = dict(r.shapes)
        out = {}
        for key in ("B", "S", "H", "r", "dr", "dn", "dv", "k"):
            v = s.get(key)
            if isinstance(v, int):
                out[key] = v
            elif key in ("B", "S"):
                out[key] = 1
            elif key == "k" and v is not None:
                try:
                    from mla_compile.passes.choose import _static_topk

                    import sympy
                    out[key] = _static_topk(sympy.sympify(v)) if not isinstance(v, int) else v
                except Exception:  # noqa: BLE001
                    out[key] = None
        if all(k in out for k in ("H", "r", "dr", "dn", "dv")):
            return out
    return None


def cmd_explain(a) -> int:
    import torch

    import mla_compile
    from mla_compile.rewrite_log import format_rewrite_log

    dtype = _dtype(a.dtype)
    model, label, family = build_model(a.config, dtype, a.device, a.attn)
    mla_compile.reset()
    torch._dynamo.reset()
    options: dict[str, Any] = {"remainder": "inductor" if a.inductor else "eager", "form": a.form}
    if a.cost_device:
        options["device"] = a.cost_device
    compiled = torch.compile(model, backend="mla", options=options, dynamic=a.dynamic)
    _run(compiled, a.batch, a.prompt_len, a.decode_steps, a.device)
    records = mla_compile.rewrite_log()
    run = {"batch": a.batch, "prompt_len": a.prompt_len, "decode_steps": a.decode_steps, "dtype": a.dtype,
           "device": a.device, "form": a.form, "cost_device": a.cost_device,
           "remainder": options["remainder"], "attn_implementation": a.attn}
    skipped = sum(r.status == "skipped" for r in records)
    doc = {"schema": JSON_SCHEMA_ID, "config": a.config, "model": type(model).__name__, "family": family,
           "run": run, "records": [json.loads(json.dumps(r.to_json(), default=str)) for r in records],
           "rewritten": len(records) - skipped, "skipped": skipped}
    extra: dict[str, Any] = {}

    if a.emit_mlir:
        extra["mlir"] = _emit_mlir(model, a, label)
    if a.plot:
        extra["plot"] = _plot(records, a, dtype)
    if extra:
        doc["artifacts"] = extra

    if a.json:
        validate_explain_json(doc)
        print(json.dumps(doc, indent=2, default=str))
        return 0
    print(f"mla-compile explain: {label}, {type(model).__name__}; batch {a.batch}, prompt {a.prompt_len}, "
          f"{a.decode_steps} decode steps, {a.dtype} on {a.device}, form={a.form}, remainder={options['remainder']}")
    print()
    print(f"{len(records) - skipped} region(s) rewritten, {skipped} left alone "
          f"(the first graph is the prefill, later ones decode steps)")
    print()
    print(format_rewrite_log(records))
    if a.verbose:
        seen = set()
        for r in records:
            if r.status != "rewritten":
                continue
            shapes = _static_shapes(r)
            key = (r.graph, tuple(sorted((k, str(v)) for k, v in r.shapes.items())))
            if key in seen:
                continue
            seen.add(key)
            print(f"\n== graph {r.graph}, {r.module} and every layer of the same shapes ==")
            if shapes is None:
                for f, e in r.expressions.items():
                    print(f"  {f}: {e}")
                continue
            print(_plan_for(shapes, dtype if dtype.is_floating_point else torch.float32,
                            a.cost_device or ("cuda" if a.device.startswith("cuda") else "cpu"), r.flags).explain())
    for kind, info in extra.items():
        print()
        if kind == "mlir":
            for ot, res in info.items():
                print(f"MLIR {ot}: {res}")
        else:
            print(f"plot: {info}")
    return 0


def _emit_mlir(model, a, label) -> dict[str, str]:
    """DIR/<config>.<output type>.mlir for the whole prefill; where an op elsewhere in the model has
    no lowering, DIR/<config>.<module>.<output type>.mlir for each rewritten attention region."""
    import torch

    from mla_compile import mlir

    out_dir = Path(a.emit_mlir)
    out_dir.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, _vocab(model), (a.batch, a.prompt_len), generator=g).to(a.device)
    torch._dynamo.reset()
    cap = mlir.capture(model, ids, form=a.form, cost_device=a.cost_device)
    stem = Path(a.config).name.replace(".json", "") if os.path.exists(a.config) else a.config
    forms = ", ".join(sorted(set(cap.forms()))) or "none"
    info = {}
    for ot in mlir.OUTPUT_TYPES:
        try:
            text = mlir.lower(cap, ot).text
        except mlir.MLIRExportError as e:
            written = []
            for name, region in mlir.regions(cap).items():
                path = out_dir / f"{stem}.{name}.{ot}.mlir"
                path.write_text(mlir.lower_region(cap, region, ot), encoding="utf-8")
                written.append(str(path))
            reason = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
            info[ot] = (f"the whole model does not lower ({reason}); {len(written)} attention region(s) "
                        f"written alone: {', '.join(written) or 'none'}")
            continue
        except Exception as e:  # noqa: BLE001 - reported per output type
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            info[ot] = f"FAILED: {type(e).__name__}: {first}"
            continue
        path = out_dir / f"{stem}.{ot}.mlir"
        path.write_text(text, encoding="utf-8")
        info[ot] = f"{path} ({len(text):,} chars; forms {forms})"
    return info


def _plot(records, a, dtype) -> str:
    import torch

    from mla_compile.plot import load_measured, plot_forms

    shapes = _plot_shapes(records)
    if shapes is None:
        return "no rewritten MLA region: nothing to plot"
    if a.plot_q_len is not None:
        shapes["S"] = a.plot_q_len
    measured = load_measured(a.measured) if a.measured else None
    device = a.cost_device or ("cuda" if a.device.startswith("cuda") else "cpu")
    pdt = dtype if dtype.is_floating_point else torch.float32
    flags = next(r.flags for r in records if r.status == "rewritten")
    path = plot_forms(shapes, a.plot, device=device, dtype=pdt, measured=measured, flags=flags)
    return str(path)


def cmd_calibrate(a) -> int:
    from mla_compile.cost import calibrate

    dev = calibrate(a.device, save=not a.no_save)
    figures = json.loads(dev.to_json())
    if a.json:
        print(json.dumps(figures, indent=2))
        return 0
    print(f"calibrated {figures.get('name')} ({'measured' if figures.get('measured') else 'table'}: {figures.get('source')})")
    for k, v in figures.items():
        if k in ("name", "source"):
            continue
        print(f"  {k:<18} {v}")
    if not a.no_save:
        from mla_compile.cost.calibrate import cache_dir

        print(f"saved under {cache_dir()}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mla-compile", description="Inspect the mla torch.compile backend.")
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("explain", help="compile a model from its config and print the rewrite table",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Build a model from a config (random weights, nothing downloaded), compile it "
                                   "with backend='mla', run a prefill and decode steps on a DynamicCache, and print "
                                   "one row per attention module and compiled graph. CONFIG: an MLA family name of "
                                   "the installed transformers (e.g. deepseek_v3, deepseek_v32, kimi_linear, "
                                   "minicpm3, mistral4; see the README's family table), a config.json path, or a "
                                   "model directory (only config.json is read).")
    e.add_argument("config", help="an MLA family name (tiny config), a config.json path, or a model directory")
    e.add_argument("--batch", type=int, default=1, help="batch size of the prompt")
    e.add_argument("--prompt-len", type=int, default=16, help="prompt tokens (the prefill's query length)")
    e.add_argument("--decode-steps", type=int, default=1, help="single-token decode steps after the prefill")
    e.add_argument("--dtype", default="float32", help="model dtype: float32, bfloat16, float16")
    e.add_argument("--device", default="cpu", help="where the model runs: cpu, cuda, cuda:1")
    e.add_argument("--form", default="auto",
                   choices=["auto", "expanded", "absorbed", "sparse", "sparse_absorbed", "sparse_expanded"],
                   help="the cost model's choice, or a forced form")
    e.add_argument("--cost-device", default=None, help="cost model device: a table name (h100, h200, cpu, ...)")
    e.add_argument("--attn", default="eager", choices=["eager", "sdpa"], help="HF attn_implementation")
    e.add_argument("--dynamic", default=None, action=argparse.BooleanOptionalAction,
                   help="torch.compile dynamic= (default: Dynamo's own choice: static, then dynamic on recompiles)")
    e.add_argument("--inductor", action="store_true", help="compile the rest of each graph with Inductor")
    e.add_argument("--json", action="store_true", help=f"print the records as JSON (schema {JSON_SCHEMA_ID})")
    e.add_argument("--verbose", "-v", action="store_true", help="also print the cost plan of each shape")
    e.add_argument("--emit-mlir", metavar="DIR", help="write the prefill's MLIR of each output type to DIR")
    e.add_argument("--plot", metavar="PNG", help="draw predicted time of each form against key length")
    e.add_argument("--plot-q-len", type=int, default=None, help="query length of the plot (default: the first rewritten graph's)")
    e.add_argument("--measured", metavar="FILE", help="CSV or JSON with form,T,seconds[,S,B] to draw beside the plot")
    e.set_defaults(fn=cmd_explain)
    c = sub.add_parser("calibrate", help="measure this device for the cost model and cache the figures",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    c.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    c.add_argument("--no-save", action="store_true", help="print the figures without caching them")
    c.add_argument("--json", action="store_true", help="print the figures as JSON")
    c.set_defaults(fn=cmd_calibrate)
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    try:
        from mla_compile import torch_logs

        torch_logs.register()
    except Exception:  # noqa: BLE001
        pass
    return int(a.fn(a) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
