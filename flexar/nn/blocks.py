"""Pre-norm transformer blocks shared by every tokenizer and generator.

- norms: RMSNorm (LLaMA) or LayerNorm;
- MLP: SwiGLU (Shazeer 2020, LLaMA) or GELU;
- optional AdaLN-zero conditioning (DiT, Peebles & Xie 2023): a condition vector (per sample or per token)
  regresses shift/scale/gate for both sub-layers, with the regression initialised to zero so that every block
  starts as the identity;
- attention through :func:`flexar.nn.attention` (any backend), optional rotary embeddings, optional QK-norm, and an
  optional :class:`~flexar.nn.KVCache` for incremental decoding.
"""
from __future__ import annotations

from torch import Tensor, nn
import torch.nn.functional as F

from .attention import Mask, attention
from .kv_cache import KVCache
from .rope import apply_rotary


def make_norm(kind: str, dim: int, affine: bool = True, eps: float = 1e-6) -> nn.Module:
    """RMSNorm or LayerNorm; eps 1e-6 by default (DiT, TiTok), 1e-5 in LlamaGen's GPT."""
    if kind == "rms":
        return nn.RMSNorm(dim, eps=eps, elementwise_affine=affine)
    if kind == "layer":
        return nn.LayerNorm(dim, eps=eps, elementwise_affine=affine)
    raise ValueError(f"unknown norm {kind!r}; expected 'rms' or 'layer'")


def swiglu_width(hidden_dim: int, multiple_of: int = 8) -> int:
    """2/3 of `hidden_dim` (LLaMA: the parameter count of a GELU MLP of that width) rounded up to `multiple_of`
    (8 here by default; LlamaGen and LLaMA round to 256)."""
    return max(multiple_of, -(-int(2 * hidden_dim / 3) // multiple_of) * multiple_of)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, multiple_of: int = 8):
        super().__init__()
        hidden = swiglu_width(hidden_dim, multiple_of)
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class GeluMLP(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.up = nn.Linear(dim, hidden_dim)
        self.down = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.gelu(self.up(x), approximate="tanh"))


class SelfAttention(nn.Module):
    """Multi-head self-attention. x: (B, L, C) -> (B, L, C)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False, backend: str = "auto"):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.backend = backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()

    def forward(
        self,
        x: Tensor,
        mask: Mask | Tensor | None = None,
        rope: tuple[Tensor, Tensor] | None = None,
        kv_cache: KVCache | None = None,
        layer_index: int = 0,
    ) -> Tensor:
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if kv_cache is not None:
            # the whole static buffer under the cache's mask: each row's prefix and new tokens, and `mask`
            mask = kv_cache.attention_mask(mask, length)
            k, v = kv_cache.update(layer_index, k, v)
        out = attention(q, k, v, mask=mask, backend=self.backend)
        return self.proj(out.transpose(1, 2).reshape(batch, length, dim))


class Block(nn.Module):
    """Pre-norm transformer block, with AdaLN-zero modulation when `cond_dim` is set.

    forward(x (B, L, C), cond (B, cond_dim) or (B, L, cond_dim) when conditioned) -> (B, L, C)
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        mlp: str = "swiglu",
        norm: str = "rms",
        cond_dim: int | None = None,
        qk_norm: bool = False,
        backend: str = "auto",
        norm_eps: float = 1e-6,
        mlp_multiple_of: int = 8,
    ):
        super().__init__()
        self.conditioned = cond_dim is not None
        self.norm1 = make_norm(norm, dim, affine=not self.conditioned, eps=norm_eps)
        self.norm2 = make_norm(norm, dim, affine=not self.conditioned, eps=norm_eps)
        self.attn = SelfAttention(dim, num_heads, qk_norm=qk_norm, backend=backend)
        hidden = int(dim * mlp_ratio)
        if mlp == "swiglu":
            self.mlp = SwiGLU(dim, hidden, mlp_multiple_of)
        elif mlp == "gelu":
            self.mlp = GeluMLP(dim, hidden)
        else:
            raise ValueError(f"unknown mlp {mlp!r}; expected 'swiglu' or 'gelu'")
        if self.conditioned:
            self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 6 * dim))
            nn.init.zeros_(self.modulation[1].weight)
            nn.init.zeros_(self.modulation[1].bias)

    def forward(
        self,
        x: Tensor,
        mask: Mask | Tensor | None = None,
        rope: tuple[Tensor, Tensor] | None = None,
        cond: Tensor | None = None,
        kv_cache: KVCache | None = None,
        layer_index: int = 0,
    ) -> Tensor:
        if not self.conditioned:
            x = x + self.attn(self.norm1(x), mask, rope, kv_cache, layer_index)
            return x + self.mlp(self.norm2(x))
        if cond is None:
            raise ValueError("this block was built with cond_dim and needs a condition")
        if cond.dim() == 2:
            cond = cond.unsqueeze(1)
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(cond).chunk(6, dim=-1)
        h = self.norm1(x) * (1 + scale1) + shift1
        x = x + gate1 * self.attn(h, mask, rope, kv_cache, layer_index)
        h = self.norm2(x) * (1 + scale2) + shift2
        return x + gate2 * self.mlp(h)


class Transformer(nn.Module):
    """A stack of :class:`Block` with a final norm. forward(x (B, L, C)) -> (B, L, C).

    With a KV cache the new tokens are written in every layer and the cache advances once at the end.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        mlp: str = "swiglu",
        norm: str = "rms",
        cond_dim: int | None = None,
        qk_norm: bool = False,
        backend: str = "auto",
        norm_eps: float = 1e-6,
        mlp_multiple_of: int = 8,
    ):
        super().__init__()
        self.dim, self.depth, self.num_heads = dim, depth, num_heads
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, mlp_ratio, mlp, norm, cond_dim, qk_norm, backend, norm_eps, mlp_multiple_of)
            for _ in range(depth)
        )
        self.final_norm = make_norm(norm, dim, affine=cond_dim is None, eps=norm_eps)
        if cond_dim is not None:
            self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * dim))
            nn.init.zeros_(self.final_modulation[1].weight)
            nn.init.zeros_(self.final_modulation[1].bias)

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def new_cache(self, batch_size: int, max_length: int, device=None, dtype=None) -> KVCache:
        parameter = next(self.parameters())
        return KVCache(
            self.depth,
            batch_size,
            self.num_heads,
            max_length,
            self.head_dim,
            device=device if device is not None else parameter.device,
            dtype=dtype if dtype is not None else parameter.dtype,
        )

    def forward(
        self,
        x: Tensor,
        mask: Mask | Tensor | None = None,
        rope: tuple[Tensor, Tensor] | None = None,
        cond: Tensor | None = None,
        kv_cache: KVCache | None = None,
        final_norm: bool = True,
    ) -> Tensor:
        for index, block in enumerate(self.blocks):
            x = block(x, mask, rope, cond, kv_cache, index)
        if kv_cache is not None:
            kv_cache.advance(x.shape[1])
        if not final_norm:
            return x
        x = self.final_norm(x)
        if cond is not None and hasattr(self, "final_modulation"):
            if cond.dim() == 2:
                cond = cond.unsqueeze(1)
            shift, scale = self.final_modulation(cond).chunk(2, dim=-1)
            x = x * (1 + scale) + shift
        return x
