"""Fused classifier-free-guidance mixing + temperature + top-k/top-p + sampling + log-probs (issue 9).

One decode step per row r (or per cond/uncond row pair):

    mixed  = cond                                 unpaired
           = where(c == u, c, u + w * (c - u))     paired (fp32; `c == u` keeps logits masked to -inf in both
                                                  rows at -inf instead of turning them into NaN)
    T      = temperature, or 1 when temperature == 0 (greedy)
    s      = mixed / T                            (fp32, correctly rounded division)
    keep   = top_k_mask(s, top_k) & top_p_mask(softmax(s masked by top-k), top_p)   (HF order: top-k, then top-p)
    token  = argmax(s)                                   greedy rows (lowest index on ties)
           = argmax over kept i of  s_i + G_i,  G_i = -log(-log(U_i))    sampled rows: Gumbel-max

`G_i` is computed in float64 and rounded to fp32, `s_i + G_i` is an fp32 add, and argmax picks the lowest index on
ties; U is `philox_uniforms(seeds, counters, V)`.  The CUDA kernel in csrc/ evaluates the same formulas with the
same Philox stream, so its tokens equal this module's up to floating-point rounding of probabilities at a top-p
boundary.  Filter semantics (shared by the sort-based references and the sort-free selects):

* top-k (0 or >= V: off): keep every token whose value is >= the k-th largest value counted with multiplicity
  (HF's TopKLogitsWarper), so all tokens tied with the k-th are kept.
* top-p (>= 1: off): on the fp32 probabilities p, keep every token with p >= t, where t is the largest value such
  that the mass of {p >= t} (summed in float64) is >= top_p; so the smallest set of most likely tokens reaching
  top_p, plus any tokens tied with its least likely member.  If even the full mass is < top_p (rounding), keep all.

`logprobs` is log_softmax(cond / T)[token] and `mixed_logprobs` log_softmax(mixed / T)[token], both before filtering.

Entry points: `cfg_sample` (picks the CUDA kernel for CUDA tensors when csrc/ builds, else `cfg_sample_torch`, the
vectorised torch path), `cfg_sample_reference` (one row at a time, sorting-based, explicit uniforms: the oracle),
`philox_uniforms`, `top_k_mask` / `top_p_mask` and their `*_reference` twins, `cuda_extension_available`. On a CPU
the torch path runs its float work and Gumbel-max in csrc/cfg_sample_cpu.cpp (`kernels.native` builds it), with the
same bits; without a compiler it stays in torch ops.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from kernels.native import CSRC, I64, P, cache_dir, csrc_library

logger = logging.getLogger(__name__)

_LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Radix-select digit widths (most significant first) over 32-bit order keys; csrc/cfg_sample.cu uses the same.
_RADIX_LEVELS = ((21, 11), (10, 11), (0, 10))  # (shift, bits)
_MASK32 = 0xFFFFFFFF
_PHILOX_M = (0xD2511F53, 0xCD9E8D57)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)


@dataclass
class SampleOutput:
    tokens: Tensor  # [R] int64
    logprobs: Tensor  # [R] fp32, under log_softmax(cond / T)
    mixed_logprobs: Tensor  # [R] fp32, under log_softmax(mixed / T); == logprobs when unpaired


# ----------------------------------------------------------------------------------------------------------------
# Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3"), in int64 torch ops.


def _mulhilo32(a: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """(hi, lo) 32-bit halves of a * m for a in [0, 2^32): the 64-bit product would overflow int64's sign, so the
    constant is split into 16-bit halves and each partial product stays below 2^48."""
    p_lo = a * (m & 0xFFFF)
    p_hi = a * (m >> 16)
    s = p_lo + ((p_hi & 0xFFFF) << 16)
    return (s >> 32) + (p_hi >> 16), s & _MASK32


def philox4x32_10(ctr: tuple[Tensor, Tensor, Tensor, Tensor], key: tuple[Tensor, Tensor]) -> tuple[Tensor, ...]:
    """Philox4x32-10 on broadcastable int64 tensors holding uint32 values; returns the 4 output words."""
    c0, c1, c2, c3 = ctr
    k0, k1 = key
    for _ in range(10):
        hi0, lo0 = _mulhilo32(c0, _PHILOX_M[0])
        hi1, lo1 = _mulhilo32(c2, _PHILOX_M[1])
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _PHILOX_W[0]) & _MASK32, (k1 + _PHILOX_W[1]) & _MASK32
    return c0, c1, c2, c3


def _philox_group_uniforms(seeds: Tensor, counters: Tensor, groups: Tensor) -> Tensor:
    """[..., 4] uniforms of token group `groups` (tokens 4g .. 4g+3) for broadcastable int64 seeds / counters."""
    words = philox4x32_10((groups, counters & _MASK32, (counters >> 32) & _MASK32, torch.zeros_like(counters)),
                          (seeds & _MASK32, (seeds >> 32) & _MASK32))
    bits = torch.stack(torch.broadcast_tensors(*words), dim=-1)
    return (((bits >> 9) << 1) | 1).to(torch.float32) * 2.0**-24


def philox_uniforms(seeds: Tensor, counters: Tensor, vocab_size: int) -> Tensor:
    """[R, vocab_size] fp32 uniforms in (0, 1), a pure function of (seed, counter, vocab index).

    Vocab index i takes word i % 4 of Philox4x32-10 with key (seed lo, seed hi) and counter
    (i // 4, counter lo, counter hi, 0), so a row's numbers never depend on the batch it is in.  A word x maps to
    ((x >> 9) * 2 + 1) * 2^-24: 2^23 equally spaced values, exact in fp32, strictly inside (0, 1).
    """
    if seeds.dim() != 1 or counters.shape != seeds.shape:
        raise ValueError(f"seeds and counters must be 1-D of equal length, got {tuple(seeds.shape)} and "
                         f"{tuple(counters.shape)}")
    if seeds.is_floating_point() or counters.is_floating_point() or seeds.dtype == torch.bool:
        raise ValueError(f"seeds and counters must be integer tensors, got {seeds.dtype} and {counters.dtype}")
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    seeds = seeds.to(torch.int64)[:, None]
    counters = counters.to(device=seeds.device, dtype=torch.int64)[:, None]
    groups = torch.arange((vocab_size + 3) // 4, device=seeds.device, dtype=torch.int64)[None, :]
    return _philox_group_uniforms(seeds, counters, groups).flatten(1)[:, :vocab_size]


def _gumbel(uniforms: Tensor) -> Tensor:
    """-log(-log U) in float64, rounded to fp32 (so log implementations differing by an ulp still agree)."""
    return (-torch.log(-torch.log(uniforms.double()))).float()


@functools.cache
def _philox_constants(device: torch.device) -> tuple[Tensor, Tensor]:
    """(the two multipliers as a [2] tensor, round r's key increments r * (W0, W1) as [10, 2]) on `device`."""
    mul = torch.tensor(_PHILOX_M, dtype=torch.int64, device=device)
    steps = torch.arange(10, dtype=torch.int64, device=device)[:, None] * torch.tensor(_PHILOX_W, device=device)
    return mul, steps


def _philox_gumbel(seeds: Tensor, counters: Tensor, groups: Tensor) -> Tensor:
    """`_gumbel` of `_philox_group_uniforms(seeds, counters, groups)`, [..., 4], bit for bit, in far fewer torch
    ops: the sampling hot path of every decode step runs it over each row's whole vocabulary.

    The two multiply lanes (c0 * M0, c2 * M1) run as one [2, ...] tensor. A 32 x 32-bit product is one int64
    multiply: it may wrap past 2^63, but two's complement keeps the low 64 bits, so `p >> 32` has the high word in
    its low 32 bits and `p` itself the low word, each with junk above bit 31. Words are masked only where junk
    would matter: the next multiplier operands (c0, c2) every round, and the 23 drawn bits at the end.
    The three inputs broadcast and have the same number of dimensions; broadcast dimensions should be outer ones
    (e.g. groups `[G, 1]`, seeds `[1, R]`): torch's elementwise loops are slow when the innermost one broadcasts.
    """
    mul, steps = _philox_constants(seeds.device)
    shape = tuple(max(sizes) for sizes in zip(seeds.shape, counters.shape, groups.shape))  # same ndim given
    lead = (1,) * len(shape)
    keys = torch.stack([seeds & _MASK32, (seeds >> 32) & _MASK32]).view(1, 2, *seeds.shape)
    keys = (keys + steps.view(10, 2, *lead)) & _MASK32
    lanes = torch.empty((2, *shape), dtype=torch.int64, device=seeds.device)  # (c0, c2)
    lanes[0] = groups
    lanes[1] = (counters >> 32) & _MASK32
    words = torch.stack([counters & _MASK32, torch.zeros_like(counters)])  # (c1, c3)
    mul = mul.view(2, *lead)
    for r in range(10):
        product = lanes.mul_(mul).flip(0)  # (c2 * M1, c0 * M0): low words are the next (c1, c3)
        lanes = ((product >> 32) ^ words).bitwise_xor_(keys[r]).bitwise_and_(_MASK32)
        words = product
    bits = torch.stack([lanes[0], words[0], lanes[1], words[1]], dim=-1)
    odd = (bits >> 8).bitwise_or_(1).bitwise_and_(0xFFFFFF)  # (x >> 9) * 2 + 1, as in `philox_uniforms`
    return odd.double().mul_(2.0**-24).log_().neg_().log_().neg_().float()


@functools.cache  # a hot path: no re-hashing of the signatures per call
def _sample_cpu_library() -> ctypes.CDLL | None:
    return csrc_library("cfg_sample_cpu.cpp", (("gotr1_scale", None, (P, I64, P, I64, P, P, I64, I64, P, P)),
                                               ("gotr1_sample", None, (P, I64, P, P, P, P, I64, I64, P, P)),
                                               ("gotr1_gumbel", None, (P, I64, P))), ("-ffp-contract=off",))


def _scale(cond: Tensor, uncond: Tensor | None, cfg_weight: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """(mixed / T, cond / T) in fp32, `t` [R] (the second is the first when unpaired)."""
    s = _mix(cond, uncond, cfg_weight.float()[:, None]) / t[:, None]
    return s, (s if uncond is None else cond.float() / t[:, None])


def _scale_cpu(lib: ctypes.CDLL, cond: Tensor, uncond: Tensor | None, cfg_weight: Tensor,
               t: Tensor) -> tuple[Tensor, Tensor]:
    """`_scale` in csrc/cfg_sample_cpu.cpp."""
    rows, vocab = cond.shape
    cond = cond.float() if cond.stride(1) == 1 else cond.float().contiguous()  # rows of unit stride
    if uncond is not None:
        uncond = uncond.float() if uncond.stride(1) == 1 else uncond.float().contiguous()
    w, t = cfg_weight.float().contiguous(), t.contiguous()
    s = torch.empty((rows, vocab), dtype=torch.float32)
    if uncond is None:
        lib.gotr1_scale(cond.data_ptr(), cond.stride(0), None, 0, w.data_ptr(), t.data_ptr(), rows, vocab,
                        s.data_ptr(), None)
        return s, s
    scaled = torch.empty((rows, vocab), dtype=torch.float32)
    lib.gotr1_scale(cond.data_ptr(), cond.stride(0), uncond.data_ptr(), uncond.stride(0), w.data_ptr(), t.data_ptr(),
                    rows, vocab, s.data_ptr(), scaled.data_ptr())
    return s, scaled


def _sample_cpu(lib: ctypes.CDLL, s: Tensor, keep: Tensor | None, greedy: list[bool], seeds: Tensor,
                counters: Tensor) -> Tensor:
    """`_sampling_keys(...).argmax(-1)` on the sampled rows, `s.argmax(-1)` on the greedy ones, in
    csrc/cfg_sample_cpu.cpp."""
    rows, vocab = s.shape
    s = s if s.stride(1) == 1 else s.contiguous()
    keep = None if keep is None else keep.contiguous().view(torch.uint8)
    flags = torch.tensor([not g for g in greedy], dtype=torch.uint8)
    seeds, counters = seeds.to(torch.int64).contiguous(), counters.to(torch.int64).contiguous()
    tokens = torch.empty(rows, dtype=torch.int64)
    scratch = torch.empty(2 * vocab, dtype=torch.int32)
    lib.gotr1_sample(s.data_ptr(), s.stride(0), None if keep is None else keep.data_ptr(), flags.data_ptr(),
                     seeds.data_ptr(), counters.data_ptr(), rows, vocab, tokens.data_ptr(), scratch.data_ptr())
    return tokens


def _sampling_keys(s: Tensor, keep: Tensor | None, seeds: Tensor, counters: Tensor) -> Tensor:
    """s + Gumbel noise on kept tokens, -inf elsewhere; Philox runs only for 4-token groups with a kept token,
    which the filters usually make a small fraction."""
    rows, vocab = s.shape
    seeds, counters = seeds.to(torch.int64), counters.to(torch.int64)
    if keep is None:
        groups = torch.arange((vocab + 3) // 4, device=s.device, dtype=torch.int64)
        noise = _philox_gumbel(seeds[None, :], counters[None, :], groups[:, None])  # [G, R, 4]
        return s + noise.transpose(0, 1).reshape(rows, -1)[:, :vocab]
    padded = torch.nn.functional.pad(keep, (0, (-vocab) % 4))
    row, group = padded.view(rows, -1, 4).any(-1).nonzero(as_tuple=True)
    noise = torch.zeros(rows, padded.shape[1], dtype=torch.float32, device=s.device)
    noise.view(rows, -1, 4)[row, group] = _philox_gumbel(seeds[row], counters[row], group)
    return (s + noise[:, :vocab]).masked_fill(~keep, -math.inf)


# ----------------------------------------------------------------------------------------------------------------
# Sort-free filters.  top-p: a most-significant-digit radix select over order-preserving 32-bit keys with
# float64 mass histograms, the descent the CUDA kernel uses for both filters, vectorised over rows.


def _order_keys(x: Tensor) -> Tensor:
    """int64 keys in [0, 2^32) whose order is the fp32 order of `x` (-0.0 folded into +0.0, so ties stay ties)."""
    bits = torch.where(x == 0, torch.zeros_like(x), x).view(torch.int32).to(torch.int64)
    return torch.where(bits < 0, -1 - bits, bits + 2**31)


def _radix_threshold(keys: Tensor, weights: Tensor, target: Tensor) -> Tensor:
    """Per row, the largest key t with sum(weights[keys >= t]) >= target (float64 sums), or the smallest key when
    no t qualifies.  Three passes of 11/11/10-bit digit histograms, each choosing the highest digit whose suffix
    mass reaches the target (or, if none does, the lowest occupied digit)."""
    rows = keys.shape[0]
    prefix = torch.zeros(rows, dtype=torch.int64, device=keys.device)
    above = torch.zeros(rows, dtype=torch.float64, device=keys.device)
    for shift, bits in _RADIX_LEVELS:
        nbins = 1 << bits
        in_range = (keys >> (shift + bits)) == (prefix >> (shift + bits))[:, None]
        digit = (keys >> shift) & (nbins - 1)
        mass = torch.zeros(rows, nbins, dtype=torch.float64, device=keys.device)
        mass.scatter_add_(1, digit, torch.where(in_range, weights, 0.0))
        count = torch.zeros(rows, nbins, dtype=torch.int64, device=keys.device)
        count.scatter_add_(1, digit, in_range.to(torch.int64))
        suffix = mass.flip(1).cumsum(1).flip(1)  # suffix[:, d] = mass of digits >= d in this range
        inclusive = above[:, None] + suffix
        exclusive = above[:, None] + torch.cat([suffix[:, 1:], torch.zeros_like(suffix[:, :1])], dim=1)
        bins = torch.arange(nbins, device=keys.device)
        # Occupied digits only: with a target <= 0 (a top_p that underflowed fp32) every digit reaches it, and an
        # empty one would leave no key in range (every token filtered out).
        highest_ok = torch.where((inclusive >= target[:, None]) & (count > 0), bins, -1).amax(1)
        lowest_occupied = torch.where(count > 0, bins, nbins).amin(1).clamp_max(nbins - 1)
        chosen = torch.where(highest_ok >= 0, highest_ok, lowest_occupied)
        above = exclusive.gather(1, chosen[:, None])[:, 0]
        prefix = prefix | (chosen << shift)
    return prefix


def top_k_mask(scaled: Tensor, top_k: Tensor) -> Tensor:
    """[R, V] bool: tokens kept by top-k (values >= the k-th largest; rows with k == 0 or k >= V keep all).

    torch.topk up to the batch's largest k (a partial selection, exact, far cheaper than the radix select in
    torch); the CUDA kernel radix-selects instead, `top_p_mask` shows that descent."""
    scaled = scaled.float()
    top_k = top_k.to(device=scaled.device, dtype=torch.int64)
    active = (top_k > 0) & (top_k < scaled.shape[1])
    if not bool(active.any()):
        return torch.ones(scaled.shape, dtype=torch.bool, device=scaled.device)
    k = torch.where(active, top_k, 1)
    values = torch.topk(scaled, int(k.max()), dim=-1).values
    kth = values.gather(1, (k - 1)[:, None])
    return ~active[:, None] | (scaled >= kth)


def top_p_mask(probs: Tensor, top_p: Tensor) -> Tensor:
    """[R, V] bool: tokens kept by top-p on fp32 probabilities (rows with top_p >= 1 keep all); see module doc."""
    probs = probs.float()
    keys = _order_keys(probs)
    top_p = top_p.to(device=keys.device, dtype=torch.float32).to(torch.float64)
    threshold = _radix_threshold(keys, probs.to(torch.float64), top_p)
    return (top_p >= 1.0)[:, None] | (keys >= threshold[:, None])


# ----------------------------------------------------------------------------------------------------------------
# Validation shared by every entry point.


def _check_inputs(cond_logits: Tensor, uncond_logits: Tensor | None, params: dict[str, Tensor],
                  validate_values: bool) -> None:
    if cond_logits.dim() != 2:
        raise ValueError(f"cond_logits must be [R, V], got shape {tuple(cond_logits.shape)}")
    if cond_logits.dtype not in _LOGIT_DTYPES:
        raise ValueError(f"cond_logits must be fp32/bf16/fp16, got {cond_logits.dtype}")
    rows, vocab = cond_logits.shape
    if vocab < 1:
        raise ValueError("cond_logits has an empty vocabulary dimension")
    if uncond_logits is not None:
        if uncond_logits.shape != cond_logits.shape:
            raise ValueError(f"uncond_logits shape {tuple(uncond_logits.shape)} != cond_logits shape "
                             f"{tuple(cond_logits.shape)} (row r of each is one CFG pair)")
        if uncond_logits.dtype != cond_logits.dtype or uncond_logits.device != cond_logits.device:
            raise ValueError(f"uncond_logits is {uncond_logits.dtype} on {uncond_logits.device}, cond_logits is "
                             f"{cond_logits.dtype} on {cond_logits.device}: they must match")
    for name, t in params.items():
        if not isinstance(t, Tensor) or t.shape != (rows,):
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a tensor of shape [{rows}] (one value per row), got {shape}")
        if t.device != cond_logits.device:
            raise ValueError(f"{name} is on {t.device} but the logits are on {cond_logits.device}")
        integral = name in ("top_k", "seeds", "counters")
        if integral == t.is_floating_point() or t.dtype == torch.bool:
            kind = "an integer" if integral else "a floating-point"
            raise ValueError(f"{name} must be {kind} tensor, got {t.dtype}")
    if not validate_values or rows == 0:
        return
    temperature = params["temperature"].float()
    top_p = params["top_p"].float()
    bad = torch.stack([
        ~(temperature >= 0) | ~torch.isfinite(temperature),
        ~((top_p > 0) & (top_p <= 1)),
        params["top_k"] < 0,
        ~torch.isfinite(params["cfg_weight"].float()),
    ]).any(1).tolist()  # one device sync for all checks
    for failed, message in zip(bad, ("temperature must be finite and >= 0 (0 means greedy)",
                                     "top_p must be in (0, 1] (1 means off)",
                                     "top_k must be >= 0 (0 means off)",
                                     "cfg_weight must be finite")):
        if failed:
            raise ValueError(message)


# ----------------------------------------------------------------------------------------------------------------
# Plain-torch reference (sorting-based, one row at a time) and the vectorised torch path.


def _mix(cond: Tensor, uncond: Tensor | None, cfg_weight: Tensor) -> Tensor:
    """fp32 CFG mix u + w (c - u); tokens where c == u (also -inf in both) take c unchanged."""
    c = cond.float()
    if uncond is None:
        return c
    u = uncond.float()
    return torch.where(c == u, c, u + cfg_weight * (c - u))


def top_k_mask_reference(scaled: Tensor, top_k: Tensor) -> Tensor:
    """Sorting-based top-k mask, one row at a time (the oracle for `top_k_mask`)."""
    keep = torch.ones(scaled.shape, dtype=torch.bool, device=scaled.device)
    for r, k in enumerate(top_k.tolist()):
        if 0 < k < scaled.shape[1]:
            kth = scaled[r].sort(descending=True).values[k - 1]
            keep[r] = scaled[r] >= kth
    return keep


def top_p_mask_reference(probs: Tensor, top_p: Tensor) -> Tensor:
    """Sorting-based top-p mask, one row at a time (the oracle for `top_p_mask`)."""
    keep = torch.ones(probs.shape, dtype=torch.bool, device=probs.device)
    for r, p in enumerate(top_p.float().tolist()):
        if p < 1.0:
            ordered = probs[r].float().sort(descending=True).values
            cumulative = ordered.double().cumsum(0)
            first = int((cumulative < p).sum())  # first position whose cumulative mass reaches p
            if first < ordered.numel():
                keep[r] = probs[r].float() >= ordered[first]
    return keep


def cfg_sample_reference(cond_logits: Tensor, uncond_logits: Tensor | None, *, cfg_weight: Tensor,
                         temperature: Tensor, top_k: Tensor, top_p: Tensor, uniforms: Tensor) -> SampleOutput:
    """Plain torch, one row at a time, sorting-based filters, explicit uniforms [R, V] in (0, 1)."""
    params = dict(cfg_weight=cfg_weight, temperature=temperature, top_k=top_k, top_p=top_p)
    _check_inputs(cond_logits, uncond_logits, params, validate_values=True)
    if uniforms.shape != cond_logits.shape:
        raise ValueError(f"uniforms shape {tuple(uniforms.shape)} != logits shape {tuple(cond_logits.shape)}")
    if uniforms.numel() and not bool(((uniforms > 0) & (uniforms < 1)).all()):
        raise ValueError("uniforms must lie strictly inside (0, 1)")
    tokens, logprobs, mixed_logprobs = [], [], []
    for r in range(cond_logits.shape[0]):
        c = cond_logits[r : r + 1].float()
        u = None if uncond_logits is None else uncond_logits[r : r + 1]
        mixed = _mix(c, u, cfg_weight[r : r + 1, None].float())
        t = temperature[r : r + 1, None].float()
        greedy = bool(t == 0)
        t = torch.ones_like(t) if greedy else t
        s = mixed / t
        if greedy:
            token = int(s.argmax())
        else:
            keep = top_k_mask_reference(s, top_k[r : r + 1])
            probs = torch.softmax(s.masked_fill(~keep, -math.inf), dim=-1)
            keep &= top_p_mask_reference(probs, top_p[r : r + 1])
            token = int((s + _gumbel(uniforms[r : r + 1])).masked_fill(~keep, -math.inf).argmax())
        tokens.append(token)
        logprobs.append(torch.log_softmax(c / t, dim=-1)[0, token])
        mixed_logprobs.append(torch.log_softmax(s, dim=-1)[0, token])
    device = cond_logits.device
    return SampleOutput(torch.tensor(tokens, dtype=torch.int64, device=device),
                        torch.stack(logprobs).to(device) if tokens else torch.zeros(0, device=device),
                        torch.stack(mixed_logprobs).to(device) if tokens else torch.zeros(0, device=device))


def cfg_sample_torch(cond_logits: Tensor, uncond_logits: Tensor | None, *, cfg_weight: Tensor,
                     temperature: Tensor, top_k: Tensor, top_p: Tensor, seeds: Tensor, counters: Tensor,
                     validate: bool = True) -> SampleOutput:
    """The vectorised torch path (any device): equals `cfg_sample_reference(..., uniforms=philox_uniforms(...))`."""
    params = dict(cfg_weight=cfg_weight, temperature=temperature, top_k=top_k, top_p=top_p, seeds=seeds,
                  counters=counters)
    _check_inputs(cond_logits, uncond_logits, params, validate)
    rows, vocab = cond_logits.shape
    # Which rows are greedy or filtered, decided on the host: three small copies instead of a dozen tiny ops and
    # as many device syncs (a CPU decode step pays per op).
    greedy = [x == 0 for x in temperature.tolist()]
    sampled = [r for r, g in enumerate(greedy) if not g]  # Philox runs for these rows only
    t = temperature.float() if len(sampled) == rows else torch.where(temperature == 0, 1.0, temperature.float())
    lib = _sample_cpu_library() if cond_logits.device.type == "cpu" and rows else None
    if lib is None:
        s, scaled_cond = _scale(cond_logits, uncond_logits, cfg_weight, t)
    else:
        s, scaled_cond = _scale_cpu(lib, cond_logits, uncond_logits, cfg_weight, t)
    top_k = [k if not g and 0 < k < vocab else 0 for g, k in zip(greedy, top_k.tolist())]
    top_p = [p if not g and p < 1 else 1.0 for g, p in zip(greedy, top_p.float().tolist())]
    keep = None
    if any(top_k):
        keep = top_k_mask(s, torch.tensor(top_k, device=s.device))
    if min(top_p, default=1.0) < 1:
        masked = s if keep is None else s.masked_fill(~keep, -math.inf)
        keep_p = top_p_mask(torch.softmax(masked, dim=-1), torch.tensor(top_p, device=s.device))
        keep = keep_p if keep is None else keep & keep_p
    if lib is not None:
        tokens = _sample_cpu(lib, s, keep, greedy, seeds, counters)
    else:
        keys = s
        if len(sampled) == rows > 0:
            keys = _sampling_keys(s, keep, seeds, counters)
        elif sampled:
            index = torch.tensor(sampled, device=s.device)
            part = _sampling_keys(s.index_select(0, index), None if keep is None else keep.index_select(0, index),
                                  seeds.index_select(0, index), counters.index_select(0, index))
            keys = s.index_copy(0, index, part)
        tokens = keys.argmax(dim=-1)
    mixed_logprobs = torch.log_softmax(s, dim=-1).gather(1, tokens[:, None])[:, 0]
    if uncond_logits is None:
        return SampleOutput(tokens, mixed_logprobs, mixed_logprobs.clone())
    logprobs = torch.log_softmax(scaled_cond, dim=-1).gather(1, tokens[:, None])[:, 0]
    return SampleOutput(tokens, logprobs, mixed_logprobs)


# ----------------------------------------------------------------------------------------------------------------
# CUDA extension (csrc/): built once per source version with torch's extension loader, cached under ~/.cache.


@functools.cache
def _extension():
    """The compiled extension module, or None (with the reason logged once) when it cannot be had."""
    if not torch.cuda.is_available():
        logger.info("cfg_sample: no CUDA device, using the torch path")
        return None
    try:
        from torch.utils.cpp_extension import load

        major, minor = torch.cuda.get_device_capability()
        archs = {80, 90} | ({major * 10 + minor} if major < 8 else set())
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in sorted(archs)]
        gencode.append("-gencode=arch=compute_90,code=compute_90")  # PTX for newer GPUs
        build_dir = cache_dir("torch_extensions") / "cfg_sample"
        build_dir.mkdir(parents=True, exist_ok=True)
        return load(name="gotr1_cfg_sample",
                    sources=[str(CSRC / "cfg_sample.cu"), str(CSRC / "cfg_sample_binding.cpp")],
                    extra_cflags=["-O3"], extra_cuda_cflags=["-O3", *gencode],
                    extra_include_paths=[str(CSRC)], build_directory=str(build_dir), verbose=False)
    except Exception as exc:  # a missing nvcc, a compiler error, an ABI mismatch: all mean "use the torch path"
        logger.warning("cfg_sample: CUDA extension unavailable (%s: %s); using the torch path",
                       type(exc).__name__, exc)
        return None


def cuda_extension_available() -> bool:
    """Whether the fused CUDA kernel can be used (builds it on first call)."""
    return _extension() is not None


def cfg_sample_cuda(cond_logits: Tensor, uncond_logits: Tensor | None, *, cfg_weight: Tensor,
                    temperature: Tensor, top_k: Tensor, top_p: Tensor, seeds: Tensor, counters: Tensor,
                    validate: bool = True, out: SampleOutput | None = None) -> SampleOutput:
    """The fused CUDA kernel (rows split over several blocks when few); `out` lets callers supply (e.g. poisoned)
    output buffers."""
    ext = _extension()
    if ext is None or not cond_logits.is_cuda:
        raise RuntimeError("cfg_sample CUDA extension unavailable or logits not on a CUDA device")
    params = dict(cfg_weight=cfg_weight, temperature=temperature, top_k=top_k, top_p=top_p, seeds=seeds,
                  counters=counters)
    _check_inputs(cond_logits, uncond_logits, params, validate)
    rows = cond_logits.shape[0]
    if out is None:
        device = cond_logits.device
        out = SampleOutput(torch.empty(rows, dtype=torch.int64, device=device),
                           torch.empty(rows, dtype=torch.float32, device=device),
                           torch.empty(rows, dtype=torch.float32, device=device))
    if rows == 0:
        return out

    def rowwise(x: Tensor) -> Tensor:
        return x if x.stride(-1) == 1 else x.contiguous()

    with torch.cuda.device(cond_logits.device):  # the launch needs the logits' device current
        ext.cfg_sample_out(rowwise(cond_logits), None if uncond_logits is None else rowwise(uncond_logits),
                           cfg_weight.float().contiguous(), temperature.float().contiguous(),
                           top_k.long().contiguous(), top_p.float().contiguous(), seeds.long().contiguous(),
                           counters.long().contiguous(), out.tokens, out.logprobs, out.mixed_logprobs,
                           torch.cuda.current_stream(cond_logits.device).cuda_stream)
    return out


def cfg_sample(cond_logits: Tensor, uncond_logits: Tensor | None, *, cfg_weight: Tensor, temperature: Tensor,
               top_k: Tensor, top_p: Tensor, seeds: Tensor, counters: Tensor,
               validate: bool = True) -> SampleOutput:
    """One decode step's CFG mix + temperature + top-k/top-p + Philox Gumbel-max sample + log-probs.

    Uses the CUDA kernel for CUDA tensors when the extension builds, else the vectorised torch path; both draw the
    same numbers.  `validate=False` skips the value checks (temperature >= 0, top_p in (0, 1], top_k >= 0, finite
    cfg_weight), which cost one device sync; shapes, dtypes and devices are always checked.
    """
    kwargs = dict(cfg_weight=cfg_weight, temperature=temperature, top_k=top_k, top_p=top_p, seeds=seeds,
                  counters=counters, validate=validate)
    if cond_logits.is_cuda and cuda_extension_available():
        return cfg_sample_cuda(cond_logits, uncond_logits, **kwargs)
    return cfg_sample_torch(cond_logits, uncond_logits, **kwargs)
