"""stripeconv: stripe-wise pruned convolutions that run faster than dense.

``StripeConv2d`` is a drop-in for ``nn.Conv2d`` whose filters keep only some of their stripes
(one filter's weights at one kernel position). It stores and computes only the kept stripes,
through one op (``torch.ops.stripeconv.stripe_conv2d``) with compiled CPU, Triton and CUDA
backends.
"""
from . import backends, data, models, ops, pruning
from .backends import available_backends, get_backend, set_backend
from .decompose import export_onnx
from .export import export
from .fusion import fuse_batchnorm
from .nn import StripeConv2d, convert
from .packing import pack_weight, unpack_weight
from .profile import profile
from .reorder import reorder_filters, reorderable

__version__ = "0.1.0"

backends._apply_environment()  # STRIPECONV_BACKEND, once every backend's imports can complete
backends._module("cpu")  # registers torch.ops.stripeconv_cpu.*, which scripted models call on CPU

__all__ = [
    "StripeConv2d",
    "convert",
    "set_backend",
    "get_backend",
    "available_backends",
    "pack_weight",
    "unpack_weight",
    "ops",
    "profile",
    "export",
    "fuse_batchnorm",
    "reorder_filters",
    "reorderable",
    "export_onnx",
    "models",
    "data",
    "pruning",
]
