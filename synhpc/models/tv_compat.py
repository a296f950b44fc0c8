"""Import torchvision even where its compiled extension cannot load (CPU-only torch builds).

torchvision's ``_C.so`` is built against CUDA torch; with a ``+cpu`` torch it fails to load, and then importing
torchvision raises ``operator torchvision::nms does not exist`` because ``_meta_registrations`` registers fake
kernels for ops that were never defined. We only need the model definitions, so defining the two schemas it
trips over (without kernels) is enough. The real extension always wins when it loads.

Usage::

    torchvision = import_torchvision()
    net = torchvision.models.video.r3d_18(weights=None)
"""

from __future__ import annotations

import sys
import types

import torch

# Kept alive at module level: dropping the Library object would deregister the schemas.
_SHIM_LIBRARY: torch.library.Library | None = None

# The schemas exactly as torchvision's csrc/ops/nms.cpp declares them.
_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)


def _forget_partial_import() -> None:
    # A failed import leaves half-initialised torchvision modules behind; a second import must start clean.
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]


def shim_active() -> bool:
    """True when torchvision was imported through the schema shim (its detection/NMS ops have no kernels)."""
    return _SHIM_LIBRARY is not None


def import_torchvision() -> types.ModuleType:
    """Return the torchvision module, defining the ``nms``/``qnms`` schemas first only if the extension failed."""
    global _SHIM_LIBRARY
    try:
        import torchvision

        return torchvision
    except RuntimeError as exc:
        if "torchvision::nms does not exist" not in str(exc) or _SHIM_LIBRARY is not None:
            raise
    _forget_partial_import()
    lib = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS:
        lib.define(schema)
    _SHIM_LIBRARY = lib
    import torchvision

    return torchvision
