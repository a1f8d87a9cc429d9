"""Symbolic work of each MLA form: FLOPs and bytes moved, step by step, as sympy expressions.

Read against `passes/forms/*.py`.  Every step belongs to a *kernel* (one launch, or a few in the
unfused path); the device model times a kernel as max(compute, memory) + launches * overhead, so
steps that share a kernel share its memory traffic and its launch.

Counting rules (decisions, written down so benchmarks can contest them):

* FLOPs are multiply-adds x 2 of the matrix products ("flops", run at the tensor-core rate) and,
  separately, the element-wise softmax work ("vector": SOFTMAX_OPS per live score: scale, mask,
  max, subtract, exp, sum, divide, cast) run at the device's non-tensor rate.
* Bytes are DRAM traffic with perfect on-chip reuse inside a kernel: an operand is read once per
  kernel, an output written once.  Flash-style re-reads of K/V per query tile are L2 hits and are
  not counted.  Weights count once per call (W_UK H*dn*r, W_UV H*dv*r elements).
* Causal masking: HF decodes with a cache bottom-right aligned (query i of S sees T-S+i+1 keys,
  T >= S always because the cache includes the new tokens), so the live part of the S x T score
  matrix is  L = S*T - S*(S-1)/2.  At S = 1 that is T: decode is unaffected.  A fused kernel skips
  the dead triangle in both dense forms (both attention kernels are tile loops over keys that can
  stop at the diagonal); the unfused reference path (CPU) computes and masks all S*T.
  For S == T (prefill, SDPA's top-left `is_causal`) the two alignments coincide.
* Dense attention reads a user mask tensor [B,1,S,T] once when `mask=True` (absorbed: inside the
  attention kernel; expanded: in its block-map kernel, up to twice, after which attention reads only
  the partially masked tiles); the sparse forms read it only at the selected positions.
* DSA models run densely (`dsa_mask=True`) keep HF's top-k mask: built from the indices
  (new_ones bool + scatter + masked_fill into the float mask: B*S*T*(2+e) bytes, kernel "dsa_mask",
  3 launches) and read by attention (B*S*T*e).  The sparse forms drop it.
* Sparse (DSA) forms: the indexer's own work exists with or without us and is not counted.  The
  selection has kk = min(k, T) positions per query; attention terms use kk instead of T.  Each query
  gathers its kk latent rows and reads its int32 indices (B*S*kk*4); the queries of one sequence run
  side by side and share its rows through L2, so DRAM sees B*min(S*kk, T)*(r+dr)*e bytes (a
  sequence's latent is read at most once).  At decode (S = 1) the whole latent is never read.
* Occupancy: the expanded attention kernel runs B*H*ceil(S/EXPANDED_TILE) programs, each over all
  its keys; when that is fewer than PROGRAMS_PER_SM per SM, its time is divided by
  programs / (PROGRAMS_PER_SM x SMs).  The
  latent kernels split the keys until the device is full and the GEMMs are cuBLAS's.
* Mask re-reads: the absorbed kernel folds (head, query) into tiles of ROW_TILE rows, so each tile
  reads its queries' mask rows: min(H, max(1, H*S/ROW_TILE)) reads of the mask.  The expanded kernel
  runs one head per program and reads the mask only in partially masked tiles (its block map says
  which): none but the diagonal for a causal mask, every tile, once per head, for a top-k mask.
* Attention sinks (one logit per head in each row's normaliser): B*H*S exponentials and H floats
  read, below what the model resolves; the split merge that adds them in the latent forms is
  counted for every call already (their "attention" kernel is two launches), and the expanded
  kernel adds them in its epilogue. No term.
* Expanded form includes the expansion GEMM over all T cached tokens (2*B*T*r*H*(dn+dv) FLOPs),
  writing K_nope and V (B*H*T*(dn+dv)*e) and reading them back in attention.
* Absorbed form reads the latent once per batch row (B*T*(r+dr)*e), not once per head.
* Unfused path (device.fused_attention False, i.e. the plain-torch reference on CPU): the score
  matrix is materialised in float32 and walked SOFTMAX_PASSES_UNFUSED times (each pass one read or
  one write of B*H*S*T*4 bytes), and each torch op is one launch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import sympy

from mla_compile.cost.symbols import B, H, INDEX_BYTES, S, SCORE_BYTES, T, dn, dr, dv, e, k, r

from mla_compile.kernels.common import DENSE_FORMS, FORMS, SPARSE_FORMS  # noqa: E402,F401  (the form names)

PROGRAMS_PER_SM = 3             # programs per SM for a flash-attention kernel to reach full speed
EXPANDED_TILE = 128             # queries per program of the expanded attention kernel (S > 64)
ROW_TILE = 64                   # rows (head, query) per program of the absorbed attention kernel
SOFTMAX_OPS = 8                 # element-wise ops per live score in the softmax step
SOFTMAX_PASSES_UNFUSED = 12     # fp32 score-matrix reads+writes of the reference: scale, mask, amax,
                                # exp(x-m), sum, divide, cast, P read by the value product, ...

# launches per kernel, fused (GPU kernels) vs unfused (one per torch op in passes/forms references)
LAUNCHES = {
    True: {
        # block_map: a float mask's zero-filled row flags, the per-block flags, then the lists
        # (kernels/expanded_prefill.py; a bool mask skips the fill)
        "expanded": {"expand": 1, "attention": 1, "block_map": 3, "dsa_mask": 3},
        # absorb: the [H, B*S, dn] copy of q_nope + the bmm; attention: split kernel + split
        # merge; output: the bmm + the [B, H, S, dv] contiguous copy (kernels/absorbed_decode.py)
        "absorbed": {"absorb": 2, "attention": 2, "output": 2, "dsa_mask": 3},
        "sparse_absorbed": {"absorb": 2, "attention": 2, "output": 2},
        "sparse_expanded": {"expand": 1, "attention": 1},
    },
    False: {
        "expanded": {"expand": 2, "score": 3, "softmax": 9, "value": 1, "dsa_mask": 3},
        "absorbed": {"absorb": 2, "score": 3, "softmax": 9, "value": 1, "output": 2, "dsa_mask": 3},
        "sparse_absorbed": {"absorb": 2, "gather": 6, "score": 3, "softmax": 12, "value": 1, "output": 2},
        "sparse_expanded": {"expand": 8, "score": 3, "softmax": 12, "value": 3},
    },
}


@dataclass(frozen=True)
class Step:
    """One step of a form: its matrix FLOPs, element-wise ops, DRAM bytes, and the kernel it runs in."""
    name: str
    kernel: str
    flops: sympy.Expr = sympy.Integer(0)
    vector: sympy.Expr = sympy.Integer(0)
    bytes: sympy.Expr = sympy.Integer(0)
    programs: Optional[sympy.Expr] = None     # independent programs (CTAs) the kernel launches, when
                                              # that can be fewer than the device's SMs


@dataclass
class Kernel:
    name: str
    launches: int
    flops: sympy.Expr = sympy.Integer(0)
    vector: sympy.Expr = sympy.Integer(0)
    bytes: sympy.Expr = sympy.Integer(0)
    steps: list = field(default_factory=list)
    programs: Optional[sympy.Expr] = None


def occupancy(kn: Kernel, sm_count: int, per_sm: int = None):
    """Fraction of its full speed a kernel reaches: min(1, programs / (per_sm x SMs)), 1 when not
    bounded. A flash-attention program alone on an SM stalls on its own loads; PROGRAMS_PER_SM of them
    side by side hide that latency (the efficiencies were fitted at that occupancy)."""
    if kn.programs is None:
        return sympy.Integer(1)
    return sympy.Min(1, kn.programs / ((per_sm or PROGRAMS_PER_SM) * sm_count))


def live_pairs(causal: bool, skip: bool):
    """Score entries per (batch, head) that must be computed: S*T, or the causal bottom-right part."""
    if causal and skip:
        return S * T - S * (S - 1) / 2
    return S * T


def form_steps(form: str, *, causal: bool = True, fused: bool = True, mask: bool = False,
               selected=None, dsa_mask: bool = False) -> dict[str, Step]:
    """The steps of `form` as {step name: Step}.  `selected` is the per-query selection size of the
    sparse forms (default min(k, T)); plan() passes k where it only considers sparse forms at T > k."""
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r}: expected one of {FORMS}")
    kk = sympy.Min(k, T) if selected is None else sympy.sympify(selected)
    w_uk, w_uv = H * dn * r * e, H * dv * r * e
    q_nope, q_rope, out = B * H * S * dn * e, B * H * S * dr * e, B * H * S * dv * e
    q_lat = B * H * S * r * e
    u = lambda name: name if not fused else "attention"   # noqa: E731  kernel of an attention step
    steps: list[Step] = []

    if form in DENSE_FORMS:
        L = live_pairs(causal, fused)
        full = S * T
        if form == "expanded":
            steps.append(Step("expand", "expand", 2 * B * T * r * H * (dn + dv), 0,
                              B * T * r * e + w_uk + w_uv + B * H * T * (dn + dv) * e))
            # one program per (batch, head, tile of EXPANDED_TILE queries), each walking all its keys
            # (no split over keys): at small B*H*S fewer programs than SMs
            programs = B * H * sympy.ceiling(S / EXPANDED_TILE) if fused else None
            steps.append(Step("score", u("score"), 2 * B * H * L * (dn + dr), 0,
                              q_nope + q_rope + B * H * T * dn * e + B * T * dr * e, programs))
            v_bytes = B * H * T * dv * e + out
            v_flops = 2 * B * H * L * dv
        else:
            steps.append(Step("absorb", "absorb", 2 * B * H * S * dn * r, 0, q_nope + w_uk + q_lat))
            steps.append(Step("score", u("score"), 2 * B * H * L * (r + dr), 0,
                              B * T * (r + dr) * e + q_lat + q_rope))
            v_bytes = q_lat                      # o_lat written; the latent tile is reused on chip
            v_flops = 2 * B * H * L * r
        steps.append(Step("softmax", u("softmax"), 0, SOFTMAX_OPS * B * H * L, 0))
        steps.append(Step("value", u("value"), v_flops, 0, v_bytes))
        if form == "absorbed":
            steps.append(Step("output", "output", 2 * B * H * S * r * dv, 0, q_lat + w_uv + out))
        if (mask or dsa_mask) and form == "expanded" and fused:
            # the block map reads the mask once (per-block flags; the list launch reads B*S*T / (64*128)
            # flags, left out of the bytes); the attention kernel then reads
            # only partially masked tiles, once per head (its programs run head by head): a causal
            # mask's diagonal (counted as none), but every tile of a top-k mask, whose allowed keys
            # are scattered
            steps.append(Step("block_map", "block_map", 0, B * S * T, B * S * T * e))
            steps.append(Step("mask", u("softmax"), 0, B * H * L, H * B * S * T * e if dsa_mask else 0))
        elif (mask or dsa_mask) and fused:
            # absorbed: a tile of ROW_TILE rows (head, query) reads the mask rows of its queries, so
            # the mask is read min(H, H*S/ROW_TILE) times over (once per head when S >= ROW_TILE)
            reads = sympy.Min(H, sympy.Max(1, H * S / ROW_TILE))
            steps.append(Step("mask", u("softmax"), 0, B * H * L, reads * B * S * T * e))
        elif mask or dsa_mask:
            steps.append(Step("mask", u("softmax"), 0, B * H * L, B * S * T * e))
        if dsa_mask:
            steps.append(Step("dsa_mask", "dsa_mask", 0, 0, B * S * T * (2 + e) + B * S * k * INDEX_BYTES))
        if not fused:
            steps.append(Step("scores_io", "softmax", 0, 0, SOFTMAX_PASSES_UNFUSED * B * H * full * SCORE_BYTES))
        return {s.name: s for s in steps}

    # sparse forms
    L = S * kk
    # DRAM traffic of the gather: a sequence's queries run side by side and share its latent rows
    # through L2, so a sequence reads at most its T rows (and S*kk when that is fewer)
    gather = B * sympy.Min(S * kk, T) * (r + dr) * e
    index = B * S * kk * INDEX_BYTES
    if form == "sparse_absorbed":
        steps.append(Step("absorb", "absorb", 2 * B * H * S * dn * r, 0, q_nope + w_uk + q_lat))
        # unfused: index_select writes the gathered rows and the score product reads them again
        steps.append(Step("gather", u("gather"), 0, 0, gather + index + (0 if fused else 2 * gather)))
        steps.append(Step("score", u("score"), 2 * B * H * L * (r + dr), 0, q_lat + q_rope))
        steps.append(Step("softmax", u("softmax"), 0, SOFTMAX_OPS * B * H * L, 0))
        steps.append(Step("value", u("value"), 2 * B * H * L * r, 0, q_lat))
        steps.append(Step("output", "output", 2 * B * H * S * r * dv, 0, q_lat + w_uv + out))
    else:
        # gather, then expand every gathered row per head (materialised, as the reference does)
        kv = B * S * kk * H * (dn + dv) * e
        steps.append(Step("gather", "expand", 0, 0, gather + index + (0 if fused else 2 * gather)))
        steps.append(Step("expand", "expand", 2 * B * S * kk * r * H * (dn + dv), 0, w_uk + w_uv + kv))
        steps.append(Step("score", u("score"), 2 * B * H * L * (dn + dr), 0,
                          q_nope + q_rope + B * S * kk * H * dn * e))
        steps.append(Step("softmax", u("softmax"), 0, SOFTMAX_OPS * B * H * L, 0))
        steps.append(Step("value", u("value"), 2 * B * H * L * dv, 0, B * S * kk * H * dv * e + out))
    if mask:
        steps.append(Step("mask", u("softmax"), 0, B * H * L, B * S * kk * e + index))
    if not fused:
        steps.append(Step("scores_io", "softmax", 0, 0, SOFTMAX_PASSES_UNFUSED * B * H * L * SCORE_BYTES))
    return {s.name: s for s in steps}


def form_kernels(form: str, *, causal: bool = True, fused: bool = True, mask: bool = False,
                 selected=None, dsa_mask: bool = False) -> dict[str, Kernel]:
    """Steps grouped by kernel, with each kernel's launch count."""
    launches = LAUNCHES[bool(fused)][form]
    kernels: dict[str, Kernel] = {}
    for st in form_steps(form, causal=causal, fused=fused, mask=mask, selected=selected,
                             dsa_mask=dsa_mask).values():
        kn = kernels.setdefault(st.kernel, Kernel(st.kernel, launches.get(st.kernel, 1)))
        kn.flops += st.flops
        kn.vector += st.vector
        kn.bytes += st.bytes
        kn.steps.append(st.name)
        if st.programs is not None:
            kn.programs = st.programs
    return kernels


def totals(form: str, **flags) -> dict[str, sympy.Expr]:
    """{'flops', 'vector', 'bytes', 'launches'} of a form, summed over its steps."""
    ks = form_kernels(form, **flags).values()
    return {
        "flops": sympy.expand(sum((kn.flops for kn in ks), sympy.Integer(0))),
        "vector": sympy.expand(sum((kn.vector for kn in ks), sympy.Integer(0))),
        "bytes": sympy.expand(sum((kn.bytes for kn in ks), sympy.Integer(0))),
        "launches": sum(kn.launches for kn in ks),
    }
