"""EAGLE-style draft head for speculative decoding (Li et al., "EAGLE: Speculative Sampling Requires Rethinking
Feature Uncertainty", ICML 2024; the drafter LANTERN trains for LlamaGen, jadohu/LANTERN models/drafters).

The head autoregresses on the target's features rather than on tokens. Pair k = (token t_k, feature h_k), where h_k is
the frozen target's final hidden state (after its final norm) at the position that predicted t_k; the head maps
``fc([embed(t_k); h_k])`` through one causal transformer layer to a prediction of h_{k+1}, and the target's own output
head turns that into logits for t_{k+1}. The token embedding and the output head are the target's (shared, frozen);
the head owns ``fc``, one transformer block with 1D rotary positions (pair index) and a final RMSNorm.

Training (``training_loss``, through the Lightning CLI's ``GeneratorModule`` on a token cache): the frozen target runs
teacher-forced over the cached ids; the loss is ``SmoothL1(h^_{k+1}, h_{k+1}) + token_weight * CE(p_{k+1}, p^_{k+1})``
with ``p`` the target's next-token distribution from the true feature (soft labels) and ``p^`` the head's. Labels are
replaced by the null class with probability ``class_dropout`` so the head also drafts the unconditional rows of CFG.

Differences from EAGLE / LANTERN:

- a final RMSNorm on the predicted feature (EAGLE regresses the decoder layer's output directly); the target's
  features are post-norm, and the norm keeps the prediction on their scale from the first step.
- no uniform noise on the input features during training (EAGLE adds U(-0.1, 0.1)); ``feature_noise`` restores it.
- the frozen target is read from a folder (``target``) and is part of the saved weights; the saved config records
  the target's own config (``target_config``: class and keyword arguments) in place of the folder, so a saved head
  reloads from its own folder on any machine. At decoding time the head drafts for whichever target it is given
  (the pipeline's generator), whose embedding and output head it uses.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..hub import Configurable, PretrainedMixin, register
from ..nn import KVCache, RotaryEmbedding, Transformer, causal_mask
from ..utils import IGNORE_INDEX
from .base import compile_step


@register
class EagleDraftHead(Configurable, PretrainedMixin, nn.Module):
    """One-layer feature-level draft head over a frozen target generator.

    Args:
        target: folder of the frozen target generator (``save_pretrained``); needed for training, optional for
            decoding when ``dim`` is given.
        target_config: the target's ``{"class", "kwargs"}`` instead of its folder, as a saved head records it (the
            target is built untrained; its weights come from the head's own weights file).
        dim: feature width; defaults to the target's ``dim``.
        num_heads: attention heads of the draft layer.
        mlp_ratio: MLP width of the draft layer relative to ``dim``.
        max_length: pairs the KV cache holds; defaults to the target's ``max_tokens``.
        token_weight: weight of the distillation cross-entropy (EAGLE: 0.1).
        class_dropout: probability of training on the null class (serves CFG's unconditional rows).
        feature_noise: half-width of the uniform noise added to input features in training (EAGLE: 0.1; off).

    Shapes: ``forward(ids (R, n), features (R, n, dim), token_embed, kv_cache) -> predicted features (R, n, dim)``.
    """

    # what speculative decoding reads to draft with this head over the target's features instead of through a
    # generator's own decoding hooks
    drafts_from_features: bool = True

    def __init__(
        self,
        target: str | None = None,
        target_config: dict | None = None,
        dim: int | None = None,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        max_length: int | None = None,
        token_weight: float = 0.1,
        class_dropout: float = 0.1,
        feature_noise: float = 0.0,
        rope_base: float = 10000.0,
    ):
        super().__init__()
        self.target = None
        if target is not None and target_config is not None:
            raise ValueError(f"EagleDraftHead takes a target folder or a target_config, not both; got target={target!r}")
        if target is not None or target_config is not None:
            from ..hub import build_from_config, load_model
            from .base import Generator

            if target is not None:
                self.target = load_model(target, kind=Generator)
            else:
                self.target = build_from_config(target_config, kind=Generator, source="target_config")
            self.target.eval().requires_grad_(False)
            dim = dim or self.target.dim
            max_length = max_length or self.target.max_tokens
        if dim is None or max_length is None:
            raise ValueError("EagleDraftHead needs a target folder, or dim and max_length")
        self.dim, self.max_length = dim, max_length
        self.token_weight, self.class_dropout, self.feature_noise = token_weight, class_dropout, feature_noise
        self.fc = nn.Linear(2 * dim, dim)
        self.layer = Transformer(dim, 1, num_heads, mlp_ratio, mlp="swiglu", norm="rms")
        self.rope = RotaryEmbedding(dim // num_heads, base=rope_base)
        self.mask = causal_mask()

    def _saved_config(self, config: dict) -> dict:
        """Record the target's config instead of the folder it was read from: the saved folder alone rebuilds the
        head (the target's weights are part of the head's)."""
        config = dict(config)
        if self.target is not None:
            config["target"] = None
            config["target_config"] = {"class": type(self.target).__name__, "kwargs": self.target.config}
        return config

    # attributes the training module checks against the token cache
    @property
    def vocab_size(self) -> int:
        return self._require_target().vocab_size

    @property
    def max_tokens(self) -> int:
        return self._require_target().max_tokens

    @property
    def num_classes(self) -> int:
        return self._require_target().num_classes

    def _require_target(self):
        if self.target is None:
            raise ValueError("this EagleDraftHead was built without a target folder")
        return self.target

    def train(self, mode: bool = True):
        super().train(mode)
        if self.target is not None:
            self.target.eval()  # frozen: no class dropout inside the target
        return self

    def new_cache(self, batch_size: int, max_length: int | None = None) -> KVCache:
        return self.layer.new_cache(batch_size, self.max_length if max_length is None else max_length)

    def compile_decoding(self, enabled: bool = True, mode: str | None = None,
                         backend: str = "inductor") -> "EagleDraftHead":
        """Draft through a ``torch.compile``-d forward (as :meth:`flexar.generators.Generator.compile_decoding`);
        ``enabled=False`` returns to eager. Returns the head."""
        if not enabled:
            self.__dict__.pop("_compiled_forward", None)
            return self
        self.__dict__["_compiled_forward"] = compile_step(self.forward, next(self.parameters()).device, mode, backend)
        return self

    def draft_features(self, ids: Tensor, features: Tensor, token_embed: nn.Embedding, kv_cache: KVCache) -> Tensor:
        """:meth:`forward` through the KV cache, compiled after :meth:`compile_decoding`."""
        network = self.__dict__.get("_compiled_forward") or self.forward
        return network(ids, features, token_embed, kv_cache)

    def forward(self, ids: Tensor, features: Tensor, token_embed: nn.Embedding, kv_cache: KVCache | None = None) -> Tensor:
        """Predict the next feature of every pair. ids (R, n), features (R, n, dim) -> (R, n, dim)."""
        length = ids.shape[1]
        x = self.fc(torch.cat([token_embed(ids), features.to(self.fc.weight.dtype)], dim=-1))
        positions = None if kv_cache is None else kv_cache.step_positions(length, prefix=False)  # (R, n) per row
        if positions is None:
            start = 0 if kv_cache is None else kv_cache.length
            positions = torch.arange(start, start + length, device=ids.device)
        mask = None if length == 1 else self.mask
        return self.layer(x, mask=mask, rope=self.rope(positions), kv_cache=kv_cache)

    def training_loss(self, ids: Tensor, labels: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, dict]:
        """Feature regression + distillation on teacher-forced target features. ids (B, L), labels (B,)."""
        target = self._require_target()
        labels = target.check_labels(labels)
        lengths = target.check_ids(ids, lengths)
        if ids.shape[1] < 2:
            raise ValueError("an EAGLE head trains on sequences of at least 2 tokens")
        if self.training and self.class_dropout > 0:
            drop = torch.rand(labels.shape, device=labels.device) < self.class_dropout
            labels = labels.masked_fill(drop, target.null_class)
        with torch.no_grad():
            target_logits, hidden = target(ids[:, :-1], labels, return_hidden=True)  # index k predicts t_k
        features = hidden[:, :-1]
        if self.training and self.feature_noise > 0:
            features = features + (torch.rand_like(features) * 2 - 1) * self.feature_noise
        predicted = self.forward(ids[:, :-1], features, target.token_embed)  # pair k -> h_{k+1}
        valid = (torch.arange(1, ids.shape[1], device=ids.device)[None, :] < lengths[:, None]).float()
        feature_loss = (F.smooth_l1_loss(predicted, hidden[:, 1:], reduction="none").mean(-1) * valid).sum() / valid.sum()
        draft_log_probs = F.log_softmax(target.head(predicted).float(), dim=-1)
        teacher = F.softmax(target_logits[:, 1:].float(), dim=-1)
        token_loss = (-(teacher * draft_log_probs).sum(-1) * valid).sum() / valid.sum()
        loss = feature_loss + self.token_weight * token_loss
        with torch.no_grad():
            agree = ((draft_log_probs.argmax(-1) == teacher.argmax(-1)).float() * valid).sum() / valid.sum()
        return loss, {"loss": loss.detach(), "feature_loss": feature_loss.detach(), "token_loss": token_loss.detach(),
                      "top1_agreement": agree}
