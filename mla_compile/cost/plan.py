"""plan(): predict each MLA form's time on a device and pick the cheapest; crossovers and a runtime
chooser for symbolic sizes.

    p = plan(batch=8, q_len=1, kv_len=4096, heads=128, kv_lora_rank=512, qk_rope_head_dim=64,
             qk_nope_head_dim=128, v_head_dim=128, device="h200")
    p.form, p.costs, print(p.explain())
    p.crossover("absorbed", "expanded", "S")            # boundary in S at the plan's other sizes
    choose, text = runtime_chooser(batch=B, q_len=S, kv_len=T, heads=128, ...)   # S, T sympy Symbols
    choose({"S": 1, "T": 5000, "B": 8})                 # -> "absorbed"

Candidates: expanded and absorbed always; with `topk` also sparse_absorbed and sparse_expanded, but
only where kv_len > topk (where kv_len <= topk the selection is every token and dense is exact and
cheaper).  With symbolic kv_len the rule is applied by the runtime chooser on the actual sizes, and
the sparse expressions use k (not min(k, T)) since they are only ever taken at T > k.

Crossovers and max()
--------------------
Each form's time is a sum of max(compute, memory) per kernel, so the equation time_a = time_b is
piecewise.  `crossover` enumerates nothing blindly: it locates the sign changes of time_a - time_b
numerically along the dynamic symbol (log grid + bisection, other symbolic sizes at their hints),
reads off which branch of every max() is active at each root, replaces each max() by that branch
(leaving a polynomial, at most quadratic in S because of the causal triangle) and solves that
exactly with sympy.  The closed form is therefore exact on the branch that is active at the root;
with other sizes symbolic it is exact in a neighbourhood of their hints (pass `hints=` to move it).
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import sympy
import torch

from mla_compile.cost import symbols as sy
from mla_compile.cost.calibrate import load_device
from mla_compile.cost.devices import DEVICES, HOPPER_DECODE_KEY, KEYS_MAJOR_DECODE_KEY, DeviceModel, table_entry
from mla_compile.cost.roofline import element_bytes, kernel_time, roofline_time
from mla_compile.cost.work import DENSE_FORMS, FORMS, SPARSE_FORMS, form_kernels, occupancy
from mla_compile.kernels.registry import absorbed_core

# where other sizes are symbolic, branch choices and root picking are made at these values
DEFAULT_HINTS = {"B": 8, "S": 1, "T": 4096, "H": 128, "r": 512, "dr": 64, "dn": 128, "dv": 128, "k": 2048}
SCAN_MAX = 1 << 22


# -- expressions ---------------------------------------------------------------------------------

def _device_key(dev: DeviceModel) -> str:
    return dev.to_json()


@functools.lru_cache(maxsize=256)
def _kernel_exprs(form: str, dev_json: str, dtype_name: str, causal: bool, mask: bool, precision: str,
                  dsa: bool, sparse_k: bool):
    """[(kernel, compute_s, memory_s, launch_s, flops, vector, bytes)] in the canonical symbols."""
    dev = DeviceModel.from_dict(json.loads(dev_json))
    dtype = getattr(torch, dtype_name)
    esz = element_bytes(dtype)
    out = []
    kernels = form_kernels(form, causal=causal, fused=dev.fused_attention, mask=mask,
                           selected=sy.k if sparse_k else None, dsa_mask=dsa and form in DENSE_FORMS)
    for kn in kernels.values():
        fl, vec, by = (sympy.expand(x.subs(sy.e, esz)) for x in (kn.flops, kn.vector, kn.bytes))
        comp, mem, launch = kernel_time(dev, dtype, form, kn.name, fl, vec, by, kn.launches,
                                        occupancy(kn, dev.sm_count))
        out.append((kn.name, comp, mem, launch, fl, vec, by))
    return tuple(out)


@functools.lru_cache(maxsize=256)
def _lambdas(form, dev_json, dtype_name, causal, mask, precision, dsa, sparse_k):
    """Numeric per-kernel (compute, memory, launch) and flops/bytes of the canonical expressions."""
    ks = _kernel_exprs(form, dev_json, dtype_name, causal, mask, precision, dsa, sparse_k)
    args = sy.SIZES
    fn = sympy.lambdify(args, [[c, m, l, f, v, b] for _, c, m, l, f, v, b in ks], modules="math")
    return [name for name, *_ in ks], fn


def _sympify_size(name, v):
    if v is None:
        return None
    if isinstance(v, torch.SymInt):
        return sympy.sympify(v.node.expr)
    if isinstance(v, bool):
        raise TypeError(f"{name}: expected an int or a sympy expression, got a bool")
    if isinstance(v, int):
        if v < 0 or (v == 0 and name not in ("qk_rope_head_dim",)):
            raise ValueError(f"{name}: expected a positive size, got {v}")
        return sympy.Integer(v)
    if isinstance(v, (sympy.Expr, str)):
        return sympy.sympify(v)
    if hasattr(v, "__index__"):
        return sympy.Integer(int(v))
    raise TypeError(f"{name}: expected an int, a torch.SymInt or a sympy expression, got {type(v).__name__}")


def resolve_device(device) -> DeviceModel:
    """The roofline figures `device` names: a DeviceModel as given, a table name ("h200", "cpu", ...)
    its table entry, else (a torch.device, "cuda", ...) the calibrated figures or the GPU's table entry."""
    if isinstance(device, DeviceModel):
        return device
    if isinstance(device, str) and device.lower() in DEVICES:
        return table_entry(device)                      # a table name: the table's figures
    return load_device(device)                          # torch.device / "cuda": calibrated or table


