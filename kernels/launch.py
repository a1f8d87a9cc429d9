"""Launching a compiled Triton (or Gluon) kernel without the JIT's per-call work.

`kernel[grid](*args, **consts)` binds every argument to the signature, works out each argument's
specialisation, hashes the specialisations into a cache key, checks the kernel's globals, and for an
autotuned kernel builds a dict of the arguments to look up the tuned config: tens of microseconds of
Python a launch. Without CUDA graphs (the one-liner's DynamicCache decode) that is paid for every
kernel of every layer at every step. `DirectLaunch` does the work once per specialisation: the first
launch goes through the JIT (compiling and autotuning as usual) and keeps the `CompiledKernel` it
returns; a later launch whose arguments specialise the same way calls that binary's launcher
directly with the arguments in signature order, as Inductor's generated code does.

The key must separate every pair of calls that Triton would compile apart, so it holds, per
argument, at least what Triton specialises on:

    tensor   its dtype, and whether its address is 16-byte aligned
    int      whether it equals 1, whether it is divisible by 16, and its width (i32, i64 or u64)
    bool     its value;  float: nothing;  None: None;  anything else (a constexpr): its value

plus the current device, the keyword arguments (constexprs and launch options) and, for an autotuned
kernel, the values of its autotuning key (which pick the config). Finer than Triton's own key where it differs, never
coarser: a new key costs one JIT launch, a shared one would run the wrong binary.

A launch falls back to the JIT path, every time, while Triton's launch hooks are set (profilers
such as Proton read them) or for a kernel whose configs carry pre- or post-hooks.
"""

from __future__ import annotations

import torch

try:   # the launch hooks live in `triton.knobs` from Triton 3.4; older ones have no fast path here
    from triton import knobs as _knobs
    from triton.runtime.autotuner import Autotuner as _Autotuner
except ImportError:   # pragma: no cover - depends on the installed Triton
    _knobs = None
    _Autotuner = ()

_I32 = (-(1 << 31), 1 << 31)
_I64 = (-(1 << 63), 1 << 63)


def _int_class(v: int) -> int:
    """Triton's specialisation of an int: 1 apart; else divisibility by 16 and the narrowest type."""
    if v == 1:
        return 1
    return 2 + (v % 16 == 0) + 2 * (_I32[0] <= v < _I32[1]) + 4 * (_I64[0] <= v < _I64[1])


def argument_key(a):
    """What a launch's key holds for one positional argument (see the module's docstring)."""
    t = type(a)
    if t is bool:
        return "T" if a else "F"      # not True/False: those equal the ints 1 and 0 as keys
    if t is int:
        return _int_class(a)
    if t is float:
        return "f"
    if isinstance(a, torch.Tensor):
        return a.dtype, a.data_ptr() % 16 == 0
    return a


def _hook_active(hook) -> bool:
    """A launch hook that would run: Triton 3.5+ keeps them in a HookChain (never None, empty until a
    profiler adds one), older ones a callable or None."""
    if hook is None:
        return False
    calls = getattr(hook, "calls", None)
    return True if calls is None else bool(calls)


def hooks_set() -> bool:
    rt = _knobs.runtime
    return _hook_active(rt.launch_enter_hook) or _hook_active(rt.launch_exit_hook)


class _Binary:
    """One specialisation's compiled kernel and what completes a call's arguments to its signature."""

    __slots__ = ("kernel", "tail", "meta")

    def __init__(self, kernel, tail: tuple, meta: dict):
        self.kernel, self.tail, self.meta = kernel, tail, meta


class DirectLaunch:
    """`kernel` (a JITFunction, a Gluon JIT function or an Autotuner over one), launched as
    `DirectLaunch(kernel)[grid](*args, **kwargs)` with the JIT's meaning; `grid` may be a callable of
    the launch's meta-parameters (the keyword arguments and the tuned config's)."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.tuner = kernel if isinstance(kernel, _Autotuner) else None
        jit = kernel
        while not hasattr(jit, "params"):    # through the Autotuner (and any Heuristics) to the JIT function
            jit = jit.fn
        self.params = jit.params
        names = [p.name for p in self.params]
        self.tuning_positions = tuple(names.index(k) for k in self.tuner.keys) if self.tuner else ()
        self.binaries: dict = {}
        self.enabled = _knobs is not None

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launch(grid, args, kwargs)

    def key(self, device: int, args: tuple, kwargs: dict):
        k = (device, *map(argument_key, args))       # a binary is loaded into one device's context
        if kwargs:
            k += tuple(kwargs.items())
        if self.tuning_positions:
            k += tuple(args[i] for i in self.tuning_positions)
        return k

    def launch(self, grid, args: tuple, kwargs: dict):
        if not self.enabled or hooks_set():
            return self.kernel[grid](*args, **kwargs)
        device = torch.cuda.current_device()
        key = self.key(device, args, kwargs)
        binary = self.binaries.get(key)
        if binary is None:
            compiled = self.kernel[grid](*args, **kwargs)
            self._keep(key, compiled, args, kwargs)
            return compiled
        meta = binary.meta
        g = grid(meta) if callable(grid) else grid
        ck = binary.kernel
        try:
            ck.run(g[0], g[1] if len(g) > 1 else 1, g[2] if len(g) > 2 else 1,
                   torch._C._cuda_getCurrentRawStream(device), ck.function, ck.packed_metadata, None, None, None,
                   *args, *binary.tail)
        except (TypeError, AttributeError):
            # another Triton's launcher takes other arguments: the JIT path from now on (it raises, with
            # its own message, whatever is wrong with the arguments themselves)
            self.enabled = False
            return self.kernel[grid](*args, **kwargs)
        return ck

    def _keep(self, key, compiled, args: tuple, kwargs: dict) -> None:
        """Keep the binary the JIT launched, with the values of the parameters past the positional
        ones (keywords, the tuned config's, defaults), or turn the fast path off for this kernel when
        the binary cannot be called directly."""
        meta = dict(kwargs)
        if self.tuner is not None:
            config = self.tuner.best_config
            if config.pre_hook is not None or getattr(config, "post_hook", None) is not None:
                self.enabled = False
                return
            meta.update(config.all_kwargs())
        if not all(hasattr(compiled, a) for a in ("run", "function", "packed_metadata")):
            self.enabled = False
            return
        tail = []
        for p in self.params[len(args):]:
            if p.name in meta:
                tail.append(meta[p.name])
            elif p.has_default:
                tail.append(p.default)
            else:
                self.enabled = False     # a parameter with no value: the JIT would have raised
                return
        self.binaries[key] = _Binary(compiled, tuple(tail), meta)


_DIRECT: dict = {}


def direct(kernel) -> DirectLaunch:
    """The process's one DirectLaunch of `kernel` (kernels are module globals: keyed by identity)."""
    d = _DIRECT.get(id(kernel))
    if d is None:
        d = _DIRECT[id(kernel)] = DirectLaunch(kernel)
    return d
