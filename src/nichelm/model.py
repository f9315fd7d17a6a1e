"""The decoder: one small, readable GPT with two layouts.

- ``gpt2``: llm.c-compatible. Learned positions, LayerNorm, GELU MLP, tied embeddings.
- ``llama``: rotary positions, RMSNorm, SwiGLU MLP, grouped-query attention,
  optional QK-norm, untied head.

Both share one Block; the differences are a handful of flags in ModelConfig.
With ``ModelConfig.projected`` the model is a projected network (SLM-pn, Plan Early): each block's MLP
is a ProjectedMLP whose weights depend on the cluster's expert, attention and embeddings are shared, and
``instantiate`` turns one expert (or a mixture of them) into a plain GPT in closed form.
Attention goes through ``F.scaled_dot_product_attention`` (flash kernels on GPU).
KV caches (``SlotCache`` for batched decoding, ``KVCache`` for beam search) make generation linear
in the output length.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from nichelm.config import PRESETS as PRESETS  # noqa: F401  (re-exported: the table lives in config, torch-free)


@dataclass(frozen=True)
class Projection:
    """A projected network's shape: per layer, expert i's MLP weights are W = sum_q E[i,q] sum_r M[q,r] T[r]
    (T: h basis tensors shaped like the plain MLP's weights, M: m x h per layer, E: one m-vector per cluster)."""
    clusters: int                  # experts, one per cluster of the generic data
    m: int                         # length of an expert's code E[i] (shared by every layer)
    h: int                         # basis tensors per layer


@dataclass
class ModelConfig:
    arch: str = "llama"            # "gpt2" | "llama"
    vocab_size: int = 512          # padded to a multiple of 128 inside the model
    block_size: int = 256          # longest sequence the model sees (context)
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None   # grouped-query attention; None = n_head
    n_embd: int = 128
    mlp_ratio: float = 4.0         # hidden = ratio * n_embd (SwiGLU uses 2/3 of it, rounded)
    qk_norm: bool = False
    rope_theta: float = 10000.0
    dropout: float = 0.0
    projected: Projection | None = None   # a projected network (SLM-pn); None = the plain model

    def __post_init__(self):
        if isinstance(self.projected, dict):             # read back from json (trainer.json, model_config.json)
            self.projected = Projection(**self.projected)

    def base(self) -> ModelConfig:
        """The plain model an expert of this projected network instantiates into."""
        return replace(self, projected=None)

    @property
    def padded_vocab_size(self) -> int:
        return ((self.vocab_size + 127) // 128) * 128

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.projected is None:       # plain models' configs (checkpoints, exports) stay as they always were
            del d["projected"]
        return d


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def make_norm(cfg: ModelConfig, dim: int) -> nn.Module:
    return nn.LayerNorm(dim) if cfg.arch == "gpt2" else RMSNorm(dim)


def rotary_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()                      # (max_len, head_dim/2)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, T, D) by per-position angles; cos/sin are (B or 1, 1, T, D/2)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


class KVCache:
    """Preallocated keys/values for rows that all have the same length (beam search): one
    (B, kv_heads, max_len, head_dim) tensor per layer; a forward of T tokens appends at `length`.

    One tensor per layer (not one 5-D tensor) so that writing a step into a layer's cache is an
    in-place update of that tensor, which torch.compile keeps in place instead of copying the cache.
    """

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device, dtype):
        head_dim = cfg.n_embd // cfg.n_head
        shape = (batch, cfg.kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.length = 0                                    # filled positions (same for all rows)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        start, end = self.length, self.length + k.shape[2]
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        if layer == len(self.k) - 1:
            self.length = end
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep the given rows, in that order (beam search)."""
        self.k = [k[rows] for k in self.k]
        self.v = [v[rows] for v in self.v]


class SlotCache:
    """Preallocated keys/values where every row has its own length (batched decoding, nichelm.generate).

    A row's entry for position p lives in slot p. Before each forward the caller says which rows
    write (`rows`, (R, 1)) and where (`slots`, (R, T)): a step writes each row's new tokens at its
    own positions (a step of some rows only attends over those rows' caches), and prompts are written
    into the rows that take them while the other rows keep theirs. Attention then sees the whole cache and the mask decides which slots count; slots
    past a row's position may hold stale entries, which a causal mask never shows. With
    `prefill`, attention uses only the forward's own entries (a whole prompt, causal).
    """

    def __init__(self, cfg: ModelConfig, batch: int, capacity: int, device, dtype):
        head_dim = cfg.n_embd // cfg.n_head
        shape = (batch, cfg.kv_heads, capacity, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.all_rows = torch.arange(batch, device=device)[:, None]
        self.rows, self.slots, self.prefill = self.all_rows, None, False

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        self.k[layer][self.rows, :, self.slots] = k.transpose(1, 2)      # (R, T, KVH, D) at (row, slot)
        self.v[layer][self.rows, :, self.slots] = v.transpose(1, 2)
        if self.prefill:
            return k, v
        if self.rows is self.all_rows:
            return self.k[layer], self.v[layer]
        return self.k[layer][self.rows[:, 0]], self.v[layer][self.rows[:, 0]]    # a step of some rows only


def decode_attention(q, k, v, bias):
    """Attention of a few queries per row over the cache: q (B, H, T, D), k/v (B, KVH, >= S, D), bias
    (B, 1, T, S) additive (or bool: allowed); the first S cache slots are the keys. Grouped heads share
    a key/value head by a reshape, not a copy."""
    B, H, T, D = q.shape
    k, v = k[:, :, :bias.shape[-1]], v[:, :, :bias.shape[-1]]
    if bias.dtype == torch.bool:                                  # allowed/blocked -> 0/-inf
        bias = torch.zeros(bias.shape, dtype=q.dtype, device=q.device).masked_fill_(~bias, float("-inf"))
    kvh = k.shape[1]
    group = H // kvh
    q = q.reshape(B, kvh, group * T, D)                           # heads of one kv head together
    scores = torch.matmul(q, k.transpose(-1, -2)) * D ** -0.5     # (B, KVH, group*T, S)
    scores = scores.view(B, kvh, group, T, -1) + bias[:, :, None]
    probs = torch.softmax(scores.float(), dim=-1).to(v.dtype).view(B, kvh, group * T, -1)
    return torch.matmul(probs, v).reshape(B, H, T, D)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv_head = cfg.n_head, cfg.kv_heads
        self.head_dim = cfg.n_embd // cfg.n_head
        bias = cfg.arch == "gpt2"
        self.qkv = nn.Linear(cfg.n_embd, (cfg.n_head + 2 * self.n_kv_head) * self.head_dim, bias=bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=bias)
        self.q_norm = RMSNorm(self.head_dim) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim) if cfg.qk_norm else None
        self.dropout = cfg.dropout

    def forward(self, x, rope=None, cache: KVCache | SlotCache | None = None, mask=None):
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split(
            [self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim], dim=-1)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        if mask is None:   # training / plain forward / a prompt: causal, no padding
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv_head != self.n_head,
                                               dropout_p=self.dropout if self.training else 0.0)
        else:              # decoding steps (a few queries per row): plain math beats SDPA's kernels here
            y = decode_attention(q, k, v, mask)
        return self.proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.swiglu = cfg.arch == "llama"
        if self.swiglu:
            hidden = int(2 * cfg.mlp_ratio * cfg.n_embd / 3)
            hidden = ((hidden + 63) // 64) * 64
            self.gate_up = nn.Linear(cfg.n_embd, 2 * hidden, bias=False)
            self.down = nn.Linear(hidden, cfg.n_embd, bias=False)
        else:
            hidden = int(cfg.mlp_ratio * cfg.n_embd)
            self.up = nn.Linear(cfg.n_embd, hidden)
            self.down = nn.Linear(hidden, cfg.n_embd)

    def forward(self, x):
        if self.swiglu:
            gate, up = self.gate_up(x).chunk(2, dim=-1)
            return self.down(F.silu(gate) * up)
        return self.down(F.gelu(self.up(x), approximate="tanh"))


class ProjectedMLP(nn.Module):
    """The MLP of a projected network: every weight and bias of the plain MLP is a mix of this layer's h basis
    tensors, W = sum_r c[r] T[r], with the coefficients c = code @ M (M: this layer's m x h `mix`; code: the
    expert's m-vector, held by the GPT). W is linear in the code, so a mixture of experts' codes gives the
    mixture of their weights: what `instantiate` writes into a plain MLP."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        p = cfg.projected
        self.swiglu = cfg.arch == "llama"
        with torch.device("meta"):                     # the plain MLP's parameter names and shapes, nothing allocated
            shapes = {name: w.shape for name, w in MLP(cfg).named_parameters()}
        self.names = list(shapes)                      # "down.weight", ...; ParameterDict keys cannot hold dots
        self.mix = nn.Parameter(torch.randn(p.m, p.h) / math.sqrt(p.h))
        # Each basis tensor starts as the plain MLP would (biases 0; GPT-2's scaled init for the down projection),
        # and code @ mix has unit norm in expectation (E ~ N(0, 1/m), see GPT): an expert starts at the plain scale.
        self.basis = nn.ParameterDict()
        for name, shape in shapes.items():
            std = 0.02 / math.sqrt(2 * cfg.n_layer) if name == "down.weight" else 0.02
            init = torch.zeros(p.h, *shape) if name.endswith("bias") else torch.randn(p.h, *shape) * std
            self.basis[name.replace(".", "_")] = nn.Parameter(init)

    def weights(self, code: torch.Tensor) -> dict[str, torch.Tensor]:
        """The plain MLP's state (name -> tensor) of the expert with this code (m,)."""
        coef = code @ self.mix                                            # (h,)
        return {name: torch.tensordot(coef, self.basis[name.replace(".", "_")], dims=1) for name in self.names}

    def _run(self, x, w: dict[str, torch.Tensor]):
        """What MLP.forward computes, with the weights w."""
        if self.swiglu:
            gate, up = F.linear(x, w["gate_up.weight"]).chunk(2, dim=-1)
            return F.linear(F.silu(gate) * up, w["down.weight"])
        hidden = F.gelu(F.linear(x, w["up.weight"], w["up.bias"]), approximate="tanh")
        return F.linear(hidden, w["down.weight"], w["down.bias"])

    def forward(self, x, experts: list[tuple[torch.Tensor | None, torch.Tensor]]):
        """experts: (rows, code) groups (GPT.expert_groups); rows None = the whole batch. Each expert's weights
        are computed once per forward, whatever the number of its rows."""
        if len(experts) == 1 and experts[0][0] is None:
            return self._run(x, self.weights(experts[0][1]))
        out = torch.empty_like(x)
        for rows, code in experts:
            out[rows] = self._run(x[rows], self.weights(code))
        return out


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.norm1 = make_norm(cfg, cfg.n_embd)
        self.attn = Attention(cfg, layer)
        self.norm2 = make_norm(cfg, cfg.n_embd)
        self.mlp = MLP(cfg) if cfg.projected is None else ProjectedMLP(cfg)

    def forward(self, x, rope=None, cache=None, mask=None, experts=None):
        x = x + self.attn(self.norm1(x), rope, cache, mask)
        if experts is not None:                       # a projected network: the MLP of the rows' experts
            return x + self.mlp(self.norm2(x), experts)
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.arch not in ("gpt2", "llama"):
            raise ValueError(f"unknown arch {cfg.arch!r}; use 'gpt2' or 'llama'")
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.padded_vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.arch == "gpt2" else None
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm_f = make_norm(cfg, cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.padded_vocab_size, bias=False)
        if cfg.arch == "gpt2":
            self.lm_head.weight = self.wte.weight          # tied, as in GPT-2
        if cfg.arch == "llama":
            cos, sin = rotary_tables(cfg.n_embd // cfg.n_head, cfg.block_size, cfg.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        # Projected network: E, one code per cluster's expert (the basis and mix are in each ProjectedMLP).
        self.experts = None if cfg.projected is None else nn.Parameter(
            torch.randn(cfg.projected.clusters, cfg.projected.m) / math.sqrt(cfg.projected.m))
        self.apply(self._init_weights)
        # GPT-2's scaled init of residual projections: keeps the residual stream's variance flat with depth.
        for name, p in self.named_parameters():
            if name.endswith("proj.weight") or name.endswith("down.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.wpe is not None:
            n -= self.wpe.weight.numel()
        return n

    def _rope(self, positions: torch.Tensor | None, T: int, offset: int = 0):
        if self.wpe is not None:
            return None
        if positions is None:        # (1, 1, T, D/2): shared by every row
            return (self.rope_cos[offset:offset + T][None, None], self.rope_sin[offset:offset + T][None, None])
        return (self.rope_cos[positions][:, None], self.rope_sin[positions][:, None])   # per-row positions

    def expert_groups(self, cluster, batch: int) -> list[tuple[torch.Tensor | None, torch.Tensor]]:
        """A projected network's (rows, code) groups for a forward: cluster is one int for the whole batch
        (rows None), or one cluster per row ((B,) ints), grouped so each expert's weights are computed once."""
        if self.experts is None:
            raise ValueError("cluster= is for projected networks (ModelConfig.projected); this model is plain")
        if cluster is None:
            raise ValueError("a projected network runs its clusters' experts: give forward(..., cluster=) one int "
                             "or one per row, or instantiate() a plain model first")
        k = self.experts.shape[0]
        cluster = torch.as_tensor(cluster).reshape(-1)
        if cluster.numel() not in (1, batch):
            raise ValueError(f"{cluster.numel()} clusters for {batch} rows; give one int, or one per row")
        ids = cluster.unique().tolist()                                  # sorted; a host sync
        if ids[0] < 0 or ids[-1] >= k:
            raise ValueError(f"cluster {ids[0] if ids[0] < 0 else ids[-1]}: this network has clusters 0..{k - 1}")
        if len(ids) == 1:                                                # the whole batch runs one expert
            return [(None, self.experts[ids[0]])]
        cluster = cluster.to(self.experts.device)
        return [((cluster == c).nonzero().squeeze(1), self.experts[c]) for c in ids]

    def forward(self, idx, targets=None, loss_mask=None, positions=None, cache: KVCache | SlotCache | None = None,
                mask=None, reduction: str = "mean", logits_at: torch.Tensor | None = None, cluster=None):
        """idx (B, T) token ids. targets/loss_mask (B, T): loss only where loss_mask is true.

        positions (B, T) gives per-row positions (generation: each row at its own place); cache and
        mask are used by generate.py. Returns (logits, loss); logits_at (B,) or (B, K) asks for those
        positions of each row only (logits (B, 1, V) or (B, K, V)), else logits cover every position. cluster: a
        projected network's expert, one int or one per row (expert_groups); plain models take none.
        """
        B, T = idx.shape
        experts = None if (self.experts is None and cluster is None) else self.expert_groups(cluster, B)
        offset = cache.length if isinstance(cache, KVCache) and positions is None else 0
        x = self.wte(idx)
        if self.wpe is not None:
            pos = positions if positions is not None else torch.arange(offset, offset + T, device=idx.device)
            x = x + self.wpe(pos)
        rope = self._rope(positions, T, offset)
        for block in self.blocks:
            x = block(x, rope, cache, mask, experts)
        x = self.norm_f(x)
        if targets is None:
            if logits_at is not None:
                at = logits_at if logits_at.dim() == 2 else logits_at[:, None]
                x = x.gather(1, at[:, :, None].expand(B, at.shape[1], x.shape[-1]))
            return self.lm_head(x)[..., : self.cfg.vocab_size].float(), None
        # the padded rows (vocabulary rounded up to 128 for speed) are no tokens: keep them out of the softmax
        logits = self.lm_head(x)[..., : self.cfg.vocab_size].float()
        if loss_mask is not None:
            targets = targets.masked_fill(~loss_mask, -100)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100,
                               reduction=reduction)
        return logits, loss

    def params_per_token(self) -> int:
        """The (non-embedding) parameters one token's forward multiplies by: a projected network runs one
        expert's plain MLP, made from its basis tensors once per forward, so it counts as its plain model."""
        n = self.num_params()
        for mlp in self.modules():
            if isinstance(mlp, ProjectedMLP):
                n += sum(b[0].numel() for b in mlp.basis.values()) - sum(p.numel() for p in mlp.parameters())
        return n - (self.experts.numel() if self.experts is not None else 0)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (6N + attention), as in the PaLM appendix and nanoGPT's MFU."""
        cfg = self.cfg
        n = self.params_per_token()
        return 6 * n + 12 * cfg.n_layer * cfg.n_embd * seq_len


@torch.no_grad()
def instantiate(model: GPT, cluster: int | None = None, mixture=None) -> GPT:
    """A projected network's expert as a plain GPT of the base architecture, in closed form: attention,
    embeddings and norms copied, each block's MLP weights computed from the expert's code E[cluster], or for
    a mixture (one weight per cluster, e.g. a target's cluster histogram; normalised to sum 1) from the
    weighted code sum_i w_i E[i]. Its logits are those of `model` run with that expert."""
    if model.experts is None:
        raise ValueError("instantiate() takes a projected network (ModelConfig.projected); this model is plain")
    k = model.experts.shape[0]
    if (cluster is None) == (mixture is None):
        raise ValueError("give instantiate() one of cluster= and mixture=")
    if mixture is None:
        if not 0 <= int(cluster) < k:
            raise ValueError(f"cluster {cluster} is not one of this network's clusters 0..{k - 1}")
        code = model.experts[int(cluster)]
    else:
        w = torch.as_tensor(mixture, dtype=model.experts.dtype, device=model.experts.device).reshape(-1)
        if w.numel() != k or not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"mixture: give {k} finite weights, none negative, not all 0 (got {w.numel()})")
        code = (w / w.sum()) @ model.experts
    state = {name: t for name, t in model.state_dict().items()
             if name != "experts" and ".mlp." not in name}
    for i, block in enumerate(model.blocks):
        state.update({f"blocks.{i}.mlp.{name}": t for name, t in block.mlp.weights(code).items()})
    with torch.random.fork_rng(devices=[]):             # the plain model's random init is overwritten: draw from a copy
        plain = GPT(model.cfg.base())
    plain.load_state_dict(state, strict=True)
    return plain.to(device=model.experts.device, dtype=model.experts.dtype)
