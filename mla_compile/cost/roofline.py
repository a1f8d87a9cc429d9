"""The device roofline: a kernel's predicted time from its work, the one rule every cost model here
uses (plan.py for the MLA forms, shared_kv.py for one shared key/value head).

A kernel with `flops` tensor-core FLOPs, `vector` element-wise ops and `bytes` of DRAM traffic
(work.py's counting rules), launched `launches` times at `occupancy` of the device's full speed:

    compute = (flops / (matmul rate x eff) + vector / vector rate) / occupancy
    memory  = bytes / (bandwidth x mem_eff) / occupancy
    launch  = launches x launch overhead

eff and mem_eff are the device's fitted efficiencies of that kernel of that form. A form's time is the
sum over its kernels of max(compute, memory) + launch: a kernel waits on its slower side, and kernels
run one after another.
"""

from __future__ import annotations

import sympy
import torch

from mla_compile.cost.devices import DeviceModel


def element_bytes(dtype: torch.dtype) -> int:
    """Bytes of one element of `dtype`: the value of the symbol e in work.py's byte counts."""
    return torch.empty((), dtype=dtype).element_size()


def kernel_time(dev: DeviceModel, dtype: torch.dtype, form: str, kernel: str, flops, vector, nbytes, launches: int,
                occupancy=sympy.Integer(1)) -> tuple[sympy.Expr, sympy.Expr, sympy.Float]:
    """(compute, memory, launch) seconds of one kernel of `form` (see above); the work in sizes, with
    the element size already in the bytes."""
    compute = (sympy.sympify(flops) / sympy.Float(dev.matmul_rate(dtype) * dev.eff(form, kernel))
               + sympy.sympify(vector) / sympy.Float(dev.vector_flops)) / occupancy
    memory = sympy.sympify(nbytes) / sympy.Float(dev.mem_bw * dev.mem_eff(form, kernel)) / occupancy
    return compute, memory, sympy.Float(launches * dev.launch_overhead)


def roofline_time(kernels, subs=None, *, simplify: bool = False) -> sympy.Expr:
    """Sum over kernels of max(compute, memory) + launch. `kernels`: rows that start (name, compute,
    memory, launch); `subs`: sizes substituted first. Max is left unevaluated unless numeric (sympy's
    Max tries to prove an order between the arguments, which is slow and rarely succeeds on the MLA
    forms' expressions); `simplify` lets it try, for a small model whose expression the log shows
    (Max(0, memory) becomes memory)."""
    terms = []
    for _, c, m, l, *_ in kernels:
        if subs is not None:
            c, m = c.subs(subs), m.subs(subs)
        if c.is_number and m.is_number:
            terms.append(sympy.Float(max(float(c), float(m))) + l)
        else:
            terms.append(sympy.Max(c, m, evaluate=simplify) + l)
    return sympy.Add(*terms)
