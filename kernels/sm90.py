"""What the Hopper (sm_90) Gluon kernels share: Gluon's imports, whether a device is a Hopper GPU,
TMA's stride rules, the scratch allocator for device-made TMA descriptors, an ahead-of-time compile
for sm_90 (no GPU needed), and the Gluon device functions both absorbed kernels use (one softmax
step, a key tile's TMA refill, the keys-major kernel's start).

The kernels: `absorbed_decode_seesaw` (more than 32 heads, heads as the MMA's rows, FlashMLA's
schedule) and `absorbed_decode_keys_major` (at most 32 heads, keys as the MMA's rows). Both take
bf16/fp16, r = 512, dr = 64, one query position, no causal flag (HF's decode mask is read per key
tile); `kernels/registry.absorbed_core` says which kernel runs a call.
"""

from __future__ import annotations

import torch
import triton

import triton.language as tl

from mla_compile.kernels import common

try:   # Gluon is Triton's; an older or CPU-only Triton without it just leaves the Triton kernel
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma,
                                                                  warpgroup_mma, warpgroup_mma_wait)
    # Triton 3.6 (PyTorch 2.11's) names the TMA load `async_copy_global_to_shared` and the CTA barrier
    # `thread_barrier`; 3.9 has `async_load` and `barrier` only. Take whichever this Triton has.
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    _cta_barrier = getattr(gl, "barrier", None) or gl.thread_barrier
    HAVE_GLUON = True
except (ImportError, AttributeError):   # pragma: no cover - depends on the installed Triton
    HAVE_GLUON = False

R, DR = 512, 64
HALF = R // 2
LOG2E = tl.constexpr(common.LOG2E)

_CAPABILITY: dict = {}


def is_sm90(device: torch.device) -> bool:
    """A Hopper GPU (sm_90), which both Gluon kernels are written for (cached per device)."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _CAPABILITY:
        _CAPABILITY[idx] = torch.cuda.get_device_capability(idx)
    return _CAPABILITY[idx] == (9, 0)


def tma_ready(*tensors) -> bool:
    """TMA needs a unit last stride and 16-byte aligned bases and strides (of real tensors; the
    stride of a dimension of size 1 is never used). A plain loop, the sizes read only for a stride
    that is not aligned: it runs at every absorbed call on a Hopper GPU, where a generator over zip()
    of every size and stride cost twice as much host time."""
    for t in tensors:
        strides = t.stride()
        if strides[-1] != 1 or t.data_ptr() % 16:
            return False
        es = t.element_size()
        for i in range(len(strides) - 1):
            if (strides[i] * es) % 16 and t.shape[i] > 1:
                return False
    return True


def _torch_scratch(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


try:
    from triton.runtime._allocation import NullAllocator as _NullAllocator, _allocator
except ImportError:   # pragma: no cover - another Triton's internals: always set ours
    _NullAllocator, _allocator = None, None


def ensure_allocator() -> None:
    """Device-side TMA descriptors live in a global scratch buffer that the launch asks Triton's
    allocator for. Set one on PyTorch's caching allocator unless the user has set their own (the
    setting is a context variable: a new thread starts without one, hence the check at each call)."""
    if _allocator is None or isinstance(_allocator.get(), _NullAllocator):
        triton.set_allocator(_torch_scratch)



def compile_gluon_for_sm90(kernel, consts: dict, mask_kind: int, **options):
    """triton.compile of a Gluon split kernel with the argument list of `split_args` (9 pointers, the
    scale, 16 ints; bf16 tensors) for sm_90, the pointers 16-byte aligned as the launcher specialises;
    `options` as triton.compile takes them (num_warps, maxnreg)."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    names = [n for n in kernel.arg_names if n not in consts]   # pointers, scale, then 16 ints
    mask_type = {0: "*bf16", 1: "*u8", 2: "*bf16"}[mask_kind]
    types = ["*bf16"] * 4 + [mask_type, "*i32", "*bf16", "*fp32", "*fp32", "fp32"] + ["i32"] * 16
    assert len(names) == len(types), names
    sig = dict(zip(names, types), **{k: "constexpr" for k in consts})
    aligned = {(i,): [["tt.divisibility", 16]] for i in range(9)}   # what the launcher specialises
    src = GluonASTSource(kernel, sig, consts, aligned)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def launch_split(kernel, grid, q_lat, q_rope, c, kr, mask, mask_strides, kv_lens, out, o_part, ml, scale: float,
                 chunk: int, splits: int, **consts_and_options) -> None:
    """Launch a Gluon split kernel: q_lat/q_rope [B, H, 1, *], c [B, T, r], kr [B, T, dr] (token views),
    the mask as `absorbed_decode.mask_view` gives it ([B, 1, T] view: kind 0 none, 1 bytes, 2 float),
    kv_lens int32 [B] or None; with one split it writes `out` [B, H, 1, r], else o_part [B, P, H, r]
    fp32 and ml [B, P, H, 2] fp32, each split's row max m and sum l (what `merge_splits` takes)."""
    ensure_allocator()
    common.launcher(kernel, q_lat)[grid](
        q_lat, q_rope, c, kr, mask if mask is not None else c, kv_lens if kv_lens is not None else c,
        out, o_part, ml, float(scale), q_lat.shape[1], c.shape[1], chunk, splits,
        q_lat.stride(0), q_lat.stride(1), q_rope.stride(0), q_rope.stride(1),
        c.stride(0), c.stride(1), kr.stride(0), kr.stride(1), mask_strides[0], mask_strides[2],
        out.stride(0), out.stride(1),
        **consts_and_options,
    )


