"""One table of the MLA Triton kernels against HF's math, Inductor on it, FlashMLA and the roofline floor.

    python benchmarks/bench_kernels.py [--quick]

Needs CUDA. Times are medians of triton.testing.do_bench (CUDA events, L2 flushed between runs), in
microseconds. The floor is max(FLOPs / measured bf16 matmul rate, bytes / measured copy rate), with
both rates measured at the start of the run. "core" = the attention over the latent with the
absorbed query given (what FlashMLA's kernel does); "op" = the whole absorbed form (q absorption,
kernel, output projection), comparable with HF's math, which expands the latent every step.
Writes the table to $OUT (if set) and to benchmarks/results/kernels-<device>.md.
"""

from __future__ import annotations

import datetime
import math
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench, do_bench_cudagraph

from mla_compile.kernels.absorbed_decode import absorbed_decode, absorbed_latent_attention
from mla_compile.kernels.expanded_prefill import expanded_prefill
from mla_compile.kernels.sparse_decode import sparse_absorbed_decode, sparse_latent_attention

DEV = "cuda"
DT = torch.bfloat16
R, DR, DN, DV = 512, 64, 128, 128
QUICK = "--quick" in sys.argv
LINES: list[str] = []


def out(line=""):
    print(line, flush=True)
    LINES.append(line)


def bench(fn, rep=60, graph=False):
    try:
        fn()
        torch.cuda.synchronize()
        if graph:       # CUDA-graph replays: GPU time without Python launch overhead (L2 not flushed)
            return do_bench_cudagraph(fn, rep=rep, return_mode="median") * 1e3
        return do_bench(fn, warmup=10, rep=rep, return_mode="median") * 1e3   # us
    except Exception as e:  # noqa: BLE001
        print(f"  ! {type(e).__name__}: {str(e)[:200]}", file=sys.stderr, flush=True)
        torch.cuda.empty_cache()
        return None


def save_results(stem: str, lines: list[str], append: bool = False) -> str:
    """Write a report to benchmarks/results/<stem>-<device>.md (appended with append=True) and copy the
    file to $OUT where set (the device machine's way back). Returns the path."""
    dev = torch.cuda.get_device_name().replace(" ", "-").replace("/", "-")
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"{stem}-{dev}.md")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a" if append else "w") as f:
        f.write("\n".join(lines) + "\n")
    if os.environ.get("OUT"):
        import shutil

        shutil.copy(path, os.path.join(os.environ["OUT"], os.path.basename(path)))
    return path


def fmt(x, nd=1):
    return "n/a" if x is None else (f"{x:.{nd}f}" if x < 1e4 else f"{x:.0f}")


def ratio(a, b):
    return "n/a" if a is None or b is None else f"{a / b:.2f}"


# ---------------------------------------------------------------------------------------------------
# ceilings

def ceilings():
    a = torch.randn(8192, 8192, device=DEV, dtype=DT)
    b = torch.randn(8192, 8192, device=DEV, dtype=DT)
    t = do_bench(lambda: a @ b, warmup=25, rep=200, return_mode="median") * 1e-3
    flops = 2 * 8192 ** 3 / t
    del a, b
    return flops, copy_rate()


def copy_rate() -> float:
    """bytes/s of a 1 GiB device copy, bytes read + written."""
    x = torch.randn(1 << 29, device=DEV, dtype=DT)        # 1 GiB
    y = torch.empty_like(x)
    t = do_bench(lambda: y.copy_(x), warmup=10, rep=200, return_mode="median") * 1e-3
    bw = 2 * x.numel() * x.element_size() / t
    del x, y
    torch.cuda.empty_cache()
    return bw


# ---------------------------------------------------------------------------------------------------
# inputs and the baselines

