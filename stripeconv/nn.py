"""StripeConv2d: a drop-in for ``nn.Conv2d`` that stores and computes only kept stripes."""
from __future__ import annotations

import math
import operator
import warnings
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from . import backends
from .ops import check_output_size, stripe_conv2d
from .packing import check_stripe_mask, pack_weight, unpack_weight

__all__ = ["StripeConv2d", "convert"]

_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
# One cheap call answers "no autocast anywhere", the common case (the per-device query costs ~1 us).
_any_autocast_enabled = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)
_IntOr2 = Union[int, tuple[int, int]]
_FxProxy = torch.fx.Proxy  # what torch.fx.symbolic_trace passes for the input


def _pair_of(name: str, value: _IntOr2, minimum: int) -> tuple[int, int]:
    """``value`` as an (h, w) pair of ints >= ``minimum``, or a ValueError naming ``name``."""
    try:
        pair = tuple(operator.index(v) for v in _pair(value))
    except TypeError:
        pair = ()
    if len(pair) != 2 or min(pair) < minimum:
        raise ValueError(f"{name} must be an int or a pair of ints >= {minimum}, got {value!r}")
    return pair


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype autocast runs convolutions in on ``device_type``, or None outside an autocast region."""
    if not _any_autocast_enabled():
        return None
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _constant_response(weight: Tensor, height: int, width: int, pads: list[int], stride: list[int],
                       dilation: list[int]) -> Tensor:
    """``[1, out, Ho, Wo]`` response of ``weight`` [out, kh, kw] to a channel of ones, zero in ``pads``."""
    ones = torch.ones(1, 1, height, width, device=weight.device, dtype=weight.dtype)
    ones = F.pad(ones, [pads[2], pads[3], pads[0], pads[1]])
    return F.conv2d(ones, weight.unsqueeze(1), None, stride, 0, dilation)


class StripeConv2d(nn.Module):
    r"""A 2-D convolution whose filters keep only some of their stripes.

    A stripe is one filter's weights at one kernel position, ``weight[n, :, i, j]``. The
    bool buffer ``stripe_mask`` ``[out_channels, kh, kw]`` says which stripes are kept; the
    layer computes exactly ``F.conv2d(x, weight * stripe_mask[:, None], bias, ...)`` as a sum
    of 1x1 convolutions over the kept positions, so its cost falls with the stripes pruned.
    With a NaN or Inf in the input, which outputs turn non-finite depends on the backend: the CPU
    kernels read no pruned stripe, so only outputs whose kept stripes read it; ``F.conv2d`` on the
    masked weight, like the ``dense`` backend and the dense hand-overs, multiplies it by the zero
    weight (NaN); the Triton kernels fall in between (a tile computes every position any of its
    filters keeps).

    The arguments mean what they mean for :class:`torch.nn.Conv2d`. Only kept stripes are
    stored and trained: the parameter ``packed_weight`` is ``[num_stripes, in_channels //
    groups]`` (see :mod:`stripeconv.packing`), and :attr:`weight` rebuilds the dense, masked
    weight on demand. ``stripe_mask=None`` keeps every stripe.

    ``load_state_dict`` takes the mask of the saved state, whatever mask this module had, and
    resizes ``packed_weight`` in place (an optimizer created earlier keeps a valid reference,
    though its per-parameter state no longer matches the new shape).

    The optional buffer ``constant_channel_weight`` ``[out_channels, kh, kw]`` (``None`` unless
    set, e.g. by :func:`stripeconv.export`) holds, per stripe, the weights of input channels that
    were removed because they carried a constant: the layer adds the response of
    ``constant_channel_weight`` to a channel of ones padded like the input (zeros with
    ``padding_mode="zeros"``), which, unlike a bias, is exact at the borders. It is fixed (not
    trained); the map is cached per input size.
    """

    # TorchScript compiles forward only (see _scripted_forward); these stay Python.
    __jit_unused_properties__ = ["weight", "num_stripes", "density"]
    __jit_ignored_attributes__ = ["_constant_map_cache", "_accepted_input"]
    # Set when the layer is scripted (__prepare_scriptable__): whether CPU input goes straight to the
    # compiled kernels with their C++ autograd, as in eager mode, rather than through the op.
    __constants__ = ["_script_cpu_kernels"]
    _script_cpu_kernels = False

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _IntOr2,
        stride: _IntOr2 = 1,
        padding: Union[str, _IntOr2] = 0,
        dilation: _IntOr2 = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: Optional[Union[str, torch.device]] = None,
        dtype: Optional[torch.dtype] = None,
        stripe_mask: Optional[Tensor] = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        if groups <= 0 or in_channels % groups or out_channels % groups:
            raise ValueError(
                f"in_channels ({in_channels}) and out_channels ({out_channels}) must be divisible "
                f"by groups ({groups}), which must be positive"
            )
        if padding_mode not in _PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {_PADDING_MODES}, got {padding_mode!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair_of("kernel_size", kernel_size, 1)
        self.stride = _pair_of("stride", stride, 1)
        self.dilation = _pair_of("dilation", dilation, 1)
        self.groups = groups
        self.padding_mode = padding_mode
        self.transposed, self.output_padding = False, (0, 0)  # nn.Conv2d's, which tools read
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"padding must be 'same', 'valid' or int/tuple, got {padding!r}")
            if padding == "same" and self.stride != (1, 1):
                raise ValueError("padding='same' is not supported for strided convolutions")
            self.padding: Union[str, tuple[int, int]] = padding
        else:
            self.padding = _pair_of("padding", padding, 0)
        self._pads = self._explicit_padding()  # (top, bottom, left, right)

        if stripe_mask is None:
            stripe_mask = torch.ones(out_channels, *self.kernel_size, dtype=torch.bool, device="cpu")
        check_stripe_mask(stripe_mask, out_channels, self.kernel_size)
        # the mask decides the shape (also on the meta device, where it has no values)
        self.packed_weight = nn.Parameter(torch.empty(int(stripe_mask.sum()), in_channels // groups, **factory))
        self.register_buffer("stripe_mask", stripe_mask.to(self.packed_weight.device, copy=True))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels, **factory))
        else:
            self.register_parameter("bias", None)
        self.register_buffer("constant_channel_weight", None)
        self._constant_map_cache = None  # (key, map) for the last input size; see _constant_map
        self._accepted_input = None  # see _check_input
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise the weights as ``nn.Conv2d`` does, with the same random draws: Kaiming-uniform
        over the dense weight, of which the kept stripes are packed, and the bias uniform in
        ``±1/sqrt(fan_in)``. The mask stays."""
        weight = self.packed_weight
        fan_in = (self.in_channels // self.groups) * self.kernel_size[0] * self.kernel_size[1]
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0  # Kaiming-uniform's with a = sqrt(5), as for the bias
        if weight.is_meta:  # no values
            pass
        elif int(self.stripe_mask.count_nonzero()) == weight.shape[0]:
            dense = weight.new_empty(self.out_channels, self.in_channels // self.groups, *self.kernel_size)
            if dense.numel():  # zero channels: nothing to initialise (and no warning)
                nn.init.kaiming_uniform_(dense, a=math.sqrt(5))
            weight.copy_(pack_weight(dense, self.stripe_mask))
        else:  # a mask without values (to_empty() leaves it uninitialised): the same distribution, row by row
            weight.uniform_(-bound, bound)
        if self.bias is not None:
            self.bias.uniform_(-bound, bound)

    # ----------------------------------------------------------------------------- geometry
    def _explicit_padding(self) -> tuple[int, int, int, int]:
        if self.padding == "valid":
            return (0, 0, 0, 0)
        if self.padding == "same":
            pads = []
            for d, k in zip(self.dilation, self.kernel_size):
                total = d * (k - 1)
                pads += [total // 2, total - total // 2]  # like nn.Conv2d: the extra row/col at the end
            return tuple(pads)
        ph, pw = self.padding
        return (ph, ph, pw, pw)

    # ------------------------------------------------------------------------------ stripes
    @property
    def weight(self) -> Tensor:
        """The dense ``[out, in/groups, kh, kw]`` weight, zero at pruned stripes (differentiable)."""
        return unpack_weight(self.packed_weight, self.stripe_mask)

    @property
    def num_stripes(self) -> int:
        """Number of kept stripes."""
        return int(self.packed_weight.shape[0])

    @property
    def density(self) -> float:
        """Kept stripes / all stripes."""
        total = self.stripe_mask.numel()
        return self.num_stripes / total if total else 0.0

    @torch.no_grad()
    def set_stripe_mask(self, stripe_mask: Tensor, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        """Change the kept stripes; stripes kept before keep their weights, new ones start at zero.

        ``packed_weight`` is resized in place (the same Parameter object, so an optimizer keeps
        updating it). Its ``.grad`` is repacked the same way, and so, given ``optimizer``, is its
        state there: every state tensor with one row per stripe (momentum, Adam's moments,
        Adafactor's row statistics); column statistics (one row) and scalars stay. Without it,
        state of the old shape makes the optimizer's next step fail. Graphs recorded before the
        change cannot be backpropagated after it (they hold the weight's old shape); new ones can,
        while old ones are still alive. A DistributedDataParallel wrapper made before the change
        does not average the layer's gradients after it (it hooks the parameters when it wraps
        them; the layer warns in a distributed run): wrap the model again.
        """
        check_stripe_mask(stripe_mask, self.out_channels, self.kernel_size)
        stripe_mask = stripe_mask.to(self.stripe_mask.device)
        weight = self.packed_weight
        rows, width = weight.shape
        per_stripe = []  # keys of the optimizer's state tensors to repack
        state = {} if optimizer is None else optimizer.state.get(weight, {})
        for key, value in state.items():
            if not isinstance(value, Tensor) or value.dim() == 0:
                continue
            if value.dim() == 2 and value.shape[0] == rows and value.shape[1] in (width, 1):
                per_stripe.append(key)
            elif value.dim() != 2 or value.shape[0] != 1 or value.shape[1] not in (width, 1):
                raise ValueError(f"optimizer state {key!r} of packed_weight has shape {list(value.shape)}, neither a "
                                 f"scalar, [{rows}, {width}] or [{rows}, 1] (per stripe) nor [1, {width}] or [1, 1]: "
                                 f"it cannot be repacked")

        def repack(t: Tensor) -> Tensor:
            return pack_weight(unpack_weight(t, self.stripe_mask), stripe_mask).contiguous()

        grad = None if weight.grad is None else repack(weight.grad)
        self._resize_packed_weight(repack(weight))
        weight.grad = grad
        for key in per_stripe:
            state[key] = repack(state[key])
        self.stripe_mask = stripe_mask.clone()
        if self.constant_channel_weight is not None:  # pruned stripes read no input, constant or not
            self.constant_channel_weight.mul_(stripe_mask.to(self.constant_channel_weight.dtype))

    def _resize_packed_weight(self, data: Tensor) -> None:
        """``packed_weight.data = data`` for data of any row count: the same Parameter object with its
        hooks; a gradient of another shape is dropped."""
        weight = self.packed_weight
        if data.shape != weight.shape:
            if torch.distributed.is_available() and torch.distributed.is_initialized() \
                    and torch.distributed.get_world_size() > 1:
                # DDP hooks the accumulators of the parameters it wraps, once, when it wraps them
                warnings.warn(f"StripeConv2d.packed_weight changes shape ({list(weight.shape)} -> {list(data.shape)}) "
                              "in a distributed run: a DistributedDataParallel wrapper made before the change no "
                              "longer averages this layer's gradients; wrap the model again", stacklevel=3)
            # torch keeps a Parameter's gradient accumulator, with the shape it was made for, across
            # `.data` changes of shape (the next backward would fail while an old graph, e.g. last
            # iteration's loss, is alive); it drops it on a change of dtype (to one every device has).
            weight.data = data.new_empty(0, dtype=torch.float32 if data.dtype == torch.float16 else torch.float16)
            weight.grad = None
        weight.data = data

    @torch.no_grad()
    def add_constant_channel(self, weight: Tensor) -> None:
        """Fold removed input channels of constant value into the layer, exactly.

        ``weight`` ``[out_channels, kh, kw]`` is ``sum_c value_c * W[:, c]`` over the removed
        channels ``c``; it is added to ``constant_channel_weight`` (zero at pruned stripes).
        """
        shape = (self.out_channels, *self.kernel_size)
        if tuple(weight.shape) != shape:
            raise ValueError(f"add_constant_channel expects a weight of shape {list(shape)}, got {list(weight.shape)}")
        ref = self.packed_weight
        weight = weight.to(ref.device, ref.dtype) * self.stripe_mask.to(ref.dtype)
        if self.constant_channel_weight is None:
            self.constant_channel_weight = weight.clone()
        else:
            self.constant_channel_weight.add_(weight)
        self._constant_map_cache = None

    # ------------------------------------------------------------------------- conversions
    @classmethod
    def from_conv(cls, conv: nn.Conv2d, stripe_mask: Optional[Tensor] = None) -> "StripeConv2d":
        """A StripeConv2d computing ``conv`` with only the stripes of ``stripe_mask`` kept.

        ``stripe_mask=None`` keeps every stripe whose weights are not all zero.
        """
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"from_conv expects an nn.Conv2d, got {type(conv).__name__}")
        weight = conv.weight.detach()
        if stripe_mask is None:
            stripe_mask = weight.ne(0).any(dim=1)
        module = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            device=weight.device,
            dtype=weight.dtype,
            stripe_mask=stripe_mask,
        )
        with torch.no_grad():
            module.packed_weight.copy_(pack_weight(weight, module.stripe_mask))
            if conv.bias is not None:
                module.bias.copy_(conv.bias)
        module.train(conv.training)
        return module

    def to_conv(self, ignore_constant_channel: bool = False) -> nn.Conv2d:
        """An equivalent ``nn.Conv2d`` (dense weight, zeros at pruned stripes).

        A layer with a ``constant_channel_weight`` has no exact ``nn.Conv2d`` equivalent (its
        border response differs from a bias): that raises, unless ``ignore_constant_channel``
        (a same-cost conv for timing) drops the term.
        """
        if self.constant_channel_weight is not None and not ignore_constant_channel:
            raise ValueError(
                "to_conv: this StripeConv2d folds removed constant input channels (constant_channel_weight), "
                "which an nn.Conv2d cannot express exactly; pass ignore_constant_channel=True for a same-shape conv")
        conv = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            bias=self.bias is not None,
            padding_mode=self.padding_mode,
            device=self.packed_weight.device,
            dtype=self.packed_weight.dtype,
        )
        with torch.no_grad():
            conv.weight.copy_(self.weight)
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        conv.train(self.training)
        return conv

    # ------------------------------------------------------------------------------ forward
    def _tensors(self) -> tuple[Tensor, Optional[Tensor], Tensor, Optional[Tensor]]:
        """``packed_weight``, ``bias``, ``stripe_mask``, ``constant_channel_weight``.

        Read from the parameter and buffer dicts: ``nn.Module.__getattr__`` costs about 0.7 us per
        name, a sizeable part of a small layer's call. A parametrized tensor (``torch.nn.utils.
        parametrize``) leaves its dict for a property, which the attribute lookup then reaches.
        """
        params, buffers = self._parameters, self._buffers
        try:
            return params["packed_weight"], params["bias"], buffers["stripe_mask"], buffers["constant_channel_weight"]
        except KeyError:
            return self.packed_weight, self.bias, self.stripe_mask, self.constant_channel_weight

    def _check_input(self, input: Tensor, weight: Tensor, bias: Optional[Tensor], key: Optional[tuple]) -> None:
        """Raises what is wrong with a call's input and the layer's tensors. Where they pass, remembers ``key``
        (the input's and the weights' shapes, dtypes and devices; None: nothing) so that the next eager call
        with the same key skips the checks: the layer's geometry is fixed at construction, and an input dtype
        other than the weight's depends on autocast, so such a call is not remembered."""
        if not isinstance(input, Tensor):
            raise TypeError(f"StripeConv2d expects a Tensor input, got {type(input).__name__}")
        # The layer's own tensors, as far as a swapped .data can break them (the mask's row count is
        # the backends' check: it needs the mask's values)
        cg = self.in_channels // self.groups
        if weight.dim() != 2 or weight.shape[1] != cg:
            raise ValueError(f"packed_weight must be [num_stripes, in_channels/groups] = [*, {cg}], "
                             f"got {list(weight.shape)}")
        if bias is not None and (bias.shape != (self.out_channels,) or bias.dtype != weight.dtype
                                 or bias.device != weight.device):
            raise ValueError(f"bias must be [{self.out_channels}] in {weight.dtype} on {weight.device} like the "
                             f"weight, got {list(bias.shape)} in {bias.dtype} on {bias.device}")
        if input.dim() not in (3, 4):
            raise ValueError(
                f"StripeConv2d expects a 3-D (C, H, W) or 4-D (B, C, H, W) input, got {input.dim()}-D "
                f"of shape {list(input.shape)}"
            )
        channels = input.shape[-3]
        if channels != self.in_channels:
            raise ValueError(f"StripeConv2d expected input with {self.in_channels} channels, got {channels}")
        if input.dtype != weight.dtype and _autocast_dtype(input.device.type) is None:
            raise TypeError(f"input dtype {input.dtype} does not match the weight dtype {weight.dtype}")
        if input.device != weight.device:
            raise RuntimeError(f"input is on {input.device} but the weights are on {weight.device}")
        check_output_size(input.shape[-2:], self.kernel_size, self.stride, self._pads, self.dilation)
        if key is not None and input.dtype == weight.dtype:
            self._accepted_input = key

    def forward(self, input: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return self._scripted_forward(input)
        return self._eager_forward(input)

    @torch.jit.unused
    def _eager_forward(self, input: Tensor) -> Tensor:
        if isinstance(input, _FxProxy):
            return self._fx_forward(input)
        # The common path makes few Python calls: each may cost the interpreter a fresh chunk of its frame
        # stack (docs/backends.md, "Host work and the frame stack"), so _tensors() is spelled out here.
        # Compiled and traced graphs check at trace time and remember nothing (a memo would become a guard).
        params, buffers = self._parameters, self._buffers
        try:
            weight, bias, mask, constant = (params["packed_weight"], params["bias"], buffers["stripe_mask"],
                                            buffers["constant_channel_weight"])
        except KeyError:
            weight, bias, mask, constant = self._tensors()
        compiling = torch.compiler.is_compiling()
        key = None if compiling or backends._is_tracing() or not isinstance(input, Tensor) else (
            input.shape, input.dtype, input.device, weight.shape, weight.dtype, weight.device,
            None if bias is None else bias.shape, None if bias is None else bias.dtype)
        if key is None or key != self.__dict__.get("_accepted_input"):
            self._check_input(input, weight, bias, key)
        unbatched = input.dim() == 3
        if unbatched:
            input = input.unsqueeze(0)
        pads = self._pads
        if self.padding_mode != "zeros" and any(pads):
            # Non-zero padding modes need the padded values themselves, exactly as nn.Conv2d does.
            t, b, l, r = pads
            input = F.pad(input, (l, r, t, b), mode=self.padding_mode)
            pads = (0, 0, 0, 0)
        amp = _autocast_dtype(input.device.type) if _any_autocast_enabled() else None
        if amp is not None:  # like nn.Conv2d under torch.autocast: floating operands (not float64) in the amp dtype
            input, weight, bias = (t.to(amp) if t is not None and t.is_floating_point() and t.dtype != torch.float64
                                   else t for t in (input, weight, bias))
        # the same kernels without the op's Python layers
        conv = backends.eager_conv2d(input, compiling) or stripe_conv2d
        out = conv(input, weight, bias, mask, self.stride, pads, self.dilation, self.groups)
        if constant is not None:
            out = out + self._constant_map(input.shape[-2], input.shape[-1], pads)
        return out.squeeze(0) if unbatched else out

    @torch.jit.unused
    def _fx_forward(self, input: torch.fx.Proxy) -> torch.fx.Proxy:
        """The forward as ``torch.fx.symbolic_trace`` records it: the op on the layer's tensors (as
        ``get_attr`` nodes), with the padding mode's pad and a constant channel's response as nodes of
        their own. The graph takes 4-D input and computes in the weights' dtype (no autocast cast)."""
        pads = self._pads
        if self.padding_mode != "zeros" and any(pads):
            t, b, l, r = pads
            input = F.pad(input, (l, r, t, b), mode=self.padding_mode)
            pads = (0, 0, 0, 0)
        out = stripe_conv2d(input, self.packed_weight, self.bias, self.stripe_mask, list(self.stride), list(pads),
                            list(self.dilation), self.groups)
        if self.constant_channel_weight is not None:
            # the buffer itself as a node (FX passes buffers as values; a value derived from one, as the
            # response's weight is, would be baked into the graph with its device)
            path = input.tracer.path_of_module(self)
            weight = input.tracer.create_proxy("get_attr", f"{path}.constant_channel_weight".lstrip("."), (), {})
            # _constant_response's channel of ones, made from the input (older FX cannot size a factory by proxies)
            ones = F.pad(torch.ones_like(input[:1, :1]).to(weight), [pads[2], pads[3], pads[0], pads[1]])
            out = out + F.conv2d(ones, weight.unsqueeze(1), None, list(self.stride), 0, list(self.dilation))
        return out

    def __prepare_scriptable__(self) -> "StripeConv2d":
        """Called by ``torch.jit.script``: where the ``cpu`` backend serves CPU tensors now, the
        scripted layer calls its kernels directly on CPU input (``stripeconv_cpu::conv2d``, the
        kernels eager mode calls, with gradients in C++), which saves the op's Python layers, most
        of a small layer's time; otherwise, and on other devices, it calls the op."""
        try:
            self._script_cpu_kernels = backends.resolve(torch.device("cpu")).NAME == "cpu"
        except RuntimeError:  # a pinned backend that cannot run on CPU
            self._script_cpu_kernels = False
        return self

    def _scripted_forward(self, input: Tensor) -> Tensor:
        """The forward in TorchScript's subset of Python: the op (or, on CPU, the compiled kernels
        the op would run), without autocast or caches."""
        if input.dim() != 3 and input.dim() != 4:
            raise ValueError("StripeConv2d expects a 3-D (C, H, W) or 4-D (B, C, H, W) input")
        if input.size(-3) != self.in_channels:
            raise ValueError("StripeConv2d expected input with " + str(self.in_channels) + " channels, got "
                             + str(input.size(-3)))
        unbatched = input.dim() == 3
        if unbatched:
            input = input.unsqueeze(0)
        t, b, l, r = self._pads
        if self.padding_mode != "zeros" and (t > 0 or b > 0 or l > 0 or r > 0):
            input = F.pad(input, [l, r, t, b], mode=self.padding_mode)
            t, b, l, r = 0, 0, 0, 0
        if self._script_cpu_kernels and input.device.type == "cpu":
            out = torch.ops.stripeconv_cpu.conv2d(input, self.packed_weight, self.bias, self.stripe_mask,
                                                  self.stride, [t, b, l, r], self.dilation, self.groups)
        else:
            out = torch.ops.stripeconv.stripe_conv2d(input, self.packed_weight, self.bias, self.stripe_mask,
                                                     self.stride, [t, b, l, r], self.dilation, self.groups)
        constant = self.constant_channel_weight
        if constant is not None:
            out = out + _constant_response(constant, input.size(-2), input.size(-1), [t, b, l, r], self.stride,
                                           self.dilation)
        return out.squeeze(0) if unbatched else out

    def _constant_map(self, height: int, width: int, pads: tuple[int, int, int, int]) -> Tensor:
        """``[1, out, Ho, Wo]`` response to a channel of ones, zero in the explicit ``pads``."""
        k = self.constant_channel_weight
        # Only real tensors are cached: under torch.compile and torch.export the buffer is a fake or
        # functional tensor (no data pointer), and the map must be part of the traced graph; so must it
        # under torch.jit.trace (a cached map would be baked in as a constant). Inference tensors keep
        # no version counter, so a change to them could not be seen.
        # (is_inference last: torch < 2.5 cannot trace it.)
        cacheable = (type(k) is torch.Tensor and not torch.compiler.is_compiling() and not torch.jit.is_tracing()
                     and not k.is_inference())
        if not cacheable:
            return _constant_response(k, height, width, list(pads), list(self.stride), list(self.dilation))
        key = (height, width, pads, k.device, k.dtype, k.data_ptr(), k._version)
        if self._constant_map_cache is not None and self._constant_map_cache[0] == key:
            return self._constant_map_cache[1]
        value = _constant_response(k, height, width, list(pads), list(self.stride), list(self.dilation))
        self._constant_map_cache = (key, value)
        return value

    def extra_repr(self) -> str:
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
            f", padding={self.padding}"
        )
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        s += f", stripes={self.num_stripes}/{self.stripe_mask.numel()}"
        return s + (", constant_channel" if self.constant_channel_weight is not None else "")

    # ------------------------------------------------------------------------- state_dict
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        mask_key, weight_key = prefix + "stripe_mask", prefix + "packed_weight"
        const_key = prefix + "constant_channel_weight"
        if const_key in state_dict and self.constant_channel_weight is None:
            shape = (self.out_channels, *self.kernel_size)
            if tuple(state_dict[const_key].shape) != shape:
                raise RuntimeError(f"state_dict for {prefix or 'StripeConv2d'}: constant_channel_weight must be "
                                   f"{list(shape)}, got {list(state_dict[const_key].shape)}")
            self.constant_channel_weight = self.packed_weight.new_zeros(shape)
        self._constant_map_cache = None
        if mask_key in state_dict:
            mask = state_dict[mask_key]
            check_stripe_mask(mask, self.out_channels, self.kernel_size)
            kept = int(mask.sum())
            cg = self.in_channels // self.groups
            if weight_key in state_dict and tuple(state_dict[weight_key].shape) != (kept, cg):
                raise RuntimeError(
                    f"state_dict for {prefix or 'StripeConv2d'} is inconsistent: stripe_mask keeps {kept} "
                    f"stripes, so packed_weight must be [{kept}, {cg}], got {list(state_dict[weight_key].shape)}"
                )
            with torch.no_grad():
                mask = mask.to(self.stripe_mask.device)
                old, old_mask = self.packed_weight, self.stripe_mask
                if weight_key in state_dict or old.is_meta:
                    data = old.new_empty(kept, cg)  # overwritten by the load below
                elif old.shape[0] == int(old_mask.count_nonzero()):
                    # No packed_weight (strict=False): stripes kept by both masks keep their weights.
                    data = pack_weight(unpack_weight(old, old_mask), mask).contiguous()
                else:  # e.g. after to_empty(), which leaves the mask uninitialised
                    data = old.new_zeros(kept, cg)
                self._resize_packed_weight(data)
                self.stripe_mask = mask.clone()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)


def convert(model: nn.Module, masks: dict[str, Tensor]) -> nn.Module:
    """Replace the ``nn.Conv2d`` modules named in ``masks`` by :class:`StripeConv2d`, in place.

    ``masks`` maps names from ``model.named_modules()`` to stripe masks (bool
    ``[out, kh, kw]``; ``None`` keeps every non-zero stripe). Returns ``model``.
    """
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        if name not in modules:
            raise KeyError(f"convert: model has no module named {name!r}")
        conv = modules[name]
        if isinstance(conv, StripeConv2d):
            if mask is not None:
                conv.set_stripe_mask(mask)
            continue
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"convert: module {name!r} is a {type(conv).__name__}, expected nn.Conv2d")
        replacement = StripeConv2d.from_conv(conv, mask)
        if name == "":
            raise ValueError("convert: to convert a bare nn.Conv2d use StripeConv2d.from_conv")
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child, replacement)
    return model
