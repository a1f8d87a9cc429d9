"""The MLA forms, each a `torch.library.triton_op` (namespace `mla`) with a plain-torch reference and an
opaque twin (`mla.<form>_opaque`, for calls Inductor cannot inline): `expanded`, `absorbed`,
`sparse_absorbed`, `sparse_expanded`."""

from mla_compile.passes.forms.ops import DENSE_FORMS, FORMS, SPARSE_FORMS, op_for, reference_for

__all__ = ["DENSE_FORMS", "FORMS", "SPARSE_FORMS", "op_for", "reference_for"]

import mla_compile.passes.forms.autograd  # noqa: E402,F401  (registers the backward formulas)
import mla_compile.passes.forms.latent_mqa  # noqa: E402,F401  (registers torch.ops.mla.latent_mqa)
