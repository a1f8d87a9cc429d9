"""The cost model: which MLA form is cheapest for given sizes on a given device.

    from mla_compile.cost import plan
    p = plan(batch=8, q_len=1, kv_len=4096, heads=128, kv_lora_rank=512, qk_rope_head_dim=64,
             qk_nope_head_dim=128, v_head_dim=128, device="h200")
    p.form                                   # 'absorbed'
    print(p.explain())

work.py counts each form's FLOPs and bytes symbolically, devices.py holds the roofline table,
calibrate.py measures a device, plan.py chooses (and gives crossovers and a runtime chooser).
"""

from mla_compile.cost.calibrate import calibrate, load_device
from mla_compile.cost.devices import DEVICES, DeviceModel
from mla_compile.cost.plan import Crossover, Plan, plan, runtime_chooser

__all__ = ["DEVICES", "Crossover", "DeviceModel", "Plan", "calibrate", "load_device", "plan", "runtime_chooser"]