def _fmt(x: float, unit: str) -> str:
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"), (1, "")):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}"


def _fmt_s(t: float) -> str:
    return f"{t * 1e3:.3f} ms" if t >= 1e-3 else f"{t * 1e6:.1f} us"


def _short(expr, digits=4) -> str:
    expr = sympy.sympify(expr)
    if expr.is_number:
        v = float(expr)
        return f"{v:.{digits}g}"
    return str(sympy.N(expr, digits))


# -- crossover -----------------------------------------------------------------------------------

@dataclass
class Crossover:
    """Where time(form_a) == time(form_b) along `symbol`; iterable as (boundary, text)."""
    form_a: str
    form_b: str
    symbol: sympy.Symbol
    boundaries: list            # closed forms, ascending (at the hints)
    points: list                # their numeric values at the hints
    winners: list               # cheaper form in each interval: below the first boundary, ..., above the last
    text: str
    domain: tuple = (1.0, float(SCAN_MAX))

    @property
    def boundary(self):
        return self.boundaries[0] if self.boundaries else None

    def winner_at(self, value: float) -> str:
        i = sum(1 for p in self.points if value > p)
        return self.winners[i]

    def __iter__(self):
        yield self.boundary
        yield self.text

    def __str__(self):
        return self.text


def _canon_hints(hints: Optional[dict]) -> dict:
    out = {}
    for key, v in (hints or {}).items():
        try:
            out[str(sy.resolve(key))] = v
        except KeyError:
            out[str(key)] = v
    return out


def _nearest_root(eq, x, root: float, hint_vals: dict):
    """The exact root of the (at most quadratic, usually) polynomial `eq` in x nearest `root`."""
    try:
        poly = sympy.Poly(eq, x)
        deg = poly.degree()
        if deg == 1:
            a, b = poly.all_coeffs()
            sols = [-b / a]
        elif deg == 2:
            a, b, c = poly.all_coeffs()
            # p -+ sqrt(q), each side cancelled and expanded so the sizes read plainly
            p_ = sympy.expand(sympy.cancel(-b / (2 * a)))
            q_ = sympy.expand(sympy.cancel((b ** 2 - 4 * a * c) / (4 * a ** 2)))
            sols = [p_ - sympy.sqrt(q_), p_ + sympy.sqrt(q_)]
        else:
            sols = sympy.solve(eq, x)
    except (sympy.PolynomialError, NotImplementedError, ValueError, TypeError):
        return sympy.Float(root)
    best, dist = None, math.inf
    for s_ in sols:
        try:
            v = complex(sympy.sympify(s_).subs(hint_vals))
        except (TypeError, ValueError):
            continue
        if abs(v.imag) > 1e-6 * max(1.0, abs(v.real)):
            continue
        d = abs(v.real - root)
        if d < dist:
            best, dist = s_, d
    if best is None or dist > 1e-3 * max(1.0, root):
        return sympy.Float(root)
    best = sympy.sympify(best)
    if not any(isinstance(a, sympy.Pow) and not a.exp.is_integer for a in best.atoms(sympy.Pow)):
        best = sympy.expand(best)                       # rational in the other sizes: a + b*T + c/B
    return best


