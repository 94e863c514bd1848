"""Module forwards as direct torch calls on the modules' own parameters.

A tiny model's decode step is a few dozen torch ops on `[rows, hidden]` tensors, and `nn.Module.__call__` (hook
lookups, `forward` dispatch) costs about as much as the op it wraps: `F.linear(x, m.weight, m.bias)` runs a 64-wide
projection in half the time `m(x)` takes. `lean(module)` returns such a call for the module types whose forward
is known here, composed from `lean` of their children, else the module itself: a peft LoRA layer, a module with
hooks or a replaced `forward`, any other class keep running their own forward (so LoRA is applied inline). No
weight is copied: the calls hold the module's parameters, so in-place updates (an optimizer step, peft's
`merge_adapter`) are seen. What to bypass is decided when `lean` is called: the engine rebinds before each
rollout, which picks up replaced modules and hooks added since.

Plain peft LoRA linears are the exception, given a `lora` provider (the engine's, refreshed at each rebind):
they run as one `linear` on a merged weight `W + sum of scaling * B A` (TRL's merge-before-generate, without
touching `W`), or inline as the base `linear` plus one shrink for all adapters and one expand that adds into the
base output (`addmm`): three ops where peft's forward runs seven for a 16-bit layer with fp32 adapters (casts, two
matmuls, a scale, an add, a cast back), which on a GPU are seven kernel launches.

`projection` runs several linears of one input (q/k/v, gate/up) as one matmul on their weights `stacked` in one
tensor, which the parameters are re-homed into (the only thing here that touches a model: where its weights lie,
never their values).
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import Tensor, nn
from torch.nn.modules import module as module_globals
from transformers.activations import GELUActivation, SiLUActivation
from transformers.models.janus.modeling_janus import JanusVQVAEAlignerMLP, JanusVQVAEHead
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

from kernels.rms_norm import add_rms_norm, cpu_rms_norm_available, rms_norm, rms_norm_cpu
from kernels.silu_mul import silu_mul

Forward = Callable[[Tensor], Tensor]
AddNorm = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


def gpu_kernels(weight: Tensor) -> bool:
    """Whether the layer math of a model with this weight runs our one-launch Triton kernels (norms with their
    residual add, RoPE, SwiGLU's gate) instead of torch's op sequences: 16 bits on a GPU, where launches cost
    more than those ops' bytes. fp32 and CPUs keep torch's ops, whose bits the oracle tests compare."""
    return weight.is_cuda and weight.dtype != torch.float32


def _runs_its_own_forward(module: nn.Module) -> bool:
    """Hooks (the module's or global ones) or an instance-level `forward` (accelerate, hub kernels) change what
    calling the module does: such a module is called, never bypassed."""
    return bool(module._forward_hooks or module._forward_pre_hooks or "forward" in module.__dict__
                or module_globals._global_forward_hooks or module_globals._global_forward_pre_hooks)


@dataclass(frozen=True)
class LoraWeights:
    """How plain LoRA projections run (one, or several that read the same input, their outputs side by side): on
    one merged weight `W + scaling * B A` for each, stacked by output rows; or inline, `x W^T + (x down^T) up^T`
    where `down` stacks every active adapter's `A` (rank rows) and `up` holds each `scaling * B` in its own output
    rows and rank columns (block-diagonal), so any number of adapters and projections cost one shrink and one
    expand. Both in the base weight's dtype."""

    merged: Tensor | None = None
    down: Tensor | None = None
    up: Tensor | None = None


def plain_lora(module: nn.Module) -> bool:
    """A peft LoRA `Linear` that computes `x W^T + b + sum of scaling * x A^T B^T`, which is `x W'^T + b` for one
    merged weight `W'`: over a plain `nn.Linear`, adapters on and not merged into `W` already, and every active
    adapter plain LoRA (no DoRA or other variant, no LoRA bias). Dropout is ignored: the engine samples in eval
    mode."""
    if type(module) is not LoraLinear or module.merged or module.disable_adapters:
        return False
    base = module.base_layer
    if type(base) is not nn.Linear or _runs_its_own_forward(base):
        return False
    return all(a not in module.lora_variant and module.lora_B[a].bias is None
               for a in module.active_adapters if a in module.lora_A)


def base_linear(module: nn.Module) -> nn.Linear:
    """The `nn.Linear` a plain LoRA layer adapts, or the module itself."""
    return module.base_layer if type(module) is LoraLinear else module


def stacked(weights: Sequence[Tensor]) -> Tensor | None:
    """One `[sum of rows, columns]` tensor whose row blocks are `weights`, sharing their memory: a view when they
    already lie back to back in one storage, else, for plain parameters, a new tensor that they are re-homed
    into (`param.data` becomes a view of it: the same `Parameter` objects and values, so optimizer state, peft
    and checkpoints are unaffected, and in-place updates reach the stack). None for anything else (a tensor
    subclass, say a sharded or quantised parameter). Weights moved or reloaded since are re-homed again."""
    first = weights[0]
    cols = first.shape[1:]
    if any(w.dim() != 2 or w.shape[1:] != cols or w.dtype != first.dtype or w.device != first.device
           for w in weights):
        return None
    rows = sum(w.shape[0] for w in weights)
    with torch.inference_mode(False), torch.no_grad():  # a parameter must not become an inference tensor
        offset = first.storage_offset()
        if all(w.is_contiguous() and w.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
               and w.storage_offset() == offset + sum(v.numel() for v in weights[:i])
               for i, w in enumerate(weights)):
            return first.detach().as_strided((rows, *cols), first.stride())
        if not all(type(w) is nn.Parameter for w in weights):
            return None
        stack = torch.cat([w.detach() for w in weights])
        start = 0
        for w in weights:
            w.data = stack[start:start + w.shape[0]]
            start += w.shape[0]
        return stack


def projection(modules: Sequence[nn.Module], linear: Callable[..., Tensor] = F.linear,
               lora: Callable[[tuple[nn.Module, ...]], LoraWeights] | None = None) -> Forward | None:
    """`torch.cat([m(x) for m in modules], -1)` as one matmul (vLLM's merged q/k/v and gate/up projections: one
    kernel, and a wide one, where a decode step's skinny matmuls leave most of a GPU idle), on the modules' own
    weights through `stacked`; for a single module, its forward. Plain LoRA layers run with `lora`'s weights:
    merged, or inline (the stacked base weights, one shrink, one expand). None when a module is not a plain
    linear or plain LoRA layer (given `lora`), or, for several, when one has a bias or the weights cannot be
    stacked: the caller runs them one by one."""
    modules = tuple(modules)
    adapted = lora is not None and any(plain_lora(m) for m in modules)
    if not all(not _runs_its_own_forward(m) and (type(m) is nn.Linear or lora is not None and plain_lora(m))
               for m in modules):
        return None
    bases = [base_linear(m) for m in modules]
    if len(bases) > 1 and any(b.bias is not None for b in bases):
        return None
    bias = bases[0].bias if len(bases) == 1 else None
    weights = lora(modules) if adapted else LoraWeights()
    if weights.merged is not None:
        return functools.partial(linear, weight=weights.merged, bias=bias)
    weight = bases[0].weight if len(bases) == 1 else stacked([b.weight for b in bases])
    if weight is None:
        return None
    base = functools.partial(linear, weight=weight, bias=bias)
    return base if weights.down is None else _inline_lora(base, weights.down, weights.up)


def _inline_lora(base: Forward, down: Tensor, up: Tensor) -> Forward:
    def forward(x: Tensor) -> Tensor:
        y = base(x)
        rows = y.view(-1, y.shape[-1])
        return torch.addmm(rows, F.linear(x, down).view(rows.shape[0], -1), up.t()).view(y.shape)

    return forward


def lean(module: nn.Module, linear: Callable[..., Tensor] = F.linear,
         lora: Callable[[tuple[nn.Module, ...]], LoraWeights] | None = None, fuse: bool = False) -> Forward:
    """`module`'s forward without module dispatch, equal to `module(x)`: bit for bit (the same ops in the same
    order) except for `LlamaRMSNorm`, which is one native call on a CPU in fp32 (`kernels.rms_norm.rms_norm_cpu`;
    `F.rms_norm`, with its bits, where that cannot be built or on a GPU) and the one-kernel Triton norm for 16 bits
    on a GPU, each within a few ulps, and plain LoRA layers run with `lora`'s weights (within their roundings);
    or `module` itself. `linear` (`F.linear`'s signature) runs every plain `nn.Linear` inside it. `fuse` runs an
    MLP's gate and up projections as one `projection` (their weights stacked, within the matmul's roundings), its
    SwiGLU gate then one `kernels.silu_mul` launch for 16 bits on a GPU (torch's roundings)."""
    if _runs_its_own_forward(module):
        return module
    kind = type(module)
    one = projection((module,), linear, lora)
    if one is not None:
        return one
    if kind is nn.Embedding and module.max_norm is None:  # max_norm renormalises the weight in place: call it
        return functools.partial(F.embedding, weight=module.weight)
    if kind is SiLUActivation or kind is nn.SiLU:
        return F.silu
    if kind is GELUActivation:
        return module.act
    if kind is LlamaRMSNorm and module.weight.dtype == torch.float32:
        if module.weight.device.type == "cpu" and cpu_rms_norm_available():
            # One native call for the composite's half-dozen ops, within a few ulps (the sum's order).
            return functools.partial(rms_norm_cpu, weight=module.weight, eps=module.variance_epsilon)
        # In 16 bits transformers rounds to the input dtype before the weight multiply; F.rms_norm does not.
        return functools.partial(F.rms_norm, normalized_shape=module.weight.shape, weight=module.weight,
                                 eps=module.variance_epsilon)
    if kind is LlamaRMSNorm and gpu_kernels(module.weight):
        # One Triton launch for transformers' seven, its roundings kept (within an ulp or two).
        return functools.partial(rms_norm, weight=module.weight, eps=module.variance_epsilon)
    if kind is LlamaMLP:
        down, act = lean(module.down_proj, linear, lora), lean(module.act_fn)
        gate_up = projection((module.gate_proj, module.up_proj), linear, lora) if fuse else None
        if gate_up is not None:
            weight = base_linear(module.gate_proj).weight
            if act is F.silu and gpu_kernels(weight):  # one kernel, torch's roundings
                return lambda x: down(silu_mul(gate_up(x)))
            width = weight.shape[0]

            def mlp(x: Tensor) -> Tensor:
                y = gate_up(x)
                return down(act(y[..., :width]) * y[..., width:])

            return mlp
        gate, up = lean(module.gate_proj, linear, lora), lean(module.up_proj, linear, lora)
        return lambda x: down(act(gate(x)) * up(x))
    if kind is JanusVQVAEHead:
        proj, act, head = (lean(m, linear, lora) for m in (module.proj_out, module.activation_fn,
                                                            module.vision_head))
        return lambda x: head(act(proj(x)))
    if kind is JanusVQVAEAlignerMLP:
        fc1, act = lean(module.fc1, linear, lora), lean(module.activation_fn)
        hidden = [lean(m, linear, lora) for m in module.hidden_layers]

        def aligner(x: Tensor) -> Tensor:
            x = fc1(x)
            for layer in hidden:
                x = layer(act(x))
            return x

        return aligner
    return module


def add_norm(module: nn.Module) -> AddNorm:
    """`(s, module(s))` for `s = h + d`: a decoder's residual add and the norm after it, in one kernel where `lean`
    runs the norm as the one-kernel Triton norm (16 bits on a GPU: `kernels.rms_norm.add_rms_norm`, the same
    roundings), else the add and `lean(module)`."""
    norm = lean(module)
    if isinstance(norm, functools.partial) and norm.func is rms_norm:
        return functools.partial(add_rms_norm, **norm.keywords)

    def forward(h: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
        s = h + d
        return s, norm(s)

    return forward