def inputs(B, H, S, T, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    rn = lambda *s: torch.randn(*s, device=DEV, dtype=DT, generator=g)  # noqa: E731
    w = rn(H * (DN + DV), R) / R ** 0.5                          # kv_b_proj.weight
    wv = w.view(H, DN + DV, R)
    return dict(q_nope=rn(B, H, S, DN), q_rope=rn(B, H, S, DR), latent=rn(B, 1, T, R), k_rope=rn(B, 1, T, DR),
                w=w, w_uk=wv[:, :DN], w_uv=wv[:, DN:])


def hf_math(q_nope, q_rope, latent, k_rope, w, mask, scale: float):
    """HF transformers 5.x eager MLA core (MLA-NOTES section 2): expand, build K, matmul attention."""
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


_COMPILED = torch.compile(hf_math)


def flash_mla_fn(q_lat, q_rope, latent, k_rope, scale):
    """FlashMLA dense decode (sgl-flash-mla, legacy SM90 kernel) on the same data, absorbed q given."""
    import flash_mla

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


# ---------------------------------------------------------------------------------------------------

def absorbed_table(flops_rate, bw):
    out("## Absorbed decode (S=1, bf16, no mask), microseconds")
    out()
    out("ev = CUDA events around eager launches (includes Python launch overhead, L2 flushed); "
        "gr = CUDA-graph replay (GPU time). Ratios core/FlashMLA and floor/core use the gr columns.")
    out()
    out("| H | B | T | ours core ev | ours core gr | ours op ev | ours op gr | FlashMLA ev | FlashMLA gr | "
        "core/FlashMLA | HF eager | Inductor(HF) | HF/op | Ind/op | floor core | floor/core |")
    out("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    Hs = (128, 32, 16)
    Bs = (1, 8, 32, 64) if not QUICK else (8,)
    Ts = (1024, 4096, 16384, 65536) if not QUICK else (4096,)
    hf_set = {(128, 1, 4096), (128, 8, 4096), (128, 32, 4096), (128, 8, 16384), (128, 64, 1024),
              (32, 8, 4096), (16, 8, 4096)}
    scale = 1 / math.sqrt(DN + DR)
    for H in Hs:
        for B in Bs:
            for T in Ts:
                if B * T > (1 << 21):
                    continue
                x = inputs(B, H, 1, T)
                q_lat = torch.einsum("bhsd,hdr->bhsr", x["q_nope"], x["w_uk"])
                core_fn = lambda: absorbed_latent_attention(q_lat, x["q_rope"], x["latent"], x["k_rope"],  # noqa
                                                            None, scale, False)
                op_fn = lambda: absorbed_decode(x["q_nope"], x["q_rope"], x["latent"], x["k_rope"],  # noqa
                                                x["w_uk"], x["w_uv"], None, scale, False)
                core, core_g = bench(core_fn), bench(core_fn, graph=True)
                op, op_g = bench(op_fn), bench(op_fn, graph=True)
                fm = fm_g = None
                if H in (64, 128):
                    try:
                        f = flash_mla_fn(q_lat, x["q_rope"], x["latent"], x["k_rope"], scale)
                        fm, fm_g = bench(f), bench(f, graph=True)
                    except Exception as e:  # noqa: BLE001
                        print(f"  FlashMLA: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
                hf = ind = None
                if (H, B, T) in hf_set:
                    args = (x["q_nope"], x["q_rope"], x["latent"], x["k_rope"], x["w"], None, scale)
                    hf = bench(lambda: hf_math(*args), rep=100)
                    ind = bench(lambda: _COMPILED(*args), rep=100)
                fl = 2 * B * H * T * (R + DR + R)
                by = 2 * (B * T * (R + DR) + B * H * (R + DR) + B * H * R)
                floor = max(fl / flops_rate, by / bw) * 1e6
                out(f"| {H} | {B} | {T} | {fmt(core)} | {fmt(core_g)} | {fmt(op)} | {fmt(op_g)} | {fmt(fm)} | "
                    f"{fmt(fm_g)} | {ratio(core_g, fm_g)} | {fmt(hf)} | "
                    f"{fmt(ind)} | {ratio(hf, op_g)} | {ratio(ind, op_g)} | {fmt(floor)} | "
                    f"{'n/a' if core_g is None else f'{100 * floor / core_g:.0f}%'} |")
                del x, q_lat
                torch.cuda.empty_cache()
    out()


def sparse_table(flops_rate, bw):
    out("## Sparse (DSA) absorbed decode, k=2048, H=128, S=1, bf16, microseconds")
    out()
    out("op ev includes check_indices' range check (a device-to-host sync) and the two bmm's.")
    out()
    out("| B | T | ours core ev | ours core gr | ours op ev | floor core |")
    out("|---|---|---|---|---|---|")
    H, k = 128, 2048
    scale = 1 / math.sqrt(DN + DR)
    for B in (1, 8):
        for T in (8192, 131072):
            x = inputs(B, H, 1, T)
            g = torch.Generator(device=DEV).manual_seed(1)
            idx = torch.stack([torch.randperm(T, device=DEV, generator=g)[:k] for _ in range(B)]).view(B, 1, k)
            idx = idx.sort(-1).values.to(torch.int32)
            q_lat = torch.einsum("bhsd,hdr->bhsr", x["q_nope"], x["w_uk"])
            core_fn = lambda: sparse_latent_attention(q_lat, x["q_rope"], x["latent"], x["k_rope"], idx,  # noqa
                                                      None, scale, False)
            core, core_g = bench(core_fn), bench(core_fn, graph=True)
            op = bench(lambda: sparse_absorbed_decode(x["q_nope"], x["q_rope"], x["latent"], x["k_rope"],
                                                      x["w_uk"], x["w_uv"], idx, None, scale, False))
            fl = 2 * B * H * k * (R + DR + R)
            by = 2 * (B * k * (R + DR) + B * H * (2 * R + DR))
            floor = max(fl / flops_rate, by / bw) * 1e6
            out(f"| {B} | {T} | {fmt(core)} | {fmt(core_g)} | {fmt(op)} | {fmt(floor)} |")
            del x, q_lat
            torch.cuda.empty_cache()
    out()


def prefill_table(flops_rate, bw):
    out("## Expanded prefill, causal, B=1, S=T=4096, bf16, microseconds")
    out()
    out("| H | variant | ours | HF eager | Inductor(HF) | Ind/ours | floor |")
    out("|---|---|---|---|---|---|---|")
    B, S = 1, 4096
    scale = 1 / math.sqrt(DN + DR)
    for H in ((128,) if QUICK else (128, 32)):
        x = inputs(B, H, S, S)
        fmask = torch.full((S, S), torch.finfo(DT).min, device=DEV, dtype=DT).triu(1)[None, None]
        a = (x["q_nope"], x["q_rope"], x["latent"], x["k_rope"], x["w_uk"], x["w_uv"])
        ours_c = bench(lambda: expanded_prefill(*a, None, scale, True))
        ours_m = bench(lambda: expanded_prefill(*a, fmask, scale, False))
        hargs = (x["q_nope"], x["q_rope"], x["latent"], x["k_rope"], x["w"], fmask, scale)
        hf = bench(lambda: hf_math(*hargs), rep=200)
        ind = bench(lambda: _COMPILED(*hargs), rep=200)
        fl = 2 * B * S * R * H * (DN + DV) + 2 * B * H * S * S / 2 * (DN + DR + DV)
        by = 2 * (B * S * (R + DR) + H * (DN + DV) * R + B * H * S * (DN + DR + DV))
        floor = max(fl / flops_rate, by / bw) * 1e6
        out(f"| {H} | is_causal | {fmt(ours_c)} | {fmt(hf)} | {fmt(ind)} | {ratio(ind, ours_c)} | {fmt(floor)} |")
        out(f"| {H} | HF float causal mask | {fmt(ours_m)} | {fmt(hf)} | {fmt(ind)} | {ratio(ind, ours_m)} | "
            f"{fmt(floor)} |")
        del x, fmask
        torch.cuda.empty_cache()
    out()


def main():
    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs CUDA")
    t0 = time.time()
    name = torch.cuda.get_device_name()
    out(f"# MLA Triton kernels: {name}")
    out()
    out(f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}")
    out(f"- torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}")
    out(f"- command: `python {' '.join(sys.argv)}`")
    try:
        import flash_mla
        out(f"- FlashMLA: sgl-flash-mla {getattr(flash_mla, '__version__', '?')}, legacy (SM90) dense decode")
    except Exception as e:  # noqa: BLE001
        out(f"- FlashMLA: not importable ({type(e).__name__})")
    flops_rate, bw = ceilings()
    out(f"- measured ceilings: bf16 8192^3 matmul {flops_rate / 1e12:.0f} TFLOP/s, device copy {bw / 1e12:.2f} TB/s "
        "(bytes read + written)")
    out(f"- shapes: r={R}, dr={DR}, dn=dv={DN}; times are do_bench medians (us), L2 flushed")
    out()
    for part in (absorbed_table, sparse_table, prefill_table):
        try:
            part(flops_rate, bw)
        except Exception:  # noqa: BLE001
            traceback.print_exc()
            out(f"({part.__name__} failed; see stderr)")
        print(f"[{time.time() - t0:.0f}s]", file=sys.stderr, flush=True)
    save_results("kernels", LINES)


if __name__ == "__main__":
    main()