def _bisect(f, lo, hi, flo):
    for _ in range(80):
        mid = math.sqrt(lo * hi) if lo > 0 else (lo + hi) / 2
        fm = f(mid)
        if (fm > 0) == (flo > 0):
            lo, flo = mid, fm
        else:
            hi = mid
        if hi - lo <= 1e-9 * max(1.0, hi):
            break
    return (lo + hi) / 2


# -- the plan ------------------------------------------------------------------------------------

@dataclass
class Plan:
    form: Optional[str]                     # cheapest form (None where sizes are symbolic)
    costs: dict                             # form -> predicted seconds (empty where symbolic)
    device: dict                            # the figures used
    candidates: tuple
    values: dict                            # canonical symbol -> the plan's value (int or sympy expr)
    causal: bool
    dtype: torch.dtype
    mask: bool = False
    hints: dict = field(default_factory=dict)
    _key: tuple = ()
    _model: Optional[DeviceModel] = None
    _exprs: dict = field(default_factory=dict)
    _sparse_k: bool = True          # sparse forms select k (T > k); False: min(k, T) (explicit forms at T <= k)
    _hopper_dev: Optional[str] = None   # with a symbolic S: the device key to use where S evaluates to 1
    _base_dev: Optional[str] = None     # with S = 1 and a Hopper kernel's figures: the key to use where S != 1
    excluded: str = ""              # candidates left out, and why

    def _sel_k(self, form: str) -> bool:
        return form in SPARSE_FORMS and self._sparse_k

    @property
    def generic_expressions(self) -> dict:
        """form -> time (s) in the canonical symbols B, S, T, H, r, dr, dn, dv, k."""
        if "generic" not in self._exprs:
            self._exprs["generic"] = {f: roofline_time(_kernel_exprs(f, *self._key, self._sel_k(f)))
                                      for f in self.candidates}
        return self._exprs["generic"]

    @property
    def expressions(self) -> dict:
        """form -> time (s) with the plan's sizes substituted (a number where all sizes are numbers)."""
        if "bound" not in self._exprs:
            full = {s: (v if v is not None else sympy.Integer(0)) for s, v in self.values.items()}
            self._exprs["bound"] = {f: roofline_time(_kernel_exprs(f, *self._key, self._sel_k(f)), full)
                                    for f in self.candidates}
        return self._exprs["bound"]

    # numeric evaluation ---------------------------------------------------------------------
    def _kernels(self, form, sizes):
        key = self._key
        if self._hopper_dev is not None and sizes[sy.S] == 1:
            key = (self._hopper_dev,) + key[1:]
        elif self._base_dev is not None and sizes[sy.S] != 1:   # the Gluon kernels take one query only
            key = (self._base_dev,) + key[1:]
        if key[-1] and form in DENSE_FORMS and sizes[sy.T] <= sizes[sy.k]:
            key = key[:-1] + (False,)                    # T <= k: dense runs without the top-k mask
        names, fn = _lambdas(form, *key, self._sel_k(form))
        rows = fn(*[sizes[s] for s in sy.SIZES])
        return [(n, *row) for n, row in zip(names, rows)]

    def _sizes(self, overrides=None) -> dict:
        """Canonical symbol -> float, from the plan's values, overrides (see _canon) and hints."""
        canon, by_sym = overrides or ({}, {})
        out = {}
        for s in sy.SIZES:
            v = self.values.get(s)
            if s in canon:
                out[s] = float(canon[s])
            elif v is not None and v.is_number:
                out[s] = float(v)
            elif v is not None:
                sub = {f: by_sym[f] if f in by_sym else self._hint_for(f, {**DEFAULT_HINTS, **self.hints})
                       for f in v.free_symbols}
                out[s] = float(v.subs(sub))
            else:
                out[s] = float(self.hints.get(str(s), DEFAULT_HINTS[str(s)]))
        return out

    def times(self, sizes: Optional[dict] = None) -> dict:
        """form -> predicted seconds at `sizes` ({'S': 1, 'T': 5000} / canonical or plan symbols)."""
        sz = self._sizes(self._canon(sizes))
        return {f: sum(max(c, m) + l for _, c, m, l, *_ in self._kernels(f, sz)) for f in self.candidates}

    def choose(self, sizes: Optional[dict] = None) -> str:
        """The cheapest eligible form at `sizes` (sparse forms only where T > k)."""
        sz = self._sizes(self._canon(sizes))
        t = {f: sum(max(c, m) + l for _, c, m, l, *_ in self._kernels(f, sz)) for f in self.candidates}
        ok = [f for f in self.candidates if f in DENSE_FORMS or sz[sy.T] > sz[sy.k]]
        return min(ok, key=t.__getitem__)

    def _canon(self, sizes):
        """sizes keyed by canonical names ('S'), argument names ('q_len') or the plan's own symbols
        ('s0') -> ({canonical symbol: value}, {plan symbol: value})."""
        canon, by_sym = {}, {}
        dyn = {str(d): d for d in self.dynamic_symbols()}
        for key, v in (sizes or {}).items():
            if str(key) in dyn:
                by_sym[dyn[str(key)]] = v
                continue
            c = sy.resolve(key)                          # KeyError for an unknown name
            canon[c] = v
            val = self.values.get(c)
            if isinstance(val, sympy.Symbol) and val in dyn.values():
                by_sym[val] = v
        return canon, by_sym

    # crossover -------------------------------------------------------------------------------
    def crossover(self, form_a: str, form_b: str, symbol, hints: Optional[dict] = None) -> Crossover:
        """Closed-form boundary along `symbol` ('S', 'T', 'B', 'k', ...) where the two forms cost the
        same, the plan's other sizes held (symbolic ones stay symbolic; hints pick the branch)."""
        for f in (form_a, form_b):
            if f not in FORMS:
                raise ValueError(f"unknown form {f!r}")
        hints = {**DEFAULT_HINTS, **self.hints, **_canon_hints(hints)}
        dyn = {str(d): d for d in self.dynamic_symbols()}
        values = {s: v for s, v in self.values.items() if v is not None}
        try:
            canon = sy.resolve(symbol)
        except KeyError:
            canon = None
        if canon is not None and canon in values and isinstance(values[canon], sympy.Symbol) \
                and values[canon] in dyn.values():
            symbol = values[canon]                      # the canonical size is one of the plan's symbols
        if str(symbol) in dyn:                          # along one of the plan's own symbols (e.g. s0)
            user = dyn[str(symbol)]
            x = sympy.Symbol(str(user), positive=True)
            subs = {s: v.subs(user, x) for s, v in values.items()}
            sym = user
        elif canon is not None:                         # along a canonical size, the others held
            x = sympy.Symbol(str(canon), positive=True)
            subs = {**values, canon: x}
            sym = canon
        else:
            raise KeyError(f"crossover: unknown size {symbol!r}")
        parts, launch = [], 0.0
        # along S from a plan at S = 1, the figures of S > 1 (the Gluon kernels take one query only)
        key = (self._base_dev,) + self._key[1:] if self._base_dev is not None and sym == sy.S else self._key
        for f, sign in ((form_a, 1), (form_b, -1)):
            for _, c, m, l, *_ in _kernel_exprs(f, *key, self._sel_k(f)):
                parts.append((sign, sympy.expand(c.subs(subs)), sympy.expand(m.subs(subs))))
                launch += sign * float(l)
        others = sorted(set().union(*[c.free_symbols | m.free_symbols for _, c, m in parts]) - {x}, key=str)
        hint_vals = {o: float(hints.get(str(o), self._hint_for(o, hints))) for o in others}
        ov = [hint_vals[o] for o in others]
        num = sympy.lambdify([x] + others, [[c, m] for _, c, m in parts], modules="math")
        signs = [sg for sg, _, _ in parts]

        def f(v: float) -> float:
            return sum(sg * max(cm) for sg, cm in zip(signs, num(v, *ov))) + launch

        # domain: sizes >= 1, S <= T, k <= T (T includes the new tokens)
        zero = sympy.Integer(0)
        size_fn = sympy.lambdify([x] + others, [subs.get(sy.S, zero), subs.get(sy.T, zero),
                                                 subs.get(sy.k, zero) if sym == sy.k else zero], modules="math")

        def valid(v: float) -> bool:
            sv, tv, kv = size_fn(v, *ov)
            return sv <= tv * (1 + 1e-12) and kv <= tv * (1 + 1e-12)

        lo, hi = 1.0, float(SCAN_MAX)
        if sym in (sy.S, sy.k) and sy.T in values:
            hi = min(hi, self._num(values[sy.T], hint_vals, hints))
        elif sym == sy.T and sy.S in values:
            lo = max(1.0, self._num(values[sy.S], hint_vals, hints))
            if (form_a in SPARSE_FORMS or form_b in SPARSE_FORMS) and sy.k in values:
                lo = max(lo, self._num(values[sy.k], hint_vals, hints) + 1)   # sparse only where T > k
        grid = [lo * (hi / lo) ** (i / 600) for i in range(601)] if hi > lo else [lo]
        grid = [g for g in grid if valid(g)]
        if not grid:
            raise ValueError(f"crossover: no valid {sym} (S <= T must hold) at the hints")
        lo, hi = grid[0], grid[-1]
        vals = [f(g) for g in grid]
        points, bounds = [], []
        for g0, v0, g1, v1 in zip(grid, vals, grid[1:], vals[1:]):
            if v0 == 0 or v1 == 0 or (v0 > 0) == (v1 > 0):
                continue
            root = _bisect(f, g0, g1, v0)
            # the branch of every max() active at the root -> a polynomial equation, solved exactly
            eq = sympy.Float(launch) + sympy.Add(*[sg * (c if cm[0] >= cm[1] else m)
                                                   for (sg, c, m), cm in zip(parts, num(root, *ov))])
            points.append(root)
            bounds.append(_nearest_root(eq, x, root, hint_vals))
        winners = []
        probes = [lo] + [(a + b) / 2 for a, b in zip(points, points[1:])] + [hi] if points else [lo]
        for pv in probes:
            winners.append(form_a if f(pv) < 0 else form_b)
        if not points:
            text = (f"{winners[0]} for all {sym} in [{lo:.4g}, {hi:.4g}] "
                    f"(no crossover with {form_b if winners[0] == form_a else form_a})")
        else:
            parts_txt = []
            for i, w in enumerate(winners):
                if i == 0:
                    parts_txt.append(f"{w} while {sym} < {_short(bounds[0])}")
                elif i == len(winners) - 1:
                    parts_txt.append(f"{w} while {sym} > {_short(bounds[-1])}")
                else:
                    parts_txt.append(f"{w} while {_short(bounds[i - 1])} < {sym} < {_short(bounds[i])}")
            text = "; ".join(parts_txt)
            if others:
                text += "  (branches chosen at " + ", ".join(f"{o}={hint_vals[o]:g}" for o in others) + ")"
        return Crossover(form_a, form_b, sym, bounds, points, winners, text, (lo, hi))

    def _hint_for(self, o, hints):
        """A value for the plan's symbol `o`: hints[name of o], else the hint of the size it stands for."""
        if str(o) in hints:
            return hints[str(o)]
        for s, v in self.values.items():
            if v is not None and v == o:
                return hints.get(str(s), DEFAULT_HINTS.get(str(s), 1024))
        return 1024

    def _num(self, v, hint_vals, hints) -> float:
        v = sympy.sympify(v)
        if v.is_number:
            return float(v)
        return float(v.subs({f: hint_vals.get(f, self._hint_for(f, hints)) for f in v.free_symbols}))

    # runtime chooser -------------------------------------------------------------------------
    def dynamic_symbols(self) -> list:
        fs = set()
        for v in self.values.values():
            if v is not None and not v.is_number:
                fs |= v.free_symbols
        return sorted(fs, key=str)

    def runtime_chooser(self) -> tuple[Callable[[dict], str], str]:
        dyn = self.dynamic_symbols()
        if not dyn:
            form = self.form
            return (lambda sizes=None: form), f"{form} at every size (no symbolic sizes)"
        aliases: dict = {}
        for s in dyn:
            aliases[str(s)] = s
        for canon, v in self.values.items():
            if v is not None and isinstance(v, sympy.Symbol) and v in dyn:
                aliases[str(canon)] = v
                aliases[sy.SYMBOL_TO_ARG[canon]] = v
        cands = self.candidates
        full = {s: (v if v is not None else sympy.Integer(0)) for s, v in self.values.items()}

        def lambdas(key):
            exprs = self.expressions if key == self._key else \
                {f: roofline_time(_kernel_exprs(f, *key, self._sel_k(f)), full) for f in cands}
            fns = [sympy.lambdify(dyn, exprs[f], modules="math") for f in cands]
            # where T <= k the selection is every token: dense forms run without HF's top-k mask
            plain_key = key[:-1] + (False,)
            plain = [sympy.lambdify(dyn, roofline_time(_kernel_exprs(f, *plain_key, False), full), modules="math")
                     if f in DENSE_FORMS else None for f in cands]
            return fns, plain

        tables = [lambdas(self._key)]
        S_fn = None
        if self._hopper_dev is not None:     # S symbolic: where it is 1, the Hopper kernel's figures
            tables.append(lambdas((self._hopper_dev,) + self._key[1:]))
            S_fn = sympy.lambdify(dyn, self.values[sy.S], modules="math")
        Tv, kv = self.values.get(sy.T), self.values.get(sy.k)
        T_fn = sympy.lambdify(dyn, Tv, modules="math") if Tv is not None else None
        k_fn = sympy.lambdify(dyn, kv, modules="math") if kv is not None else None
        sparse_idx = [i for i, f in enumerate(cands) if f in SPARSE_FORMS]
        order = [str(s) for s in dyn]
        cache: dict = {}

        def choose(sizes: dict) -> str:
            try:
                key = tuple(sizes[n] for n in order)
            except KeyError:
                vals = {}
                for name, v in sizes.items():
                    if name in aliases:
                        vals[aliases[name]] = v
                missing = [str(s) for s in dyn if s not in vals]
                if missing:
                    raise KeyError(f"runtime chooser needs sizes {missing} (got {sorted(sizes)})")
                key = tuple(vals[s] for s in dyn)
            hit = cache.get(key)
            if hit is not None:
                return hit
            best, bt = None, math.inf
            sparse_ok = bool(sparse_idx) and T_fn is not None and k_fn is not None and T_fn(*key) > k_fn(*key)
            fns, plain = tables[1 if S_fn is not None and S_fn(*key) == 1 else 0]
            for i, fn in enumerate(fns):
                if i in sparse_idx and not sparse_ok:
                    continue
                t = fn(*key) if sparse_ok or plain[i] is None else plain[i](*key)
                if t < bt:
                    best, bt = cands[i], t
            if len(cache) < 4096:
                cache[key] = best
            return best

        return choose, self._crossover_text(dyn)

    def _crossover_text(self, dyn) -> str:
        """Crossovers along each symbolic size: dense pair, and sparse vs absorbed along T's symbol."""
        lines = []
        for d in dyn:
            if "absorbed" in self.candidates and "expanded" in self.candidates:
                c = self.crossover("absorbed", "expanded", d)
                lines.append(f"dense, along {d}: {c.text}")
            if "sparse_absorbed" in self.candidates and "absorbed" in self.candidates \
                    and d in self.values[sy.T].free_symbols:
                c = self.crossover("sparse_absorbed", "absorbed", d)
                lines.append(f"sparse (only where T > k), along {d}: {c.text}")
        return "\n".join(lines) or "no crossover along the symbolic sizes"

    # explain ---------------------------------------------------------------------------------
    def explain(self) -> str:
        d = self.device
        sizes = " ".join(f"{s}={v}" for s, v in self.values.items() if v is not None)
        lines = [
            f"MLA cost plan on {d['name']} ({d['dtype']}; matmul {_fmt(d['matmul_flops'], 'FLOP/s')}, "
            f"memory {_fmt(d['mem_bw'], 'B/s')}, launch {d['launch_overhead'] * 1e6:.3g} us; "
            f"{'measured' if d['measured'] else 'table'}: {d['source']})",
            f"sizes: {sizes}; {'causal' if self.causal else 'not causal'}"
            + ("; mask tensor read" if self.mask else ""),
        ]
        if d.get("warning"):
            lines.append(f"WARNING: {d['warning']}")
        if self.form is None:
            lines.append("symbolic sizes: time expressions (seconds)")
            for f in self.candidates:
                lines.append(f"  {f}: {_short(self.expressions[f])}")
            dyn = self.dynamic_symbols()
            lines.append(self._crossover_text(dyn))
            return "\n".join(lines)
        sz = self._sizes()
        summary = {}
        lines.append(f"{'form':<16} {'FLOP':>11} {'bytes':>10} {'time':>11}  bound")
        for f in sorted(self.candidates, key=self.costs.__getitem__):
            ks = self._kernels(f, sz)
            flops = sum(k[4] for k in ks)
            byts = sum(k[6] for k in ks)
            comp = sum(max(c, m) for _, c, m, *_ in ks if c >= m)
            mem = sum(max(c, m) for _, c, m, *_ in ks if c < m)
            launch = sum(k[3] for k in ks)
            bound = "compute" if comp >= mem else "memory"
            if launch > max(comp, mem):
                bound = "launch overhead"
            summary[f] = (ks, bound)
            tag = "  <- chosen" if f == self.form else ""
            lines.append(f"{f:<16} {_fmt(flops, 'FLOP'):>11} {_fmt(byts, 'B'):>10} {_fmt_s(self.costs[f]):>11}  {bound}{tag}")
            for name, c, m, l, fl, vec, by in ks:
                kb = "compute" if c >= m else "memory"
                lines.append(f"    {name:<12} {_fmt(fl, 'FLOP'):>11} {_fmt(by, 'B'):>10} {_fmt_s(max(c, m) + l):>11}  {kb}")
        if self.excluded:
            lines.append(f"not considered: {self.excluded}")
        ranked = sorted(self.candidates, key=self.costs.__getitem__)
        if len(ranked) > 1:
            w, r2 = ranked[0], ranked[1]
            ks, _ = summary[r2]
            top = max(ks, key=lambda k: max(k[1], k[2]) + k[3])
            why = (f"{w} wins: {_fmt_s(self.costs[w])} vs {r2} {_fmt_s(self.costs[r2])} "
                   f"({self.costs[r2] / self.costs[w]:.3g}x). {r2} spends {_fmt_s(max(top[1], top[2]) + top[3])} in its "
                   f"'{top[0]}' kernel ({'compute' if top[1] >= top[2] else 'memory'}-bound: "
                   f"{_fmt(top[4], 'FLOP')}, {_fmt(top[6], 'B')})")
            wks, wb = summary[w]
            wtop = max(wks, key=lambda k: max(k[1], k[2]) + k[3])
            why += (f"; {w}'s largest kernel is '{wtop[0]}' ({_fmt_s(max(wtop[1], wtop[2]) + wtop[3])}, "
                    f"{'compute' if wtop[1] >= wtop[2] else 'memory'}-bound).")
            if w in ("absorbed", "sparse_absorbed") and "expanded" in self.costs:
                why += " Absorption never expands the cache: it reads the latent once per batch row."
            if w == "expanded" and "absorbed" in self.costs:
                why += (" With many queries the expansion is amortised and the narrower per-head dot "
                        f"products (dn+dr+dv = {sz[sy.dn] + sz[sy.dr] + sz[sy.dv]:g} vs 2r+dr = "
                        f"{2 * sz[sy.r] + sz[sy.dr]:g} multiply-adds per score) win.")
            lines.append(why)
        return "\n".join(lines)



