"""``@triton.jit`` zoneout (Krueger et al. 2016) for the kernels that zone out their state.

The convention (what :mod:`fastrnn.ops.zoneout` passes and :mod:`fastrnn.regularization` draws):
a constexpr ``ZONEOUT``, 0 without zoneout (nothing below is traced, so the kernel compiles as it
would without these arguments), 1 in training with the 0/1 mask ``keep (T, B, D*H)`` (compute dtype,
1 keeps the previous state; direction ``d`` in features ``d*H:(d+1)*H``, the layout of the layer's
output), 2 in eval with the scalar ``zoneout_p`` (fp32) in its place. A step mixes
``s_t = keep * s_{t-1} + (1 - keep) * s_new``; past a row's length the kernels mix nothing.
"""

import triton
import triton.language as tl


@triton.jit
def zoneout_keep(keep_ptr, offs, ok, zoneout_p, ZONEOUT: tl.constexpr):
    """The weight of the previous state at ``offs`` (fp32): ``keep[offs]`` with ``ZONEOUT == 1``
    (masked by ``ok``), the scalar ``zoneout_p`` with ``ZONEOUT == 2``."""
    if ZONEOUT == 1:
        keep = tl.load(keep_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    else:
        keep = zoneout_p
    return keep
