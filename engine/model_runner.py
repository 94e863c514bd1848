"""Runs Janus's language model over a scheduled batch, on the model's own modules, through the paged KV cache.

Nothing is copied out of the model: every step runs the model's modules (`q/k/v/o_proj`, `mlp`, heads, ...) on their
own parameters, through `engine.lean` (direct torch calls for the known module types, the module itself for anything
else; q/k/v and gate/up as one matmul each on their parameters re-homed side by side), so a peft-wrapped projection
applies its LoRA and an optimizer step is seen by the next forward. What Janus adds over a Llama: a row's input
embedding depends on the token's modality (text: `embed_tokens`; image: generation embeddings + aligner), and its
output head on the row's phase (text: `lm_head` over the text vocabulary; image: `generation_head` over the
codebook). Heads run on each row's last position only. RoPE cos/sin come from the model's own rotary module,
tabulated once for every position.

On CUDA with a graph-safe backend, decode steps replay CUDA graphs of the whole layer stack captured per batch-size
bucket (padding rows store to slot -1 and attend to nothing); embeddings, heads and sampling stay outside the graph.
Graphs are recaptured when the model's modules, hooks, adapter state or weight addresses change.
"""
from __future__ import annotations

import functools
from array import array
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.modules import module as module_globals
from transformers import JanusForConditionalGeneration

from engine.attention import AttentionMetadata, select_backend
from engine.config import EngineConfig
from engine.lean import (
    AddNorm,
    Forward,
    LoraWeights,
    add_norm,
    base_linear,
    gpu_kernels,
    lean,
    plain_lora,
    projection,
)
from engine.scheduler import ScheduledBatch
from kernels.paged_attention import RopeStore, shared_prefixes
from kernels.pdl import programmatic_dependent_launch
from kernels.rope import rope, rope_store
from kernels.skinny_matmul import linear as skinny_linear


def unwrap(model: torch.nn.Module) -> JanusForConditionalGeneration:
    """The Janus model under a peft wrapper (LoRA layers stay injected in it), or the model itself."""
    janus = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not isinstance(janus, JanusForConditionalGeneration):
        raise TypeError(f"the engine runs JanusForConditionalGeneration (optionally peft-wrapped), got "
                        f"{type(janus).__name__}")
    return janus


METADATA_CHUNK = 16  # a window's steps whose metadata is built and sent at once (see `ModelRunner._prepare`)


@dataclass(slots=True)
class StepInputs:
    """One forward's inputs on the device: token ids (None when the caller feeds them), positions, which tokens
    are image tokens (`modality`: None, none; True, all; else the indices of the text and of the image tokens),
    attention metadata, and the rows whose hidden state the heads read (None: all; a prefill's last token per
    row)."""

    ids: torch.Tensor | None
    positions: torch.Tensor
    modality: tuple[torch.Tensor, torch.Tensor] | bool | None
    meta: AttentionMetadata
    last: torch.Tensor | None


@dataclass(slots=True)
class LayerForwards:
    """One decoder layer's modules as `engine.lean` calls; `qkv` gives q, k and v `[tokens, heads x head dim]`
    (slices of one matmul's output when fused); the norms come with the residual add before them (`add_norm`),
    except the first layer's input norm."""

    input_norm: Forward
    input_add_norm: AddNorm
    qkv: Callable[[torch.Tensor], tuple[torch.Tensor, ...]]
    o: Forward
    post_add_norm: AddNorm
    mlp: Forward


_ARRAY_CODES = {torch.int64: "q", torch.int32: "i", torch.float32: "f"}