def _with_hopper_decode(dev: DeviceModel, dtype: torch.dtype, values: dict) -> DeviceModel:
    """`dev` with a Hopper Gluon kernel's efficiencies as "absorbed.attention" where that kernel will run:
    the table is an sm_90 one (it carries HOPPER_DECODE_KEY) and `kernels.registry.absorbed_core`, the
    rule the absorbed op launches by, names a Gluon kernel for these sizes. Static sizes only: a
    symbolic S or H keeps the Triton kernel's figure."""
    if HOPPER_DECODE_KEY not in dev.efficiency:
        return dev
    sizes = [values[s] for s in (sy.H, sy.S, sy.r, sy.dr)]
    if not all(v is not None and v.is_number for v in sizes):
        return dev
    core = absorbed_core(dtype, *(int(v) for v in sizes), is_causal=False, sm90=True)
    if core == "keys_major" and KEYS_MAJOR_DECODE_KEY in dev.efficiency:
        return dev.copy(efficiency={**dev.efficiency, "absorbed.attention": dev.efficiency[KEYS_MAJOR_DECODE_KEY]},
                        mem_efficiency={**dev.mem_efficiency,
                                        "absorbed.attention": dev.mem_efficiency[KEYS_MAJOR_DECODE_KEY]})
    if core == "seesaw":
        return dev.copy(efficiency={**dev.efficiency, "absorbed.attention": dev.efficiency[HOPPER_DECODE_KEY]})
    return dev


