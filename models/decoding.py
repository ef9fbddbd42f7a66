"""Access to the parts of a causal LM, and the one decode loop (evaluation, SIM-CoT's step decoder).

Decoding takes a left-padded batch (positions that ignore the padding, an attention mask that
hides it) and a cache already holding the prompt (the latent rollout fills one), then runs one
single-token forward per step for the rows still running. What a step costs is the model's
math, not bookkeeping: the KV cache grows in place by chunks (no per-token copy of the
whole cache), the attention mask is handed over ready in 4-D (transformers builds none), and
rows that hit eos leave the batch. Finished rows emit pad. On the CPU a tanh-GELU model's
activation runs as the same function in a cheaper form (`tanh_gelu.cpu_tanh_gelu`). Under ZeRO-3
every rank must make the same number of forward passes, so the stop decision is all-reduced
across the data-parallel group when one is given.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.cache_utils import DynamicLayer

from simcot.models.step_attention import step_attention
from simcot.models.tanh_gelu import cpu_tanh_gelu
from simcot.parallel import any_partitioned, decoding_done


def unwrap(lm: nn.Module) -> nn.Module:
    """The HF model under a peft wrapper (or the model itself)."""
    get_base = getattr(lm, "get_base_model", None)
    return get_base() if callable(get_base) else lm


def body(lm: nn.Module) -> nn.Module:
    """The transformer stack that returns final (normed) hidden states."""
    return unwrap(lm).get_decoder()


def head(lm: nn.Module) -> nn.Module:
    return unwrap(lm).get_output_embeddings()


@functools.cache
def _cache_keyword(forward_cls: type) -> str:
    params = inspect.signature(forward_cls.forward).parameters
    return "cache" if "cache" in params and "past_key_values" not in params else "past_key_values"


def with_cache(module: nn.Module, cache) -> dict:
    """The keyword argument that hands `module` a KV cache: ``cache`` from transformers 5.24 on
    (``past_key_values`` is deprecated there and removed in 5.40), ``past_key_values`` before."""
    return {_cache_keyword(type(unwrap(module))): cache}


def cache_of(out) -> object:
    """The KV cache a forward returned, under either name."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad id lists: (ids, attention_mask), both (B, T)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids, mask


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip padding: 0 at each row's first real token."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


@dataclass
class Prefill:
    """State after the prompt ran: the logits of its last position, cache, mask, next positions."""

    logits: torch.Tensor  # (B, V)
    cache: object
    mask: torch.Tensor  # (B, T_cache)
    next_pos: torch.Tensor  # (B,)
    metrics: dict = field(default_factory=dict)  # per-batch means reported by evaluation (latent health)


