"""Direct launches of compiled kernels (`kernels/launch.py`): the key separates every specialisation
Triton compiles apart (CPU), and on CUDA the directly launched binaries give the JIT launch's
answers bit for bit over calls that change lengths, alignments and masks (GPU)."""

from __future__ import annotations

import pytest
import torch

from mla_compile.kernels.launch import argument_key, hooks_set


def test_key_separates_what_triton_specialises_on():
    x = torch.randn(64)
    assert argument_key(x) != argument_key(x[1:])               # 16-byte aligned or not
    assert argument_key(x) == argument_key(x[4:])               # 16 bytes further: aligned again
    assert argument_key(x) != argument_key(x.to(torch.float16))
    assert argument_key(1) != argument_key(2)
    assert argument_key(16) != argument_key(17)
    assert argument_key(0) == argument_key(16) == argument_key(4096)
    assert argument_key(3) == argument_key(4095)
    assert argument_key(1 << 31) != argument_key((1 << 31) - 16)   # i64 against i32
    assert argument_key(1 << 63) != argument_key((1 << 63) - 16)   # u64 against i64
    assert argument_key(True) != argument_key(False)
    assert argument_key(True) != argument_key(1)
    assert argument_key(0.5) == argument_key(2.0)


def test_launch_hooks_turn_direct_launches_off():
    """A profiler's launch hook (Proton) must see every launch: with one set, launches go through the
    JIT; with none (Triton's default, an empty HookChain on 3.5+), directly."""
    from triton import knobs

    assert not hooks_set()
    hook = knobs.runtime.launch_enter_hook
    seen = lambda metadata: None  # noqa: E731
    if hasattr(hook, "add"):
        hook.add(seen)
        try:
            assert hooks_set()
        finally:
            hook.remove(seen)
    else:
        knobs.runtime.launch_enter_hook = seen
        try:
            assert hooks_set()
        finally:
            knobs.runtime.launch_enter_hook = hook
    assert not hooks_set()


def _inputs(B, H, T, dt, g, offset=0):
    r, dr, dn, dv = 512, 64, 128, 128
    dev = "cuda"
    q_nope = torch.randn(B, H, 1, dn, device=dev, dtype=dt, generator=g)
    q_rope = torch.randn(B, H, 1, dr, device=dev, dtype=dt, generator=g)
    # offset > 0: the cache's rows start `offset` tokens into a longer buffer (a different base address)
    lat = torch.randn(B, 1, T + offset, r, device=dev, dtype=dt, generator=g)[:, :, offset:]
    kr = torch.randn(B, 1, T + offset, dr, device=dev, dtype=dt, generator=g)[:, :, offset:]
    w_uk = torch.randn(H, dn, r, device=dev, dtype=dt, generator=g) * 0.05
    w_uv = torch.randn(H, dv, r, device=dev, dtype=dt, generator=g) * 0.05
    return q_nope, q_rope, lat, kr, w_uk, w_uv


@pytest.mark.gpu
@pytest.mark.parametrize("H", [16, 128])
def test_direct_launches_equal_jit_launches(H):
    from mla_compile.kernels import launch
    from mla_compile.kernels.absorbed_decode import absorbed_decode

    g = torch.Generator(device="cuda").manual_seed(31)
    calls = []
    for T, B, offset, mask_kind in [(300, 2, 0, "none"), (301, 2, 0, "bool"), (304, 3, 1, "float"),
                                    (4100, 2, 0, "bool"), (4101, 2, 3, "none"), (17, 1, 0, "float"),
                                    (320, 2, 0, "none"), (305, 2, 1, "bool")]:
        args = _inputs(B, H, T, torch.bfloat16, g, offset)
        if mask_kind == "bool":
            mask = torch.rand(B, 1, 1, T, device="cuda", generator=g) > 0.3
            mask[..., 0] = True
        elif mask_kind == "float":
            mask = torch.randn(B, 1, 1, T, device="cuda", generator=g).to(torch.bfloat16)
        else:
            mask = None
        calls.append((args, mask))

    def run_all():
        return [absorbed_decode(*a, m, 0.07, False) for a, m in calls for _ in range(2)]

    launch._DIRECT.clear()
    direct = run_all()                      # first calls through the JIT, repeats directly
    assert any(d.binaries for d in launch._DIRECT.values()), "no binary was kept: nothing launched directly"
    for d in launch._DIRECT.values():
        d.enabled = False
    try:
        jit = run_all()
    finally:
        launch._DIRECT.clear()
    for a, b in zip(direct, jit):
        assert torch.isfinite(a).all()
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_decode_lengths_reuse_binaries():
    """A cache that grows by one token a step keeps to a few specialisations, so decode launches
    directly after the first steps."""
    from mla_compile.kernels import launch
    from mla_compile.kernels.absorbed_decode import absorbed_decode

    g = torch.Generator(device="cuda").manual_seed(32)
    launch._DIRECT.clear()
    base = _inputs(4, 16, 600, torch.bfloat16, g)
    for T in range(500, 564):
        absorbed_decode(base[0], base[1], base[2][:, :, :T], base[3][:, :, :T], base[4], base[5], None, 0.1, False)
    kept = {d.kernel.__class__.__name__ + str(i): len(d.binaries) for i, d in enumerate(launch._DIRECT.values())}
    assert all(n <= 4 for n in kept.values()), kept
