"""Read the rewrite log: what the backend did to each MLA region, and why.

    python examples/read_the_log.py        # CPU, tiny model, < 60 s (MLA_COMPILE_REMAINDER=eager)

Every region the backend sees gives one record: module, status (rewritten or skipped), form, the
sizes, the cost model's predicted time per form, the crossover (when sizes are dynamic), and the
reason (why this form, or why the region was left alone). format_rewrite_log() prints them as a
table; rewrite_log() returns the records; MLA_COMPILE_LOG=path.jsonl writes them as JSON lines.
"""

import os

import torch

os.environ.setdefault("MLA_COMPILE_REMAINDER", "eager")


def main():
    import mla_compile
    from mla_compile.tiny import tiny_model

    torch.manual_seed(0)
    model = tiny_model("deepseek_v3", attn_implementation="sdpa")
    compiled = torch.compile(model, backend="mla")
    with torch.no_grad():
        ids = torch.randint(3, model.config.vocab_size, (2, 32))
        out = compiled(input_ids=ids, use_cache=True)                      # prefill: S = T = 32
        step = torch.randint(3, model.config.vocab_size, (2, 1))
        compiled(input_ids=step, past_key_values=out.past_key_values, use_cache=True)   # decode: S = 1

    print(mla_compile.format_rewrite_log())
    print()
    for rec in mla_compile.rewrite_log():
        print(f"{rec.module}  [graph {rec.graph}]  {rec.status}")
        if rec.status == "skipped":
            print(f"    skipped: {rec.reason}")
            continue
        sizes = ", ".join(f"{k}={v}" for k, v in rec.shapes.items() if v is not None)
        print(f"    family {rec.family}, core {rec.core}, dtype {rec.dtype}; sizes {sizes}")
        print(f"    form: {rec.form}")
        if rec.costs:
            ranked = sorted(rec.costs.items(), key=lambda kv: kv[1])
            print("    predicted: " + ", ".join(f"{f} {t * 1e6:.1f} us" for f, t in ranked)
                  + f"  (on {rec.device.get('name', '?')})")
        if rec.crossover:
            print("    crossover: " + rec.crossover.replace("\n", "\n               "))
        print(f"    reason: {rec.reason}")


if __name__ == "__main__":
    main()
