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
touching `W`), or inline as the base `linear` plus, per adapter, a shrink and an expand that adds into the base
output (`addmm`): three ops where peft's forward runs seven for a 16-bit layer with fp32 adapters (casts, two
matmuls, a scale, an add, a cast back), which on a GPU are seven kernel launches.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import Tensor, nn
from torch.nn.modules import module as module_globals
from transformers.activations import GELUActivation, SiLUActivation
from transformers.models.janus.modeling_janus import JanusVQVAEAlignerMLP, JanusVQVAEHead
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

from kernels.rms_norm import cpu_rms_norm_available, rms_norm, rms_norm_cpu

Forward = Callable[[Tensor], Tensor]


def _runs_its_own_forward(module: nn.Module) -> bool:
    """Hooks (the module's or global ones) or an instance-level `forward` (accelerate, hub kernels) change what
    calling the module does: such a module is called, never bypassed."""
    return bool(module._forward_hooks or module._forward_pre_hooks or "forward" in module.__dict__
                or module_globals._global_forward_hooks or module_globals._global_forward_pre_hooks)


@dataclass(frozen=True)
class LoraWeights:
    """How a plain LoRA linear runs: on one merged weight, or inline with each active adapter's `(A, B, scaling)`
    (A and B in the base weight's dtype)."""

    merged: Tensor | None = None
    factors: tuple[tuple[Tensor, Tensor, float], ...] = ()


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


def _inline_lora(base: Forward, factors: tuple[tuple[Tensor, Tensor, float], ...]) -> Forward:
    def forward(x: Tensor) -> Tensor:
        y = base(x)
        rows = y.view(-1, y.shape[-1])
        for a, b, scaling in factors:
            rows = torch.addmm(rows, F.linear(x, a).view(rows.shape[0], -1), b.t(), alpha=scaling)
        return rows.view(y.shape)

    return forward


def lean(module: nn.Module, linear: Callable[..., Tensor] = F.linear,
         lora: Callable[[nn.Module], LoraWeights] | None = None) -> Forward:
    """`module`'s forward without module dispatch, equal to `module(x)`: bit for bit (the same ops in the same
    order) except for `LlamaRMSNorm`, which is one native call on a CPU in fp32 (`kernels.rms_norm.rms_norm_cpu`;
    `F.rms_norm`, with its bits, where that cannot be built or on a GPU) and the one-kernel Triton norm for 16 bits
    on a GPU, each within a few ulps, and plain LoRA layers run with `lora`'s weights (within their roundings);
    or `module` itself. `linear` (`F.linear`'s signature) runs every plain `nn.Linear` inside it."""
    if _runs_its_own_forward(module):
        return module
    kind = type(module)
    if kind is nn.Linear:
        return functools.partial(linear, weight=module.weight, bias=module.bias)
    if lora is not None and plain_lora(module):
        weights, bias = lora(module), module.base_layer.bias
        if weights.merged is not None:
            return functools.partial(linear, weight=weights.merged, bias=bias)
        return _inline_lora(functools.partial(linear, weight=module.base_layer.weight, bias=bias), weights.factors)
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
    if kind is LlamaRMSNorm and module.weight.is_cuda:
        # 16 bits on a GPU: one Triton launch for transformers' seven, its roundings kept (within an ulp or two).
        return functools.partial(rms_norm, weight=module.weight, eps=module.variance_epsilon)
    if kind is LlamaMLP:
        gate, up, down, act = (lean(m, linear, lora) for m in (module.gate_proj, module.up_proj,
                                                                module.down_proj, module.act_fn))
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