def prefill_ids(lm: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> Prefill:
    """Run a left-padded prompt batch (in length groups: `prefix_groups`) and keep its cache."""
    pos = positions(mask)

    def forward(i, m, p):
        out = lm(input_ids=i, attention_mask=m, position_ids=p, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1], cache_of(out)

    with cpu_tanh_gelu(unwrap(lm), ids.device):
        logits, cache = by_length(forward, ids, mask, pos, prefix_groups(lm, ids.shape[0]),
                                  capacity=ids.shape[1] + CACHE_CHUNK if ready_masks(lm) else 0)
    return Prefill(logits, cache, mask, pos[:, -1] + 1)


GROUP_ROWS = 32  # rows per prompt group at least: a smaller group's forward costs more than the padding it saves
MAX_GROUPS = 8


def prefix_groups(lm: nn.Module, rows: int) -> int:
    """How many length groups a prompt batch of `rows` runs in (1: one forward, as padded).

    One group under ZeRO-3: there every rank must make the same number of forwards (each gathers
    the weights) and ranks' batches differ. Otherwise one group per GROUP_ROWS rows, at most
    MAX_GROUPS: at batch 256 with questions of 8 to 24 tokens, 8 groups run ~30 % fewer prompt
    positions than the batch padded to its longest row."""
    groups = max(1, min(MAX_GROUPS, rows // GROUP_ROWS))
    return 1 if groups > 1 and any_partitioned(unwrap(lm).get_input_embeddings()) else groups


def by_length(forward, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, groups: int, capacity: int = 0):
    """`forward(ids, mask, positions) -> (out at the last column (b, X), KV cache)` over a
    left-padded batch, run in `groups` groups of rows of similar length, each cut to its own
    longest row; returns (out (B, X), one cache for the whole batch, as wide as `ids`).

    A row's keys and values do not depend on the padding to its left (masked, and positions count
    from the first real token), so the groups' caches are put back side by side, right-aligned,
    with zeros in the columns left of a group's width (padding, masked by every later step).
    Caches of another kind than transformers' DynamicLayer (sliding windows, quantised) are not
    merged: one forward instead.
    `capacity` > 0: the cache comes back reserved (`ReservedLayer`) with room for that many
    positions, the groups written straight into its buffers (no second copy of the prompt's cache).
    """
    if groups <= 1:
        out, cache = forward(ids, mask, pos)
        if capacity:
            reserve(cache, capacity)
        return out, cache
    bsz, width = ids.shape
    room = max(capacity, width)
    lengths = mask.sum(1)  # (B,)
    order = lengths.argsort(descending=True, stable=True)  # (B,)
    out, cache, layers = None, None, None
    for rows in order.tensor_split(groups):
        w = max(int(lengths[rows[0]]), 1)  # the group's longest row
        o, c = forward(ids[rows, width - w:], mask[rows, width - w:], pos[rows, width - w:])
        if cache is None:
            if any(type(layer) is not DynamicLayer for layer in getattr(c, "layers", [None])):
                return by_length(forward, ids, mask, pos, 1, capacity)
            out = o.new_empty(bsz, *o.shape[1:])
            cache = c
            layers = [(cache_zeros(lay.keys, bsz, lay.keys.shape[1], room, lay.keys.shape[-1]),  # (B, heads, room, D)
                       cache_zeros(lay.values, bsz, lay.values.shape[1], room, lay.values.shape[-1]))
                      for lay in c.layers]
        out[rows] = o
        for (k, v), lay in zip(layers, c.layers):
            k[rows, :, width - w:width] = lay.keys
            v[rows, :, width - w:width] = lay.values
    if capacity:
        cache.layers = [ReservedLayer(k, v, capacity, length=width) for k, v in layers]
    else:
        for lay, (k, v) in zip(cache.layers, layers):
            lay.keys, lay.values = k, v
    return out, cache


def sample_top_p(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """One token per row from softmax(logits / temperature), restricted to the smallest set of
    tokens whose probability reaches top_p."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    drop = sorted_p.cumsum(-1) - sorted_p >= top_p  # tokens after the nucleus is full
    sorted_p = sorted_p.masked_fill(drop, 0.0)
    pick = torch.multinomial(sorted_p.cpu(), 1, generator=generator).to(logits.device)
    return order.gather(-1, pick).squeeze(-1)


class CpuCacheBuffers:
    """Zeroed CPU buffers for reserved KV caches, reused once no tensor views them any more: on the
    CPU what CUDA's caching allocator does on a GPU. A batch-256 cache layer is megabytes, and glibc
    hands a freed block that large back to the OS (unmapped, or trimmed off the heap), so without
    reuse every batch faults in each page of its cache again: ~7 % of a batch-256 evaluation
    (benchmarks/README.md, rollout). A buffer shares the storage of a pooled flat tensor, which is
    free when that storage has no user but the pool. `release` (end of an evaluation) drops them all."""

    HEADROOM = 8  # a new flat has 1/8 more room: the next batch's prompts may be a little longer
    FREE_BYTES = 256 << 20  # free flats kept beyond what is in use, on a miss

    def __init__(self):
        self.flats: list[torch.Tensor] = []

    @staticmethod
    def _free(flat: torch.Tensor) -> bool:
        return torch._C._storage_Use_Count(flat.untyped_storage()._cdata) <= 2  # the flat and this call's wrapper

    def zeros(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        n = math.prod(shape)
        fits = [f for f in self.flats if f.dtype == dtype and f.numel() >= n and self._free(f)]
        if fits:
            flat = min(fits, key=torch.Tensor.numel)
        else:
            self._trim()
            flat = torch.empty(n + n // self.HEADROOM, dtype=dtype)
            self.flats.append(flat)
        # an alias of the flat's storage, not a view of it: autograd treats it as any new tensor
        # (a view made under no_grad may not be written in place under grad mode)
        return torch.empty(0, dtype=dtype).set_(flat.untyped_storage(), 0, shape).zero_()

    def _trim(self) -> None:
        """Drop free flats, oldest first, while they hold more than max(FREE_BYTES, bytes in use)."""
        size = lambda f: f.numel() * f.element_size()  # noqa: E731
        free = [f for f in self.flats if self._free(f)]
        used = sum(size(f) for f in self.flats) - sum(size(f) for f in free)
        held = sum(size(f) for f in free)
        dropped = set()
        for f in free:
            if held <= max(self.FREE_BYTES, used):
                break
            dropped.add(id(f))
            held -= size(f)
        self.flats = [f for f in self.flats if id(f) not in dropped]

    def release(self) -> None:
        self.flats = []


CPU_CACHE_BUFFERS = CpuCacheBuffers()


def cache_zeros(like: torch.Tensor, *shape: int) -> torch.Tensor:
    """A zeroed buffer for a reserved KV cache, of `like`'s dtype and device: from
    `CPU_CACHE_BUFFERS` on the CPU, a new tensor elsewhere (CUDA's allocator already reuses)."""
    if like.device.type == "cpu" and hasattr(torch._C, "_storage_Use_Count"):
        return CPU_CACHE_BUFFERS.zeros(shape, like.dtype)
    return like.new_zeros(shape)


CACHE_CHUNK = 16  # positions a reserved cache grows by: one copy per 16 tokens, at most 15 attended for nothing


class ReservedLayer(DynamicLayer):
    """One layer's KV cache in a buffer that grows by chunks. A step writes its key/value in place
    and attention reads the whole buffer, the positions not written yet hidden by the mask
    (`decode` passes a 4-D one). transformers' DynamicLayer concatenates instead: a copy of the
    whole cache per layer per token, half the CPU time of a batch-256 decode. A view of only the
    written part would be no better on CPU (attention over a strided view costs about that copy);
    a buffer sized for every token at once makes each step attend to all of it."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, capacity: int, length: int | None = None):
        """`keys`/`values` (B, heads, T, D) hold `length` written positions (default: all T); the
        buffers are taken as they are when they already have room for `capacity` (no copy)."""
        super().__init__()
        self.length = keys.shape[-2] if length is None else length
        self.keys, self.values = keys, values
        self.device, self.is_initialized = keys.device, True
        self.grow(capacity)

    @property
    def capacity(self) -> int:
        return self.keys.shape[-2]

    def grow(self, capacity: int) -> None:
        """Make room for `capacity` positions (zeros beyond the written ones: masked scores meet
        finite values)."""
        if capacity <= self.keys.shape[-2]:
            return
        k, v = self.keys, self.values
        self.keys = cache_zeros(k, *k.shape[:-2], capacity, k.shape[-1])  # (B, heads, capacity, D)
        self.values = cache_zeros(v, *v.shape[:-2], capacity, v.shape[-1])
        self.keys[..., :self.length, :] = k[..., :self.length, :]
        self.values[..., :self.length, :] = v[..., :self.length, :]

    position: torch.Tensor | None = None  # static mode: where the next step writes, a device tensor

    def make_static(self, capacity: int, buffers: "StaticBuffers", slot: int) -> None:
        """Static shapes, for CUDA graphs: from now on the buffers hold exactly `capacity` positions,
        taken from `buffers` (the same addresses for every batch of this shape, `slot` = the layer),
        and a step writes where `position`, a device tensor, says (index_copy_). A Python int
        position would be a constant of the traced step: a new graph per token. `length` (the
        written positions, a Python int) is then kept by the decode loop, outside the graph."""
        self.keys = buffers.take(self.keys, slot, 0, capacity, self.length)
        self.values = buffers.take(self.values, slot, 1, capacity, self.length)
        self.position = buffers.position(self.keys, slot, self.length)
        self.static = (buffers, slot)

    def update(self, key_states, value_states, *args, **kwargs):
        n = key_states.shape[-2]
        if self.position is not None:  # static: the same ops on the same buffers at every step
            at = self.position + torch.arange(n, device=self.position.device)  # (n,)
            self.keys.index_copy_(-2, at, key_states)
            self.values.index_copy_(-2, at, value_states)
            self.position.add_(n)
            return self.keys, self.values
        self.keys[..., self.length:self.length + n, :] = key_states
        self.values[..., self.length:self.length + n, :] = value_states
        self.length += n
        return self.keys, self.values

    def get_seq_length(self, *args) -> int:
        return self.length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.position is not None:  # static: into the buffers of the smaller batch
            buffers, slot = self.static
            self.keys = buffers.select(self.keys, slot, 0, indices)
            self.values = buffers.select(self.values, slot, 1, indices)
            return
        self.keys, self.values = self.keys[indices], self.values[indices]


def reserve(cache, capacity: int) -> bool:
    """Move every layer of a transformers DynamicCache into a `ReservedLayer` with room for
    `capacity` positions (in place); True as well for a cache already reserved (grown to
    `capacity` if smaller); False, leaving the cache alone, for any other kind of cache."""
    layers = getattr(cache, "layers", None)
    if layers and all(type(layer) is ReservedLayer for layer in layers):
        for layer in layers:
            layer.grow(capacity)
        return True
    if not layers or any(type(layer) is not DynamicLayer or not layer.is_initialized for layer in layers):
        return False
    cache.layers = [ReservedLayer(layer.keys, layer.values, capacity) for layer in layers]
    return True


class StaticBuffers:
    """The KV buffers of static decodes (`--eval.compile` on a GPU: CUDA graphs), one per layer,
    keys or values, and batch size, reused by every later batch of the same shape. A CUDA graph
    reads and writes fixed addresses: the graph recorded for the first batch then replays for the
    next ones, where new buffers would make torch.compile record it again (and give up on CUDA
    graphs after 128 such records). Buffers of another capacity than the one asked are dropped:
    evaluation's batches come sorted by length, so the capacity only grows, a few times per
    evaluation. What a reused buffer holds beyond a row's written positions is finite (an earlier
    batch's keys, or zeros) and masked."""

    def __init__(self):
        self.buffers: dict[tuple, torch.Tensor] = {}
        self.capacity: int | None = None

    def _buffer(self, key: tuple, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        buf = self.buffers.get(key)
        if buf is None or buf.shape != shape or buf.dtype != like.dtype or buf.device != like.device:
            buf = self.buffers[key] = like.new_zeros(shape)
            torch._dynamo.mark_static_address(buf, guard=False)  # a new address records again, no recompile
        return buf

    def take(self, like: torch.Tensor, slot: int, kind: int, capacity: int, length: int) -> torch.Tensor:
        """The buffer (B, heads, capacity, D) of layer `slot` (kind 0 keys, 1 values) holding the
        first `length` positions of `like`."""
        if capacity != self.capacity:
            self.buffers, self.capacity = {}, capacity
        shape = (*like.shape[:-2], capacity, like.shape[-1])
        buf = self._buffer((slot, kind, shape[0]), shape, like)
        buf[..., :length, :] = like[..., :length, :]
        return buf

    def select(self, buf: torch.Tensor, slot: int, kind: int, rows: torch.Tensor) -> torch.Tensor:
        """`buf[rows]` (layer `slot`'s keys or values) in the pooled buffer of that batch size."""
        out = self._buffer((slot, kind, len(rows)), (len(rows), *buf.shape[1:]), buf)
        return torch.index_select(buf, 0, rows, out=out)

    def position(self, like: torch.Tensor, slot: int, length: int) -> torch.Tensor:
        pos = self._buffer((slot, "position"), (), torch.zeros((), dtype=torch.long, device=like.device))
        pos.fill_(length)
        return pos

    def release(self) -> None:
        self.buffers, self.capacity = {}, None


STATIC_BUFFERS = StaticBuffers()
STATIC_BUCKET = 64  # a static decode's capacity: a multiple of this, so batches of close lengths share graphs


def static_rows(rows: int, live: int) -> int:
    """The batch of a static decode once finished rows leave it: the smallest power of two that
    holds the `live` rows (finished rows fill the rest, emitting pad), never more than `rows`.
    A decode of batch B then runs at most log2(B) + 1 batch sizes, each its own CUDA graph."""
    return min(rows, 1 << max(live - 1, 0).bit_length())


class StepMasks:
    """Single-position forwards on a reserved cache (the latent steps, `<eot>`): the attention
    they run (`impl`, see `step_attention`) and, called with a (B, T) 0/1 mask over the written
    positions, the 4-D mask over the whole buffer such a step needs (positions not written yet
    hidden), in that attention's format."""

    def __init__(self, cache, impl: str, dtype: torch.dtype):
        self.cache, self.impl, self.dtype = cache, impl, dtype

    def __call__(self, mask: torch.Tensor) -> torch.Tensor:
        width = self.cache.layers[0].capacity
        full = mask.new_zeros(mask.shape[0], width, dtype=torch.bool)  # (B, capacity)
        full[:, :mask.shape[1]] = mask.bool()
        return _mask_4d(full, self.impl, self.dtype)


def reserved_masks(lm: nn.Module, cache, capacity: int, dtype: torch.dtype) -> StepMasks | None:
    """Reserve `cache` for `capacity` positions when `lm` takes ready masks, and return the
    `StepMasks` of single-position steps on it; None (the cache left as it is, 2-D masks) otherwise."""
    impl = ready_masks(lm)
    if impl is None or not reserve(cache, capacity):
        return None
    model_type = getattr(unwrap(lm).config, "model_type", None)
    return StepMasks(cache, step_attention(impl, cache.layers[0].keys.device, model_type), dtype)


def ready_masks(lm: nn.Module | None) -> str | None:
    """The attention implementation of `lm` when `_mask_4d` can hand it a ready mask, else None."""
    impl = getattr(getattr(unwrap(lm), "config", None), "_attn_implementation", None) if lm is not None else None
    return impl if impl in ("sdpa", "eager") else None


@contextlib.contextmanager
def attention_as(lm: nn.Module, impl: str | None):
    """Run `lm` with attention implementation `impl` inside the block (its own again after)."""
    config = unwrap(lm).config if impl is not None else None
    own = config._attn_implementation if config is not None else None
    if impl is None or impl == own:
        yield
        return
    config._attn_implementation = impl  # read by every attention module at each forward
    try:
        yield
    finally:
        config._attn_implementation = own


def _mask_4d(mask: torch.Tensor, impl: str, dtype: torch.dtype) -> torch.Tensor:
    """`mask` (B, T) bool as the ready mask (B, 1, 1, T) transformers would build for one query."""
    if impl == "sdpa":
        return mask[:, None, None, :]  # True = attend, as transformers' sdpa_mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(  # additive, as its eager_mask
        ~mask, torch.finfo(dtype).min)[:, None, None, :]


def lm_step(lm: nn.Module):
    """The single-token forward of a causal LM for `decode`: tokens (b,) -> next-token logits (b, V)."""
    cache_kw = _cache_keyword(type(unwrap(lm)))  # outside the step: torch.compile traces the step

    def step(tok: torch.Tensor, cache, **kw) -> torch.Tensor:
        return lm(input_ids=tok[:, None], use_cache=True, **{cache_kw: cache}, **kw).logits[:, -1]
    return step


def body_step(lm: nn.Module):
    """The single-position forward of evaluation's latent steps and `<eot>`: input embeddings
    (b, 1, H) -> the final hidden state (b, H), on the cache, with the mask and positions given."""
    stack = body(lm)
    cache_kw = _cache_keyword(type(unwrap(stack)))  # outside the step: torch.compile traces the step

    def step(embeds: torch.Tensor, cache, **kw) -> torch.Tensor:
        return stack(inputs_embeds=embeds, use_cache=True, **{cache_kw: cache}, **kw).last_hidden_state[:, -1]
    return step


STEPS = {"lm": lm_step, "body": body_step}


def compiled_step(lm: nn.Module, backend: str = "inductor", kind: str = "lm", mode: str | None = None):
    """`lm_step(lm)` (kind "lm": decoding) or `body_step(lm)` ("body": latent steps, `<eot>`)
    through torch.compile, made once per model and kept on it. Dynamic shapes: the batch shrinks
    as rows finish and the reserved cache grows by chunks, so after the first recompile one graph
    serves every step. `mode` "reduce-overhead": inductor's CUDA graphs, for a static decode
    (`decode(static=True)`: one shape per batch size). Whether it pays depends on the device: the
    rollout benchmark's "compiled" rows measure it (benchmarks/README.md)."""
    key = f"_simcot_compiled_{kind}_step_{backend}" + (f"_{mode}" if mode else "")
    step = lm.__dict__.get(key)
    if step is None:
        step = lm.__dict__[key] = torch.compile(STEPS[kind](lm), dynamic=True, backend=backend,
                                                **({"mode": mode} if mode else {}))
    return step


def _compact_at(rows: int) -> int:
    """Finished rows that make dropping them from the batch pay: each drop copies the cache of the
    rows kept once, so a big batch waits for an eighth of its rows, a small one drops each at once."""
    return max(1, rows // 8)


@torch.no_grad()
def decode(step, state: Prefill, max_new_tokens: int, eos_id: int, pad_id: int, group=None,
           synced: bool = False, temperature: float = 0.0, top_p: float = 1.0,
           generator: torch.Generator | None = None, lm: nn.Module | None = None,
           static: bool = False) -> torch.Tensor:
    """The decode loop: continue `state` one token per row per `step` call; (B, <= max_new_tokens)
    ids, pad after each row's eos. Greedy, or top-p sampling from `generator` (CPU) with `temperature` > 0.

    `step(tokens (b,), cache, attention_mask=..., position_ids=...) -> logits (b, V)` runs the
    model on the rows still in the batch (see `lm_step`). With `lm` (whose config names the
    attention) on sdpa or eager attention, the cache grows by chunks in place (`reserve`)
    and each step gets a ready 4-D mask: the padding and the positions not written yet hidden.
    Otherwise (another attention, another cache) the cache grows as transformers grows it and a
    2-D mask is passed (none when `state.mask` is None: no padding). Rows that finished are dropped
    from the batch (their cache rows too) once enough have, so they stop costing. `synced` forces
    every rank to run the same number of steps (ZeRO-3); the stop test is then an all-reduce over
    `group`, and a rank whose rows are all done keeps stepping its last rows.

    `static` (a reserved cache only; for CUDA graphs): every step of a batch size has the same
    shapes, buffers and ops. The cache is reserved once for the whole answer (a multiple of
    STATIC_BUCKET positions, from `STATIC_BUFFERS`), a step writes at a position held in a device
    tensor, and finished rows leave the batch only when the rows still running fit in a power of
    two (`static_rows`). Each step attends to the whole reservation: on the CPU, where attention
    reads the cache from memory, the chunked growth is cheaper.
    """
    bsz = state.logits.shape[0]
    device = state.logits.device
    n_new = max(max_new_tokens, 0)
    out = torch.full((bsz, n_new), pad_id, dtype=torch.long, device=device)
    rows = torch.arange(bsz, device=device)  # original row of each row still in the batch
    done = torch.zeros(bsz, dtype=torch.bool, device=device)
    cache, logits = state.cache, state.logits
    cached = cache.get_seq_length() if callable(getattr(cache, "get_seq_length", None)) else None
    mask = (state.mask.bool() if state.mask is not None
            else torch.ones(bsz, cached or 0, dtype=torch.bool, device=device))  # (B, T)
    width = mask.shape[1]
    full = torch.cat([mask, mask.new_ones(bsz, n_new)], 1)  # (B, T + new): every position once written
    pos = state.next_pos.clone() if state.next_pos is not None else None
    fdtype = logits.dtype if logits.is_floating_point() else torch.float32
    room = width if static else width + min(n_new, CACHE_CHUNK)
    attend = reserved_masks(lm, cache, room, fdtype) if cached == width else None
    reserved = attend is not None
    static = static and reserved
    if static:
        capacity = -(-(width + n_new) // STATIC_BUCKET) * STATIC_BUCKET
        for i, layer in enumerate(cache.layers):
            layer.make_static(capacity, STATIC_BUFFERS, i)
    capacity = cache.layers[0].capacity if reserved else 0  # a cache reserved at the prompt may have more room
    compactable = reserved or callable(getattr(cache, "batch_select_indices", None))
    steps = 0
    activations = cpu_tanh_gelu(unwrap(lm), device) if lm is not None else contextlib.nullcontext()
    with attention_as(lm, attend.impl if reserved else None), activations:
        for t in range(max_new_tokens):
            nxt = sample_top_p(logits, temperature, top_p, generator) if temperature > 0 else logits.argmax(-1)
            tok = torch.where(done, torch.full_like(nxt, pad_id), nxt)
            out[rows, t] = tok
            steps = t + 1
            done = done | (tok == eos_id)
            if t == max_new_tokens - 1:
                break
            all_done = bool(done.all())
            if decoding_done(done, synced, group):
                break
            finished, keep = int(done.sum()), None
            if static and not all_done and static_rows(len(rows), len(rows) - finished) < len(rows):
                size = static_rows(len(rows), len(rows) - finished)  # running rows first, finished ones fill
                keep = done.to(torch.int8).argsort(stable=True)[:size].sort().values  # (b',)
            elif not static and compactable and not all_done and finished >= _compact_at(len(rows)):
                keep = (~done).nonzero().squeeze(1)  # (b',)
            if keep is not None:
                cache.batch_select_indices(keep)
                rows, tok, done, full = rows[keep], tok[keep], done[keep], full[keep]
                pos = pos[keep] if pos is not None else None
            end = width + t + 1  # cache length once this step's token is in
            kw = {}
            if reserved:  # the whole buffer is attended: what is not written yet is hidden
                if end > capacity:
                    capacity = min(end + CACHE_CHUNK - 1, width + n_new)
                    for layer in cache.layers:
                        layer.grow(capacity)
                kw["attention_mask"] = attend(full[:, :end])
            elif state.mask is not None:
                kw["attention_mask"] = full[:, :end].long()
            if pos is not None:
                kw["position_ids"] = pos[:, None]
                pos = pos + 1
            if static:  # a new step: the last one's outputs (read above) may be overwritten by its replay
                torch.compiler.cudagraph_mark_step_begin()
            logits = step(tok, cache, **kw)
            if static:
                for layer in cache.layers:  # the graph wrote at `position`; the Python count follows
                    layer.length += 1
    return out[:, :steps]


@torch.no_grad()
def greedy_decode(lm: nn.Module, state: Prefill, max_new_tokens: int, eos_id: int, pad_id: int,
                  group=None, synced: bool = False, temperature: float = 0.0, top_p: float = 1.0,
                  generator: torch.Generator | None = None, compile: bool = False) -> torch.Tensor:
    """`decode` of a causal LM's continuation of `state` (see there); `compile`: its single-token
    step through torch.compile (`compiled_step`), on a GPU as CUDA graphs over a static decode."""
    static = compile and state.logits.device.type in STATIC_DEVICES
    step = (compiled_step(lm, mode="reduce-overhead") if static else compiled_step(lm)) if compile else lm_step(lm)
    return decode(step, state, max_new_tokens, eos_id, pad_id, group, synced, temperature, top_p, generator,
                  lm=lm, static=static)


STATIC_DEVICES = ("cuda",)  # where `--eval.compile` decodes with static shapes, as CUDA graphs


def trim_at_eos(ids: list[int], eos_id: int) -> list[int]:
    return ids[: ids.index(eos_id)] if eos_id in ids else ids
