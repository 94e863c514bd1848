"""Engine configuration (nano-vllm's `Config`, with the memory budget and attention backend made explicit)."""
from __future__ import annotations

from dataclasses import dataclass

ATTENTION_BACKENDS = ("auto", "torch", "triton", "flash_attn")


@dataclass(slots=True)
class EngineConfig:
    """How the engine sizes its KV pool and batches.

    The KV pool is one preallocated tensor of `num_kv_blocks` blocks of `block_size` tokens. Give the block count
    directly, or `kv_cache_memory_bytes`; with neither, a GPU gets `gpu_memory_utilization` of its free memory
    (after a warm-up forward measures activations) and a CPU gets `cpu_kv_cache_bytes`.
    `max_num_seqs` bounds the rows of one step (an image-phase sample is two rows, conditional + unconditional,
    unless its `cfg_weight` is 1);
    `max_num_batched_tokens` bounds the tokens of one prefill step (a single prefill larger than that runs alone).
    `num_scheduler_steps` (vLLM's multi-step scheduling) is the most decode steps one `step()` runs back to back:
    each sampled token is fed to the next step on the device and the host syncs once per window instead of once
    per token (a window ends by the time an image completes or a forced `<begin_of_image>`; a row that samples
    one earlier idles to the window's end). Requests added meanwhile wait for the window's end, unless the caller
    ends it early with `LLMEngine.step(interrupt=...)` (the server does when a request arrives); 1 turns it off.
    `num_image_scheduler_steps` bounds instead the windows whose rows are all in the image phase while no request
    waits: image rows take one token per step and end at known steps, so a longer window wastes nothing and saves
    host syncs (on a GPU the device idles at each). None (default): up to the first image's completion. Its slots
    are allocated at the window's start; with blocks short for it, the window falls back to `num_scheduler_steps`
    (whose 1 turns these windows off too).
    `skinny_matmul` runs the projections of decode steps (at most 64 rows) through `kernels.skinny_matmul` instead
    of `F.linear` (cuBLAS); off until a GPU benchmark (`python -m bench kernels --only skinny_matmul`) shows it
    faster.
    `fuse_projections` runs each layer's q/k/v projections as one matmul and its gate/up projections as one
    (vLLM's merged projections: fewer and wider kernels for a decode step's few rows), on their weights stacked in
    one tensor: the model's parameters are re-homed into it at the first rollout (they become views of it, the
    same `Parameter` objects with the same values), so nothing is copied and optimizer steps reach it. None
    (default) fuses on a GPU only: on a CPU the rollout benchmark measured it from 12% slower to 8% faster at the
    tiny preset, within that machine's noise.
    `merge_lora` runs each peft LoRA projection as one matmul on a merged weight `W + scaling * B A`, computed
    from the policy's own parameters at the start of every rollout into a buffer of the engine (`W` is never
    touched; TRL merges before generating, in place). None (default) merges fp32 weights only: a 16-bit merged
    weight would round away a LoRA delta smaller than its last bit, so 16-bit models apply LoRA inline.
    `disable_cascade_attn` (vLLM's name) turns off cascade attention, where a decode step's rows whose block
    tables start alike (a group's samples over their prompt, the unconditional CFG rows over their pad prefix)
    read those K/V once per up to 16 rows (`kernels.paged_attention.shared_prefixes`; the torch and Triton
    backends; flash-attn reads every row's own). None (default) disables it on a GPU only: on an H100 the rollout
    benchmark at the Janus-Pro-1B shape took 10% longer with it (GoT prompts are short; vLLM too skips prefixes
    under 256 tokens); on a CPU it measured even (1.00x).
    `enable_pdl` (FlashInfer's and SGLang's name) launches the Triton kernels of decode steps with programmatic
    dependent launch (`kernels.pdl`): each may be scheduled while the one before it finishes, which hides part of
    the idle gap between a step's few hundred small kernels. It needs a GPU of compute capability 9.0 or newer
    (Hopper); off until a GPU benchmark (`python -m bench rollout --compare-pdl`) shows it faster.
    `attention_backend="auto"` picks flash-attn (CUDA, installed, `block_size % 256 == 0`), else Triton on CUDA,
    else plain torch. CUDA graphs capture decode steps per batch-size bucket unless `enforce_eager`.
    """

    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory_bytes: int | None = None
    gpu_memory_utilization: float = 0.9
    cpu_kv_cache_bytes: int = 512 * 2**20
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 16384
    max_model_len: int | None = None
    num_scheduler_steps: int = 16
    num_image_scheduler_steps: int | None = None
    skinny_matmul: bool = False
    fuse_projections: bool | None = None
    merge_lora: bool | None = None
    disable_cascade_attn: bool | None = None
    enable_pdl: bool = False
    attention_backend: str = "auto"
    enforce_eager: bool = False
    cuda_graph_batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)

    def __post_init__(self) -> None:
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {self.block_size!r}")
        if self.num_kv_blocks is not None and self.kv_cache_memory_bytes is not None:
            raise ValueError("give num_kv_blocks or kv_cache_memory_bytes, not both")
        if self.num_kv_blocks is not None and (not isinstance(self.num_kv_blocks, int) or self.num_kv_blocks < 1):
            raise ValueError(f"num_kv_blocks must be a positive int, got {self.num_kv_blocks!r}")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes <= 0:
            raise ValueError(f"kv_cache_memory_bytes must be positive, got {self.kv_cache_memory_bytes!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")
        if self.max_num_seqs < 2:
            raise ValueError(f"max_num_seqs must be >= 2 (an image-phase sample is a cond/uncond pair), got "
                             f"{self.max_num_seqs!r}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be positive, got {self.max_num_batched_tokens!r}")
        if not isinstance(self.num_scheduler_steps, int) or self.num_scheduler_steps < 1:
            raise ValueError(f"num_scheduler_steps must be a positive int, got {self.num_scheduler_steps!r}")
        if self.num_image_scheduler_steps is not None and (not isinstance(self.num_image_scheduler_steps, int)
                                                           or self.num_image_scheduler_steps < 1):
            raise ValueError(f"num_image_scheduler_steps must be None or a positive int, got "
                             f"{self.num_image_scheduler_steps!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got "
                             f"{self.attention_backend!r}")
        if not self.cuda_graph_batch_sizes or any(b < 1 for b in self.cuda_graph_batch_sizes):
            raise ValueError(f"cuda_graph_batch_sizes must be positive sizes, got {self.cuda_graph_batch_sizes!r}")
        self.cuda_graph_batch_sizes = tuple(sorted(set(self.cuda_graph_batch_sizes)))
