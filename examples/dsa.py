"""A DeepSeek-V3.2 (DSA) model compiled with backend="mla": the rewrite log shows the sparse form.

    python examples/dsa.py                 # CPU, tiny model, < 60 s (MLA_COMPILE_REMAINDER=eager)

HF builds the DSA mask densely: the indexer's top-k indices are scattered into a [B, 1, S, T] mask,
so attention costs O(S*T) whatever k is. The backend matches that scatter and, where the cache holds
more tokens than k, the cost model picks `sparse_absorbed`: gather the k selected latent rows per
query, O(S*k). Where T <= k the selection is every key and a dense form is exact.
"""

import os

import torch

os.environ.setdefault("MLA_COMPILE_REMAINDER", "eager")


def main():
    import mla_compile
    from mla_compile.tiny import tiny_model

    torch.manual_seed(0)
    k = 4
    model = tiny_model("deepseek_v32", index_topk=k, attn_implementation="sdpa")
    B, P = 2, 64                             # prompt longer than k: the decode steps attend to k of T keys
    ids = torch.randint(3, model.config.vocab_size, (B, P))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        # On this CPU, at tiny sizes, the cost model rightly finds dense attention cheaper; ask for the
        # H200's figures (options["device"]) to see the decision a GPU gets. The forms run on the CPU.
        compiled = torch.compile(model, backend="mla", dynamic=False, options={"device": "h200"})
        got = compiled(input_ids=ids).logits
    print(f"prefill S=T={P}, k={k}: max |compiled - eager| = {(got - ref).abs().max().item():.2e}")
    # one decode step over the cache (S=1, T=P+1 > k)
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        step = torch.randint(3, model.config.vocab_size, (B, 1))
        ref = model(input_ids=step, past_key_values=out.past_key_values, use_cache=True).logits
        out = model(input_ids=ids, use_cache=True)
        got = compiled(input_ids=step, past_key_values=out.past_key_values, use_cache=True).logits
    print(f"decode S=1, T={P + 1}, k={k}: max |compiled - eager| = {(got - ref).abs().max().item():.2e}")
    print()
    print(mla_compile.format_rewrite_log())
    forms = {r.form for r in mla_compile.rewrite_log() if r.status == "rewritten"}
    print("\nforms used:", sorted(f for f in forms if f))


if __name__ == "__main__":
    main()
