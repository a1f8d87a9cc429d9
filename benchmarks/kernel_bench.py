"""The MLA kernels against HF's math, Inductor on it, FlashMLA and the roofline floor.

    python benchmarks/kernel_bench.py [--quick] [--parts absorbed,sparse,prefill,host] [--out DIR]

(Not named kernels.py: run as a script, its folder comes first on sys.path, and a kernels.py there
would shadow the PyPI package `kernels` that transformers imports.)

Needs CUDA. Times are medians of triton.testing.do_bench (CUDA events, L2 flushed between runs), in
microseconds; "gr" columns are CUDA-graph replays (do_bench_cudagraph: GPU time without Python launch
cost, L2 not flushed). The floor is max(FLOPs / bf16 matmul rate, bytes / copy rate), both rates
measured at the start of the run. "core" = the attention over the latent with the absorbed query
given (what FlashMLA's kernel does); "op" = the whole absorbed form (q absorption, kernel, output
projection), comparable with HF's math, which expands the latent every step. FlashMLA is the
`sgl-flash-mla` package's legacy SM90 dense decode (64 or 128 heads only); without the package its
columns are left out. "host" is the CPU-side time of one absorbed op call (see host_table). Writes
kernels-<device>.md and .csv to --out (else $OUT, else benchmarks/results/).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import traceback

import torch
import torch.nn.functional as F

import common

DEV = "cuda"
DT = torch.bfloat16
R, DR, DN, DV = 512, 64, 128, 128
SCALE = 1 / math.sqrt(DN + DR)


def bench(fn, rep=60, graph=False):
    """Median microseconds of `fn` (None if it fails)."""
    from triton.testing import do_bench, do_bench_cudagraph

    try:
        fn()
        torch.cuda.synchronize()
        if graph:
            return do_bench_cudagraph(fn, rep=rep, return_mode="median") * 1e3
        return do_bench(fn, warmup=10, rep=rep, return_mode="median") * 1e3
    except Exception as e:  # noqa: BLE001
        print(f"  ! {type(e).__name__}: {str(e)[:200]}", file=sys.stderr, flush=True)
        torch.cuda.empty_cache()
        return None


def ratio(a, b):
    return None if a is None or b is None else round(a / b, 2)


def percent(a, b):
    return None if a is None or b is None else f"{100 * a / b:.0f}%"


def floor_us(flops, nbytes, rates):
    return max(flops / rates["matmul"], nbytes / rates["copy"]) * 1e6


def flash_mla_available() -> bool:
    try:
        import flash_mla  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


# ---------------------------------------------------------------------------------------------------
# inputs and the baselines

def inputs(B, H, S, T, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    rn = lambda *s: torch.randn(*s, device=DEV, dtype=DT, generator=g)  # noqa: E731
    w = rn(H * (DN + DV), R) / R ** 0.5                          # kv_b_proj.weight
    wv = w.view(H, DN + DV, R)
    x = dict(q_nope=rn(B, H, S, DN), q_rope=rn(B, H, S, DR), latent=rn(B, 1, T, R), k_rope=rn(B, 1, T, DR),
             w=w, w_uk=wv[:, :DN], w_uv=wv[:, DN:])
    x["q_lat"] = torch.einsum("bhsd,hdr->bhsr", x["q_nope"], x["w_uk"])
    return x


def hf_math(q_nope, q_rope, latent, k_rope, w, mask, scale: float):
    """HF transformers 5.x eager MLA core: expand the latent, build K, matmul attention."""
    B, H, S, dn = q_nope.shape
    T = latent.shape[2]
    dr = q_rope.shape[-1]
    kv = F.linear(latent, w).view(B, T, H, -1).transpose(1, 2)          # [B, H, T, dn+dv]
    k_nope, v = torch.split(kv, [dn, kv.shape[-1] - dn], dim=-1)
    k = k_nope.new_empty(B, H, T, dn + dr)
    k[..., :dn].copy_(k_nope)
    k[..., dn:].copy_(k_rope.expand(B, H, T, dr))
    q = torch.cat([q_nope, q_rope], -1)
    scores = torch.matmul(q, k.transpose(2, 3)) * scale
    if mask is not None:
        scores = scores + mask
    p = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(p, v).transpose(1, 2).contiguous()


_COMPILED = {}


def compiled_hf_math(*args):
    if "fn" not in _COMPILED:
        _COMPILED["fn"] = torch.compile(hf_math)
    return _COMPILED["fn"](*args)


def hf_times(x, mask, rep):
    """(HF eager, Inductor on HF) microseconds on the inputs `x`."""
    args = (x["q_nope"], x["q_rope"], x["latent"], x["k_rope"], x["w"], mask, SCALE)
    return bench(lambda: hf_math(*args), rep=rep), bench(lambda: compiled_hf_math(*args), rep=rep)


def flash_mla_fn(q_lat, q_rope, latent, k_rope, scale):
    """FlashMLA dense decode (sgl-flash-mla, legacy SM90 kernel) on the same data, absorbed q given."""
    import flash_mla
    import triton

    B, H, S, _ = q_lat.shape
    T = latent.shape[2]
    q = torch.cat([q_lat, q_rope], -1).transpose(1, 2).contiguous()            # [B, S, H, 576]
    nb = triton.cdiv(T, 64)
    cache = torch.zeros(B * nb * 64, R + DR, device=DEV, dtype=DT)
    cache.view(B, nb * 64, R + DR)[:, :T] = torch.cat([latent[:, 0], k_rope[:, 0]], -1)
    cache = cache.view(B * nb, 64, 1, R + DR)
    table = torch.arange(B * nb, device=DEV, dtype=torch.int32).view(B, nb)
    lens = torch.full((B,), T, device=DEV, dtype=torch.int32)
    meta, _ = flash_mla.get_mla_metadata()

    def run():
        return flash_mla.flash_mla_with_kvcache(q, cache, table, lens, R, meta, None, softmax_scale=scale,
                                                causal=False, use_legacy=True)[0]
    return run


def decode_point(core_fn, op_fn, flops, nbytes, rates):
    """One decode point: the core's and the whole op's times (us), the floor of the core and the share
    of it the core reaches (CUDA-graph time)."""
    core_g = bench(core_fn, graph=True)
    fl = floor_us(flops, nbytes, rates)
    return dict(core_ev=bench(core_fn), core_gr=core_g, op_ev=bench(op_fn), floor=fl, floor_pct=percent(fl, core_g))


# ---------------------------------------------------------------------------------------------------
# the tables

def absorbed_table(rates, quick, flash):
    from mla_compile.kernels.absorbed_decode import absorbed_decode, absorbed_latent_attention

    cols = [("H", "H"), ("B", "B"), ("T", "T"), ("core_ev", "ours core ev"), ("core_gr", "ours core gr"),
            ("op_ev", "ours op ev"), ("op_gr", "ours op gr")]
    if flash:
        cols += [("fm_ev", "FlashMLA ev"), ("fm_gr", "FlashMLA gr"), ("core_over_fm", "core/FlashMLA")]
    cols += [("hf", "HF eager"), ("ind", "Inductor(HF)"), ("hf_over_op", "HF/op"), ("ind_over_op", "Ind/op"),
             ("floor", "floor core"), ("floor_pct", "floor/core")]
    t = common.Table("Absorbed decode (S=1, bf16, no mask), microseconds", cols, text=(
        "ev = CUDA events around eager launches (Python launch cost included, L2 flushed); gr = CUDA-graph "
        "replay (GPU time). The core/FlashMLA and floor/core ratios use the gr columns."))
    hf_set = {(128, 1, 4096), (128, 8, 4096), (128, 32, 4096), (128, 8, 16384), (128, 64, 1024),
              (32, 8, 4096), (16, 8, 4096)}
    for H in (128, 32, 16):
        for B in ((8,) if quick else (1, 8, 32, 64)):
            for T in ((4096,) if quick else (1024, 4096, 16384, 65536)):
                if B * T > (1 << 21):
                    continue
                x = inputs(B, H, 1, T)
                a = (x["q_nope"], x["q_rope"], x["latent"], x["k_rope"], x["w_uk"], x["w_uv"])
                row = dict(H=H, B=B, T=T, **decode_point(
                    lambda: absorbed_latent_attention(x["q_lat"], x["q_rope"], x["latent"], x["k_rope"], None,
                                                      SCALE, False),
                    lambda: absorbed_decode(*a, None, SCALE, False),
                    2 * B * H * T * (R + DR + R), 2 * (B * T * (R + DR) + B * H * (R + DR) + B * H * R), rates))
                row["op_gr"] = op_g = bench(lambda: absorbed_decode(*a, None, SCALE, False), graph=True)
                if flash and H in (64, 128):
                    f = flash_mla_fn(x["q_lat"], x["q_rope"], x["latent"], x["k_rope"], SCALE)
                    row.update(fm_ev=bench(f), fm_gr=bench(f, graph=True))
                    row["core_over_fm"] = ratio(row["core_gr"], row["fm_gr"])
                if (H, B, T) in hf_set:
                    row["hf"], row["ind"] = hf_times(x, None, rep=100)
                    row.update(hf_over_op=ratio(row["hf"], op_g), ind_over_op=ratio(row["ind"], op_g))
                t.rows.append(row)
                del x
    return t


def sparse_table(rates, quick, flash):
    from mla_compile.kernels.sparse_decode import sparse_absorbed_decode, sparse_latent_attention

    t = common.Table("Sparse (DSA) absorbed decode, k=2048, H=128, S=1, bf16, microseconds",
                     [("B", "B"), ("T", "T"), ("core_ev", "ours core ev"), ("core_gr", "ours core gr"),
                      ("op_ev", "ours op ev"), ("floor", "floor core"), ("floor_pct", "floor/core")],
                     text="op ev includes check_indices' range check (a device-to-host sync) and the two bmm's.")
    H, k = 128, 2048
    for B in (1, 8):
        for T in (8192, 131072):
            x = inputs(B, H, 1, T)
            g = torch.Generator(device=DEV).manual_seed(1)
            idx = torch.stack([torch.randperm(T, device=DEV, generator=g)[:k] for _ in range(B)]).view(B, 1, k)
            idx = idx.sort(-1).values.to(torch.int32)
            a = (x["q_nope"], x["q_rope"], x["latent"], x["k_rope"], x["w_uk"], x["w_uv"])
            t.rows.append(dict(B=B, T=T, **decode_point(
                lambda: sparse_latent_attention(x["q_lat"], x["q_rope"], x["latent"], x["k_rope"], idx, None,
                                                SCALE, False),
                lambda: sparse_absorbed_decode(*a, idx, None, SCALE, False),
                2 * B * H * k * (R + DR + R), 2 * (B * k * (R + DR) + B * H * (2 * R + DR)), rates)))
            del x
    return t


def prefill_table(rates, quick, flash):
    from mla_compile.kernels.expanded_prefill import expanded_prefill

    t = common.Table("Expanded prefill, causal, B=1, S=T=4096, bf16, microseconds",
                     [("H", "H"), ("variant", "variant"), ("ours", "ours"), ("hf", "HF eager"),
                      ("ind", "Inductor(HF)"), ("ind_over_ours", "Ind/ours"), ("floor", "floor")])
    B, S = 1, 4096
    for H in ((128,) if quick else (128, 32)):
        x = inputs(B, H, S, S)
        fmask = torch.full((S, S), torch.finfo(DT).min, device=DEV, dtype=DT).triu(1)[None, None]
        a = (x["q_nope"], x["q_rope"], x["latent"], x["k_rope"], x["w_uk"], x["w_uv"])
        hf, ind = hf_times(x, fmask, rep=200)
        fl = floor_us(2 * B * S * R * H * (DN + DV) + 2 * B * H * S * S / 2 * (DN + DR + DV),
                      2 * (B * S * (R + DR) + H * (DN + DV) * R + B * H * S * (DN + DR + DV)), rates)
        for variant, mask, causal in (("is_causal", None, True), ("HF float causal mask", fmask, False)):
            ours = bench(lambda: expanded_prefill(*a, mask, SCALE, causal))
            t.rows.append(dict(H=H, variant=variant, ours=ours, hf=hf, ind=ind, ind_over_ours=ratio(ind, ours),
                               floor=fl))
        del x, fmask
    return t


def host_table(rates, quick, flash):
    """The CPU-side time of one `torch.ops.mla.absorbed` call at decode sizes: what a decode step's
    Python pays per layer before any kernel runs (the launch plan is cached; nothing is decided per
    call). Measured per call with perf_counter, the launch queue drained every 50 calls so that the
    host never waits on the GPU; beside it the back-to-back wall time per call (CUDA events)."""
    import statistics

    import mla_compile.passes.forms  # noqa: F401  (registers torch.ops.mla)

    op = torch.ops.mla.absorbed.default
    t = common.Table("Host time of one mla.absorbed call, S=1, bf16, microseconds",
                     [("B", "B"), ("H", "H"), ("T", "T"), ("host", "host (median)"), ("host_min", "host (min)"),
                      ("wall", "wall per call, back to back")])
    for B, H, T in ((1, 16, 256), (1, 128, 256), (8, 128, 4096)) if quick else \
            ((1, 16, 256), (1, 128, 256), (8, 16, 4096), (8, 128, 4096), (32, 128, 4096)):
        x = inputs(B, H, 1, T)
        mask = torch.ones(B, 1, 1, T, dtype=torch.bool, device=DEV)
        args = (x["q_nope"], x["q_rope"], x["latent"], x["k_rope"], x["w_uk"], x["w_uv"], mask, SCALE, False, None)
        for _ in range(30):
            op(*args)
        torch.cuda.synchronize()
        host = []
        for i in range(400):
            t0 = time.perf_counter()
            op(*args)
            host.append(time.perf_counter() - t0)
            if i % 50 == 49:
                torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(200):
            op(*args)
        end.record()
        torch.cuda.synchronize()
        t.rows.append(dict(B=B, H=H, T=T, host=statistics.median(host) * 1e6, host_min=min(host) * 1e6,
                           wall=start.elapsed_time(end) / 200 * 1e3))
        del x
    return t


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few points per table")
    ap.add_argument("--out", help="result folder (default: $OUT, else benchmarks/results)")
    ap.add_argument("--parts", default="absorbed,sparse,prefill,host",
                    help="tables to run, comma-separated: absorbed, sparse, prefill, host")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("kernel_bench.py needs CUDA")
    t0 = time.time()
    flash = flash_mla_available()
    rates = {"matmul": common.matmul_rate(DEV, DT), "copy": common.copy_rate(DEV)}
    notes = [f"FlashMLA: {'sgl-flash-mla, legacy (SM90) dense decode' if flash else 'not installed (columns left out)'}",
             f"measured ceilings: bf16 8192^3 matmul {rates['matmul'] / 1e12:.0f} TFLOP/s, device copy "
             f"{rates['copy'] / 1e12:.2f} TB/s (bytes read + written)",
             f"shapes: r={R}, dr={DR}, dn=dv={DN}; times are medians in microseconds"]
    tables, failed = [], []
    parts = {"absorbed": absorbed_table, "sparse": sparse_table, "prefill": prefill_table, "host": host_table}
    for part in (parts[p] for p in args.parts.split(",")):
        try:
            tables.append(part(rates, args.quick, flash))
            torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001
            traceback.print_exc()
            failed.append(f"{part.__name__} failed: see the log")
        print(f"[{time.time() - t0:.0f}s] {part.__name__}", file=sys.stderr, flush=True)
    common.write_report(f"kernels-{common.device_label()}",
                        common.header(f"MLA kernels: {common.device_name()}", notes=notes), tables, args.out,
                        tail=failed)


if __name__ == "__main__":
    main()