def plan(batch=1, q_len=1, kv_len=None, heads=None, kv_lora_rank=None, qk_rope_head_dim=None,
         qk_nope_head_dim=None, v_head_dim=None, topk=None, dtype=torch.bfloat16, device="h200",
         causal=None, forms=None, *, mask: bool = False, hints: Optional[dict] = None) -> Plan:
    """Predict each candidate form's time and pick the cheapest; sizes may be ints or sympy expressions.

    causal=None means True (decoder attention; identical to non-causal at q_len=1).
    mask=True counts reading a [B,1,S,T] mask tensor (same for both dense forms).
    hints: values for symbolic sizes where a branch or root must be picked ({'T': 4096, ...}).
    """
    args = dict(batch=batch, q_len=q_len, kv_len=kv_len, heads=heads, kv_lora_rank=kv_lora_rank,
                qk_rope_head_dim=qk_rope_head_dim, qk_nope_head_dim=qk_nope_head_dim, v_head_dim=v_head_dim,
                topk=topk)
    for name in ("kv_len", "heads", "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim"):
        if args[name] is None:
            raise TypeError(f"plan(): {name} is required")
    values = {sy.ARG_TO_SYMBOL[n]: _sympify_size(n, v) for n, v in args.items()}
    if dtype not in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        raise TypeError(f"plan(): dtype must be a floating torch dtype, got {dtype}")
    base = resolve_device(device)
    dev = _with_hopper_decode(base, dtype, values)
    hopper_dev = None
    if dev is base and not values[sy.S].is_number:
        at_one = _with_hopper_decode(base, dtype, {**values, sy.S: sympy.Integer(1)})
        hopper_dev = _device_key(at_one) if at_one is not base else None
    causal = True if causal is None else bool(causal)
    S_, T_, k_ = values[sy.S], values[sy.T], values[sy.k]
    if S_.is_number and T_.is_number and S_ > T_:
        raise ValueError(f"plan(): q_len {S_} > kv_len {T_}: the key length includes the new tokens")

    excluded = ""
    if forms is not None:
        cands = tuple(forms)
        for f in cands:
            if f not in FORMS:
                raise ValueError(f"unknown form {f!r}: expected some of {FORMS}")
        if k_ is None and any(f in SPARSE_FORMS for f in cands):
            raise ValueError("plan(): sparse forms need topk")
    elif k_ is None:
        cands = DENSE_FORMS
    elif T_.is_number and k_.is_number and T_ <= k_:
        cands = DENSE_FORMS
        excluded = f"sparse forms (kv_len {T_} <= topk {k_}: the selection is every token, dense is exact)"
    else:
        cands = DENSE_FORMS + SPARSE_FORMS

    if k_ is None:
        values[sy.k] = None
    dtype_name = str(dtype).replace("torch.", "")
    # the fp32 matmul rate depends on torch.get_float32_matmul_precision() (TF32 or not)
    # a DSA model run densely keeps HF's top-k mask (unless T <= k is known: the selection is everything)
    dsa = k_ is not None and not (T_.is_number and k_.is_number and T_ <= k_)
    key = (_device_key(dev), dtype_name, causal, bool(mask), torch.get_float32_matmul_precision(), dsa)
    numeric = all(v is None or v.is_number for v in values.values())
    figures = {
        "name": dev.name, "dtype": dtype_name, "matmul_flops": dev.matmul_rate(dtype),
        "vector_flops": dev.vector_flops, "mem_bw": dev.mem_bw, "launch_overhead": dev.launch_overhead,
        "efficiency": dict(dev.efficiency), "mem_efficiency": dict(dev.mem_efficiency),
        "fused_attention": dev.fused_attention, "measured": dev.measured, "source": dev.source,
        "warning": dev.warning,
    }
    p = Plan(form=None, costs={}, device=figures,
             candidates=cands, values=values, causal=causal, dtype=dtype, mask=bool(mask),
             hints=_canon_hints(hints),
             _key=key, _model=dev)
    p.excluded = excluded
    p._sparse_k = not (T_.is_number and k_ is not None and k_.is_number and T_ <= k_)
    p._hopper_dev = hopper_dev
    p._base_dev = _device_key(base) if dev is not base else None
    if numeric:
        p.costs = p.times()
        p.form = min(cands, key=p.costs.__getitem__)
    return p


def runtime_chooser(hints: Optional[dict] = None, **plan_args) -> tuple[Callable[[dict], str], str]:
    """plan(**plan_args) with some sizes symbolic -> (choose(sizes) -> form, crossover text).

    choose() is lambdified and memoised: it takes {'S': 1, 'T': 5000, 'B': 8} (canonical names,
    plan argument names, or the names of the symbols passed in) and applies the candidate rule
    (sparse forms only where T > k)."""
    return plan(hints=hints, **plan_args).runtime_chooser()