def host_tensor(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`torch.tensor(values, dtype=dtype, device=device)` for int64/int32/float32 in a third of the time (one buffer
    copy instead of a per-element conversion): step metadata is built on the host every step. To a GPU it goes
    through pinned memory without blocking: a plain copy from pageable memory waits for all queued work, so the
    host could never prepare a step while the device runs the one before."""
    if not values:  # frombuffer refuses an empty buffer
        return torch.empty(0, dtype=dtype, device=device)
    t = torch.frombuffer(array(_ARRAY_CODES[dtype], values), dtype=dtype)
    return t if device.type == "cpu" else t.pin_memory().to(device, non_blocking=True)


class ModelRunner:
    def __init__(self, model: torch.nn.Module, config: EngineConfig):
        self.config = config
        self.block_size = config.block_size
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.lora_buffers: dict[tuple[int, str], torch.Tensor] = {}  # LoRA weights by (layer id, what)
        self._steps: list[StepInputs] = []  # the current chunk of the batch's steps (`_prepare`)
        # the current window's block tables and runs, one tensor each for all its steps (None: not needed / off)
        self._window: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)
        self._module_key: tuple = ()
        self.dtype: torch.dtype | None = None  # the model's, set after the first bind sized everything from it
        self.bind(model)
        tc = self.janus.config.text_config
        self.num_layers = tc.num_hidden_layers
        self.num_kv_heads = tc.num_key_value_heads
        self.head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
        self.hidden_size = tc.hidden_size
        self.scale = self.layers[0].self_attn.scaling
        weight = self.embed_tokens.weight
        self.dtype, self.device = weight.dtype, weight.device
        self.max_model_len = min(config.max_model_len or tc.max_position_embeddings, tc.max_position_embeddings)
        self.max_blocks_per_seq = -(-self.max_model_len // self.block_size)
        self.backend = select_backend(config.attention_backend, self.device, self.block_size, self.dtype)
        self.block_bytes = 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * \
            weight.element_size()
        self.num_kv_blocks = self._num_kv_blocks()
        # [K/V, layer, block, slot, kv head, head dim]: each layer's K and V are flash-attn's paged NHD layout.
        self.kv_cache = torch.empty((2, self.num_layers, self.num_kv_blocks, self.block_size, self.num_kv_heads,
                                     self.head_dim), dtype=self.dtype, device=self.device)
        self.cos, self.sin_signed = self._rope_tables()
        half = self.head_dim // 2
        self.rope_perm = torch.cat([torch.arange(half, self.head_dim), torch.arange(half)]).to(self.device)
        # RoPE in one launch per layer where the norms and SwiGLU get theirs (16 bits on a GPU).
        self.fused_rope = gpu_kernels(weight)
        self.rope_stores = self.fused_rope and self.backend.triton_store
        self.graph_sizes = [b for b in config.cuda_graph_batch_sizes if b <= config.max_num_seqs]
        self.use_cuda_graphs = (self.device.type == "cuda" and not config.enforce_eager
                                and self.backend.graph_safe and bool(self.graph_sizes))  # no bucket fits: eager

    @property
    def cascade(self) -> bool:
        """Decode steps carry `AttentionMetadata.shared` (the config as of the last bind, like the graphs)."""
        return self.backend.shares_prefixes and not self.disable_cascade_attn

    # ------------------------------------------------------------------------------------------------ set-up
    def bind(self, model: torch.nn.Module) -> None:
        """Resolve the modules to call (again): cheap, done before each rollout so that a model wrapped, merged
        or re-adapted since the last one is run as it is now. CUDA graphs are dropped when anything changed."""
        janus = unwrap(model)
        lm = janus.model.language_model
        weight = lm.embed_tokens.weight
        if self.dtype is not None and (weight.dtype, weight.device) != (self.dtype, self.device):
            # The KV pool, RoPE tables and backend are the first bind's: a cast model would run on them silently.
            raise RuntimeError(f"the model is now {weight.dtype} on {weight.device}, the engine was built for "
                               f"{self.dtype} on {self.device}: build a new LLMEngine for a cast or moved model")
        if self.config.enable_pdl and not (weight.is_cuda and torch.cuda.get_device_capability(weight.device)[0] >= 9):
            where = (f"a GPU of compute capability {torch.cuda.get_device_capability(weight.device)}"
                     if weight.is_cuda else str(weight.device))
            raise ValueError(f"enable_pdl needs a CUDA GPU of compute capability 9.0 or newer (Hopper), the model "
                             f"is on {where}")
        self.janus = janus
        self.layers = list(lm.layers)
        merge = self.config.merge_lora
        if merge is None:
            merge = weight.dtype == torch.float32
        previous, self.lora_buffers = self.lora_buffers, {}
        disable = self.config.disable_cascade_attn
        self.disable_cascade_attn = weight.is_cuda if disable is None else disable
        self.pdl = self.config.enable_pdl
        fuse = self.config.fuse_projections
        self.fuse_projections = weight.is_cuda if fuse is None else fuse
        linear = skinny_linear if self.config.skinny_matmul else F.linear
        lora = functools.partial(self._lora_weights, previous, merge)
        call = functools.partial(lean, linear=linear, lora=lora, fuse=self.fuse_projections)
        self.forwards = [LayerForwards(call(layer.input_layernorm), add_norm(layer.input_layernorm),
                                       self._qkv(layer.self_attn, linear, lora), call(layer.self_attn.o_proj),
                                       add_norm(layer.post_attention_layernorm), call(layer.mlp))
                         for layer in self.layers]
        self.final_norm = call(lm.norm)
        self.embed_tokens = lm.embed_tokens
        self.embed_text = call(lm.embed_tokens)
        generation_embeddings, aligner = call(janus.model.generation_embeddings), call(janus.model.generation_aligner)
        self.embed_image = lambda ids: aligner(generation_embeddings(ids))  # prepare_embeddings_for_image_generation
        self.text_head = call(janus.lm_head)
        self.image_head = call(janus.model.generation_head)
        self.rotary_emb = lm.rotary_emb
        if self.rotary_emb.rope_type in ("dynamic", "longrope"):
            raise NotImplementedError(f"rope_type {self.rotary_emb.rope_type!r} depends on the sequence length; "
                                      "the engine tabulates RoPE once per rollout")
        if self.dtype is not None:  # a rebind: the rotary buffers may have changed (a cast and back rounds them)
            with torch.inference_mode():  # in place: decode graphs hold the tables' addresses
                for table, now in zip((self.cos, self.sin_signed), self._rope_tables()):
                    table.copy_(now)
        adapters = tuple((id(m), bool(getattr(m, "disable_adapters", False)), tuple(m.merged_adapters),
                          tuple(m.active_adapters)) for m in lm.modules() if hasattr(m, "merged_adapters"))
        # Hooks and instance forwards decide what `lean` bypasses: a graph would replay the choice of its capture.
        hooks = (tuple((tuple(m._forward_pre_hooks), tuple(m._forward_hooks), id(m.__dict__.get("forward")))
                       for m in lm.modules()),
                 tuple(module_globals._global_forward_pre_hooks), tuple(module_globals._global_forward_hooks))
        key = (tuple(id(m) for m in lm.modules()), id(janus.lm_head), id(janus.model.generation_head), adapters,
               hooks, tuple(p.data_ptr() for p in lm.parameters()),  # re-homed or moved weights: graphs hold addresses
               merge, self.fuse_projections, self.config.skinny_matmul, self.disable_cascade_attn, self.pdl)
        if key != self._module_key:
            self.graphs.clear()
            self._module_key = key

    def _qkv(self, attn: torch.nn.Module, linear: Callable[..., torch.Tensor],
             lora: Callable[[tuple[torch.nn.Module, ...]], LoraWeights]) -> Callable[[torch.Tensor], tuple]:
        """A layer's q, k, v: one matmul on their stacked weights (`fuse_projections`), else three calls."""
        modules = (attn.q_proj, attn.k_proj, attn.v_proj)
        fused = projection(modules, linear, lora) if self.fuse_projections else None
        if fused is None:
            q, k, v = (lean(m, linear, lora) for m in modules)
            return lambda x: (q(x), k(x), v(x))
        widths = [base_linear(m).out_features for m in modules]
        return lambda x: fused(x).split(widths, -1)

    @torch.inference_mode()
    def _lora_weights(self, previous: dict[tuple[int, str], torch.Tensor], merge: bool,
                      modules: tuple[torch.nn.Module, ...]) -> LoraWeights:
        """What plain LoRA layers (and plain linears beside them, their outputs side by side) run with, from their
        current parameters: `W + sum of scaling * B A` stacked by rows (`merge`), or the adapters as one shrink
        and one block-diagonal expand (`LoraWeights`), in the base weight's dtype. They go to buffers of this
        runner, those of the last bind (`previous`) where there are some: decode graphs hold their addresses, so
        a refresh after an optimizer step needs no recapture."""
        bases = [base_linear(m).weight for m in modules]
        first = bases[0]
        starts = [0]
        for w in bases:
            starts.append(starts[-1] + w.shape[0])
        adapters = [(i, m, a) for i, m in enumerate(modules) if plain_lora(m)
                    for a in m.active_adapters if a in m.lora_A]

        def buffer(what: str, shape: tuple[int, ...]) -> torch.Tensor:
            key = (id(modules[0]), what)
            buf = previous.get(key)
            if buf is None or (buf.shape, buf.dtype, buf.device) != (shape, first.dtype, first.device):
                buf = torch.empty(shape, dtype=first.dtype, device=first.device)
            self.lora_buffers[key] = buf
            return buf

        if merge:
            merged = buffer("merged", (starts[-1], first.shape[1]))
            for i, w in enumerate(bases):
                merged[starts[i]:starts[i + 1]].copy_(w)
            for i, m, a in adapters:
                merged[starts[i]:starts[i + 1]].add_(m.get_delta_weight(a).to(first.dtype))
            return LoraWeights(merged=merged)
        ranks = [0]
        for _, m, a in adapters:
            ranks.append(ranks[-1] + m.lora_A[a].weight.shape[0])
        down = buffer("down", (ranks[-1], first.shape[1]))
        up = buffer("up", (starts[-1], ranks[-1])).zero_()
        for j, (i, m, a) in enumerate(adapters):
            down[ranks[j]:ranks[j + 1]].copy_(m.lora_A[a].weight)
            up[starts[i]:starts[i + 1], ranks[j]:ranks[j + 1]].copy_(m.lora_B[a].weight * m.scaling[a])
        return LoraWeights(down=down, up=up)

    def _num_kv_blocks(self) -> int:
        c = self.config
        if c.num_kv_blocks is not None:
            return c.num_kv_blocks
        if c.kv_cache_memory_bytes is not None:
            budget = c.kv_cache_memory_bytes
        elif self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            tc = self.janus.config.text_config
            # Activations of the largest prefill (fp32 upper bound) and the logits of a full decode step.
            activations = c.max_num_batched_tokens * (8 * tc.hidden_size + 3 * tc.intermediate_size) * 4
            logits = c.max_num_seqs * (tc.vocab_size + self.janus.config.vq_config.num_embeddings) * 4 * 3
            budget = int(free * c.gpu_memory_utilization) - activations - logits
        else:
            budget = c.cpu_kv_cache_bytes
        blocks = budget // self.block_bytes
        if blocks < 1:
            raise ValueError(f"the KV-cache budget of {budget} bytes holds no block of {self.block_bytes} bytes")
        return int(blocks)

    def _rope_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin' (sin with its first half negated: see `_layers`) of every position, from the model's own
        rotary module."""
        positions = torch.arange(self.max_model_len, device=self.device)[None]
        cos, sin = self.rotary_emb(torch.empty(1, dtype=self.dtype, device=self.device), positions)
        half = self.head_dim // 2
        return cos[0], torch.cat([-sin[0, :, :half], sin[0, :, half:]], 1)

    # ------------------------------------------------------------------------------------------------ forward
    @torch.inference_mode()
    def run(self, batch: ScheduledBatch, step: int = 0,
            ids: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Forward step `step` of the batch (only a multi-step batch has more than step 0); returns (text logits
        per `text_rows`, conditional image logits per `cond_rows`, unconditional ones per `uncond_rows` or None
        when there are none), in the model's dtype. Step 0 applies the block copies; every `METADATA_CHUNK`th step
        sends the metadata of the next steps at once; a later step's input tokens are `ids`, the ones the step
        before sampled (one per row, on the device: the host does not wait for them)."""
        if step == 0 and batch.copies:
            self._copy_blocks(batch.copies)
        if step > 0 and ids is None:
            raise ValueError(f"step {step} of a multi-step batch needs the input ids the step before sampled")
        if step % METADATA_CHUNK == 0:
            self._steps = self._prepare(batch, step)
        inputs = self._steps[step % METADATA_CHUNK]
        meta = inputs.meta
        self.backend.begin_step(self.kv_cache, meta)
        h = self._embed(inputs.ids if ids is None else ids, inputs.modality)
        with programmatic_dependent_launch(self.pdl and not meta.is_prefill):  # graphs keep it from their capture
            if self.use_cuda_graphs and not meta.is_prefill and len(batch.seqs) <= self.graph_sizes[-1]:
                h = self._replay(h, inputs.positions, meta)
            else:
                h = self._layers(h, inputs.positions, meta)
        if inputs.last is not None:
            h = h.index_select(0, inputs.last)
        text = cond = uncond = None
        if batch.text_rows:
            text = self.text_head(self.final_norm(self._rows(h, batch.text_rows)))
        if batch.image_samples:
            logits = self.image_head(self.final_norm(self._rows(h, batch.cond_rows + batch.uncond_rows)))
            n = len(batch.cond_rows)
            cond, uncond = logits[:n], (logits[n:] if batch.uncond_rows else None)
        return text, cond, uncond

    def _rows(self, h: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """`h[rows]`, as a view when the rows are consecutive (the scheduler puts a decode step's unconditional
        rows after all the others, so an image step's heads read one slice)."""
        first = rows[0]
        if rows[-1] - first == len(rows) - 1 and rows == list(range(first, first + len(rows))):
            return h[first:first + len(rows)]
        return h.index_select(0, host_tensor(rows, torch.int64, h.device))

    def _prepare(self, batch: ScheduledBatch, first: int) -> list[StepInputs]:
        """Steps `first` to `first + METADATA_CHUNK` of the batch, their inputs built in Python and sent as two
        tensors (int64 per token, int32 context lengths per row); per-step host overhead is what bounds small
        models. The window's block tables (when the backend needs them) and runs are built at its first chunk, one
        tensor each for all its steps. Decode steps (one token per row; step j feeds position `start + j` through
        the same block tables) take a loop-free path. A long window (an image phase is 576 steps) is built a chunk
        at a time, so only its first chunk's metadata keeps the device waiting."""
        bs = self.block_size
        seqs, starts = batch.seqs, batch.starts
        num_rows, num_steps = len(seqs), min(METADATA_CHUNK, batch.num_steps - first)
        if batch.is_prefill:
            ids: list[int] = []
            positions: list[int] = []
            slots: list[int] = []
            image: list[bool] = []
            for seq, start, q in zip(seqs, starts, batch.query_lens):
                table, end = seq.block_table, start + q
                ids += seq.token_ids[start:end]
                positions += range(start, end)
                slots += [table[p // bs] * bs + p % bs for p in range(start, end)]
                image += [p >= seq.image_start for p in range(start, end)]
            context_lens = [s + q for s, q in zip(starts, batch.query_lens)]
        else:
            ids = [seq.token_ids[p] for seq, p in zip(seqs, starts)] if first == 0 else []
            positions = [p + j for j in range(first, first + num_steps) for p in starts]
            slots = [seq.block_table[p // bs] * bs + p % bs for seq, p in zip(seqs * num_steps, positions)]
            image = [p >= seq.image_start for seq, p in zip(seqs * num_steps, positions)]
            context_lens = [p + 1 for p in positions]
        num_ids = len(ids)
        dev = self.device
        per_token = host_tensor(ids + positions + slots, torch.int64, dev)
        positions_t, slots_t = per_token[num_ids:].chunk(2)
        context_t = host_tensor(context_lens, torch.int32, dev)
        step_tokens = len(positions) // num_steps  # a decode step's: one per row

        def tokens_of(x, j: int):
            return x[j * step_tokens:(j + 1) * step_tokens]

        def rows_of(x, j: int):
            return x[j * num_rows:(j + 1) * num_rows]

        seq_ids = tuple(s.seq_id for s in seqs)
        metas = [AttentionMetadata(is_prefill=batch.is_prefill, slot_mapping=tokens_of(slots_t, j),
                                   context_lens=rows_of(context_t, j), block_tables=None, seq_ids=seq_ids,
                                   host_context_lens=rows_of(context_lens, j))
                 for j in range(num_steps)]
        if first == 0:  # with the longest context of the window's last step
            last_context = max(context_lens) if batch.is_prefill else max(starts) + batch.num_steps
            self._window = self._window_tables(batch, metas[0], last_context)
        for meta in metas:  # one tables and one runs tensor for every step of the window (`_replay` counts on it)
            meta.block_tables, meta.shared = self._window
        last = None
        if batch.is_prefill:
            meta = metas[0]
            cu_q, cu_k = [0], [0]
            for q, c in zip(batch.query_lens, context_lens):
                cu_q.append(cu_q[-1] + q)
                cu_k.append(cu_k[-1] + c)
            cu = host_tensor(cu_q + cu_k, torch.int32, dev)
            meta.cu_seqlens_q, meta.cu_seqlens_k = cu[:num_rows + 1], cu[num_rows + 1:]
            meta.max_seqlen_q, meta.max_seqlen_k = max(batch.query_lens), max(context_lens)
            last = meta.cu_seqlens_q[1:].long() - 1
        return [StepInputs(per_token[:num_ids] if num_ids and j == 0 else None, tokens_of(positions_t, j),
                           self._modality(tokens_of(image, j)), meta, last) for j, meta in enumerate(metas)]

    def _window_tables(self, batch: ScheduledBatch, first: AttentionMetadata,
                       max_context: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The window's padded block tables `[rows, width]` and, with cascade attention in a decode window, its
        runs `[rows, 2]` (computed at its first step, right for its later ones: contexts only grow), in one copy;
        or None where the backend needs no tables for this window."""
        if not self.backend.needs_block_tables(first, max_context):
            return None, None
        tables = [seq.block_table for seq in batch.seqs]
        width = max(map(len, tables))
        per_row = [x for table in tables for x in table + [0] * (width - len(table))]
        cascade = self.cascade and not batch.is_prefill
        if cascade:
            per_row += [x for run in shared_prefixes(tables, batch.starts, self.block_size) for x in run]
        t = host_tensor(per_row, torch.int32, self.device)
        end = len(tables) * width
        return t[:end].view(len(tables), width), (t[end:].view(len(tables), 2) if cascade else None)

    def _modality(self, image: list[bool]) -> tuple[torch.Tensor, torch.Tensor] | bool | None:
        """`StepInputs.modality` of a step's tokens (is each an image token?)."""
        if not any(image):
            return None
        if all(image):
            return True
        text_index = [i for i, x in enumerate(image) if not x]
        index = host_tensor(text_index + [i for i, x in enumerate(image) if x], torch.int64, self.device)
        return index[:len(text_index)], index[len(text_index):]

    def _embed(self, ids: torch.Tensor, modality: tuple[torch.Tensor, torch.Tensor] | bool | None) -> torch.Tensor:
        """Text tokens through `embed_tokens`, image tokens through the generation embeddings + aligner. A step
        with both gathers and scatters by index (a boolean mask would cost a device sync)."""
        if modality is None:
            return self.embed_text(ids)
        if modality is True:
            return self.embed_image(ids)
        text, image = modality
        h = torch.empty((ids.shape[0], self.hidden_size), dtype=self.dtype, device=self.device)
        h.index_copy_(0, text, self.embed_text(ids.index_select(0, text)))
        return h.index_copy_(0, image, self.embed_image(ids.index_select(0, image)))

    def _layers(self, h: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """The decoder stack on packed tokens `h [Ntok, hidden]` (the final norm is left to the heads).

        RoPE runs once per layer on q and k together: `x cos + rotate_half(x) sin` as `x cos + x[perm] sin'`
        (`sin'` = sin with its first half negated), the same products and sum as transformers', so bit-equal;
        16-bit on a GPU, the same roundings in one kernel (`kernels.rope`), within an ulp, which also stores k and
        v into the cache when the backend's store is that kernel's (`rope_store`); in a decode step the Triton
        attention kernels do that work themselves (`RopeStore`), one launch fewer per layer."""
        n, d = h.shape[0], self.head_dim
        if not self.fused_rope:
            cos = self.cos.index_select(0, positions).unsqueeze(1)
            sin = self.sin_signed.index_select(0, positions).unsqueeze(1)
        k_cache, v_cache = self.kv_cache[0], self.kv_cache[1]
        forwards = self.forwards
        x = forwards[0].input_norm(h)
        for i, f in enumerate(forwards):
            q, k, v = (t.view(n, -1, d) for t in f.qkv(x))
            if self.rope_stores and not meta.is_prefill and self.backend.fuses_rope_store:
                # the attention kernels rotate q and the new k and store k and v: one launch fewer per layer
                o = self.backend.decode(q, k_cache[i], v_cache[i], meta, self.scale,
                                        rope=RopeStore(k, v, self.cos, self.sin_signed, positions, meta.slot_mapping))
            elif self.rope_stores:
                q = rope_store(q, k, v, self.cos, self.sin_signed, positions, k_cache[i], v_cache[i],
                               meta.slot_mapping)
                o = self.backend.attend(i, q, k_cache[i], v_cache[i], meta, self.scale)
            else:
                if self.fused_rope:
                    q, k = rope(q, k, self.cos, self.sin_signed, positions)
                else:
                    qk = torch.cat([q, k], 1)
                    qk = qk * cos + qk.index_select(2, self.rope_perm) * sin
                    q, k = qk[:, :q.shape[1]], qk[:, q.shape[1]:]
                o = self.backend.forward(i, q, k, v, k_cache[i], v_cache[i], meta, self.scale)
            h, x = f.post_add_norm(h, f.o(o.reshape(n, -1)))
            if i + 1 < len(forwards):
                h, x = forwards[i + 1].input_add_norm(h, f.mlp(x))
            else:
                h = h + f.mlp(x)
        return h

    def _copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: whole blocks, every layer, K and V. One gather unless a copy reads another's target."""
        src, dst = zip(*copies)
        if set(src) & set(dst):
            for s, t in copies:
                self.kv_cache[:, :, t] = self.kv_cache[:, :, s]
            return
        index = host_tensor(list(src + dst), torch.int64, self.device)
        self.kv_cache[:, :, index[len(src):]] = self.kv_cache[:, :, index[:len(src)]]

    # ------------------------------------------------------------------------------------------------ CUDA graphs
    def _capture(self) -> None:
        """One graph per batch-size bucket, largest first, sharing one memory pool (nano-vllm's recipe)."""
        max_bs = self.graph_sizes[-1]
        dev = self.device
        self._g_hidden = torch.zeros((max_bs, self.hidden_size), dtype=self.dtype, device=dev)
        self._g_positions = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        self._g_slots = torch.full((max_bs,), -1, dtype=torch.int64, device=dev)
        self._g_context_lens = torch.zeros(max_bs, dtype=torch.int32, device=dev)
        self._g_tables = torch.zeros((max_bs, self.max_blocks_per_seq), dtype=torch.int32, device=dev)
        self._g_shared = torch.zeros((max_bs, 2), dtype=torch.int32, device=dev)  # zeros: no row shares
        self._g_window: tuple | None = None  # what the buffers' per-window part holds (see `_replay`)
        pool = None
        for size in reversed(self.graph_sizes):
            meta = AttentionMetadata(False, self._g_slots[:size], self._g_context_lens[:size],
                                     self._g_tables[:size], shared=self._g_shared[:size] if self.cascade else None)
            self._layers(self._g_hidden[:size], self._g_positions[:size], meta)  # warm-up: kernels compiled
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool):
                out = self._layers(self._g_hidden[:size], self._g_positions[:size], meta)
            pool = graph.pool() if pool is None else pool
            self.graphs[size] = (graph, out)
        torch.cuda.synchronize(dev)

    def _replay(self, h: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        if not self.graphs:
            self._capture()
        n = h.shape[0]
        size = next(b for b in self.graph_sizes if b >= n)
        graph, out = self.graphs[size]
        self._g_hidden[:n] = h
        self._g_positions[:n] = positions
        # The block tables, runs and padding rows are the same for every step of a window (its steps share one
        # tables tensor, held here so that its identity cannot pass to another's): written at its first step
        # only, five fewer small copies in each later one.
        window = (n, meta.block_tables, meta.shared)
        last = self._g_window
        if last is None or last[0] != n or last[1] is not window[1] or last[2] is not window[2]:
            self._g_slots.fill_(-1)
            self._g_context_lens.zero_()
            self._g_tables[:n, :meta.block_tables.shape[1]] = meta.block_tables
            if self.cascade:
                self._g_shared.zero_()
                if meta.shared is not None:
                    self._g_shared[:n] = meta.shared
            self._g_window = window
        self._g_slots[:n] = meta.slot_mapping
        self._g_context_lens[:n] = meta.context_lens
        graph.replay()
        return out[:n]