if HAVE_GLUON:
    @gluon.jit
    def _probs(qk, m_prev, n0, stop, scale, MASK, s_mt, MASK_KIND: gl.constexpr, BLOCK_N: gl.constexpr,
               col_layout: gl.constexpr):
        # One key tile of the online softmax of the heads-major kernel: scores in natural
        # units (x = q.k * scale + float mask) and exp2 for the exponentials, so that an HF float mask's
        # finfo.min stays finite here, as in the reference (a row masked everywhere by it averages all
        # keys, like softmax over equal scores). m_safe keeps a row that has seen only -inf (bool-masked)
        # keys at m = -inf, p = 0 (zeros, weight 0 in the merge). Returns fp32 p, alpha = exp(m_prev -
        # m_new) and m_new.
        offs_n = n0 + gl.arange(0, BLOCK_N, layout=col_layout)
        valid = offs_n < stop
        x = qk * scale
        if MASK_KIND == 1:
            valid = valid & (gl.load(MASK + offs_n * s_mt, mask=valid, other=0) != 0)
        if MASK_KIND == 2:
            x = x + gl.expand_dims(gl.load(MASK + offs_n * s_mt, mask=valid, other=0.0).to(gl.float32), 0)
        x = gl.where(gl.expand_dims(valid, 0), x, float("-inf"))
        m_new = gl.maximum(m_prev, gl.max(x, axis=1))
        m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
        # subtract before scaling by log2(e): finfo.min * log2(e) overflows fp32
        alpha = gl.exp2((m_prev - m_safe) * LOG2E)
        p = gl.exp2((x - gl.expand_dims(m_safe, 1)) * LOG2E)
        return p, alpha, m_new


    @gluon.jit
    def _refill(c_desc, kr_desc, bar, lo, hi, kr, key0, pred):
        # One stage = two latent halves + the RoPE tile, all on one mbarrier.
        mbarrier.expect(bar, 2 * c_desc.block_type.nbytes + kr_desc.block_type.nbytes, pred=pred)
        _tma_load(c_desc, [key0, 0], bar, lo, pred=pred)
        _tma_load(c_desc, [key0, c_desc.block_type.shape[1]], bar, hi, pred=pred)
        _tma_load(kr_desc, [key0, 0], bar, kr, pred=pred)


    @gluon.jit
    def _q_to_registers(Q, QR, b, row0, H, s_qb, s_qh, s_rb, s_rh, Q_ROWS: gl.constexpr, HALF: gl.constexpr,
                        DR: gl.constexpr):
        # Q's rows row0.. row0 + Q_ROWS of batch b (its two latent halves and its RoPE part) by plain loads,
        # rows past H as zeros (what TMA's bounds give the descriptor path)
        ld: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [gl.num_warps(), 1], [1, 0])
        rows = row0 + gl.arange(0, Q_ROWS, layout=gl.SliceLayout(1, ld))
        ok = gl.expand_dims(rows < H, 1)
        cols = gl.expand_dims(gl.arange(0, HALF, layout=gl.SliceLayout(0, ld)), 0)
        q_ptrs = Q + b * s_qb + gl.expand_dims(rows, 1) * s_qh + cols
        q_lo = gl.load(q_ptrs, mask=ok, other=0.0)
        q_hi = gl.load(q_ptrs + HALF, mask=ok, other=0.0)
        cols_r = gl.expand_dims(gl.arange(0, DR, layout=gl.SliceLayout(0, ld)), 0)
        q_r = gl.load(QR + b * s_rb + gl.expand_dims(rows, 1) * s_rh + cols_r, mask=ok, other=0.0)
        return q_lo, q_hi, q_r


    @gluon.jit
    def _split_prologue(Q, QR, C, KR, KVLEN, b, pid_p, row0, H, T, chunk, s_qb, s_qh, s_rb, s_rh, s_cb, s_ct, s_kb,
                        s_kt, Q_ROWS: gl.constexpr, BLOCK_N: gl.constexpr, HALF: gl.constexpr, DR: gl.constexpr,
                        NUM_STAGES: gl.constexpr, HAS_KVLEN: gl.constexpr, P_SHAPE: gl.constexpr):
        # The keys-major kernel's start: the per-batch TMA descriptors of the latent and its RoPE part
        # (rows past the valid length read as zeros), the shared memory (Q_ROWS rows of Q, the key
        # tiles' ring, P of P_SHAPE), the barriers, and the first loads. Q goes through registers by
        # plain loads (rows past H masked to zero): a descriptor made on the device costs a global
        # release fence, about 1 us of this kernel's start (docs/design.md).
        dtype: gl.constexpr = C.dtype.element_ty
        q_lo, q_hi, q_r = _q_to_registers(Q, QR, b, row0, H, s_qb, s_qh, s_rb, s_rh, Q_ROWS, HALF, DR)
        q_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([Q_ROWS, HALF], dtype)
        qr_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([Q_ROWS, DR], dtype)
        half_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HALF], dtype)
        rope_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, DR], dtype)
        p_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for(P_SHAPE, dtype)

        t_end = T
        if HAS_KVLEN:
            t_end = gl.minimum(t_end, gl.load(KVLEN + b))
        c_desc = tma.make_tensor_descriptor(C + b * s_cb, [gl.maximum(t_end, 1), 2 * HALF], [s_ct, 1],
                                            [BLOCK_N, HALF], half_sl)
        kr_desc = tma.make_tensor_descriptor(KR + b * s_kb, [gl.maximum(t_end, 1), DR], [s_kt, 1],
                                             [BLOCK_N, DR], rope_sl)

        q_smem = gl.allocate_shared_memory(dtype, [2, Q_ROWS, HALF], q_sl)
        qr_smem = gl.allocate_shared_memory(dtype, [Q_ROWS, DR], qr_sl)
        lo_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_N, HALF], half_sl)
        hi_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_N, HALF], half_sl)
        kr_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_N, DR], rope_sl)
        p_smem = gl.allocate_shared_memory(dtype, P_SHAPE, p_sl)
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        kv_bar = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        for st in gl.static_range(NUM_STAGES):
            mbarrier.init(kv_bar.index(st), count=1)
        fence_async_shared()   # the barrier inits must be visible to the TMA unit before the first copy

        start = pid_p * chunk
        stop = gl.minimum(start + chunk, t_end)
        n_tiles = gl.cdiv(stop - start, BLOCK_N)   # <= 0 for a split wholly past a short valid length

        for st in gl.static_range(NUM_STAGES):
            _refill(c_desc, kr_desc, kv_bar.index(st), lo_smem.index(st), hi_smem.index(st), kr_smem.index(st),
                    start + st * BLOCK_N, st < n_tiles)
        q_smem.index(0).store(q_lo)
        q_smem.index(1).store(q_hi)
        qr_smem.store(q_r)
        fence_async_shared()   # generic-proxy stores, read by the warpgroup MMAs (async proxy)
        _cta_barrier()
        return (start, stop, n_tiles, c_desc, kr_desc, q_smem, qr_smem, lo_smem, hi_smem, kr_smem, p_smem, q_bar,
                kv_bar)

