"""`flexar.Pipeline`: a tokenizer and a generator that models its ids, saved and loaded together.

    pipe = Pipeline.from_pretrained("runs/demo/pipeline")
    images = pipe.generate([0, 1, 2], sampler=Sampler(top_k=50, cfg_scale=2.0), seed=0)  # uint8 (3, 3, H, W)
    images = pipe.generate([0, 1, 2], seed=0, output_type="pt")  # float in [0, 1], for torchvision's save_image

Layout: folder/tokenizer/{config.json, model.safetensors}, folder/generator/{...}, folder/pipeline.json.

Drafts: speculative decoding and LANTERN take their draft as a loaded module. ``Pipeline.from_pretrained(folder,
draft=DRAFT_FOLDER)`` loads one (a small generator or an EAGLE draft head, saved with ``save_pretrained``), checks
that it fits the generator and puts it on the pipeline's device as ``pipe.draft``::

    pipe = Pipeline.from_pretrained("runs/demo/pipeline", draft="runs/demo/draft")
    images = pipe.generate([0, 1, 2], sampler=SpeculativeDecoder(pipe.draft, Sampler(cfg_scale=2.0)), seed=0)

Continuous tokens: a flow generator (``XAR``, ``generator.continuous``) pairs with the VAE whose latent cache it was
trained on (``folder/tokenizer`` holds a :class:`flexar.tokenizers.VAE`); it samples with a
:class:`flexar.sampling.FlowSampler` (steps, CFG, SDE or ODE), any token sampler is refused by name, and its latents
are decoded with ``decode_latents``::

    pipe = Pipeline.from_pretrained("runs/xar/pipeline")
    images = pipe.generate([0, 1, 2], sampler=FlowSampler(steps=40, cfg_scale=2.0), seed=0)

Provenance: a generator trained on a token cache records the fingerprint of the tokenizer that wrote the cache
(``generator.provenance["tokenizer_fingerprint"]``, see :func:`flexar.hub.fingerprint`). A pipeline refuses a
tokenizer with another fingerprint, even one with the same vocabulary and length, whose ids mean different images:
``check_provenance=False`` pairs them anyway. A generator that records no tokenizer (saved before flexar recorded
provenance, or built in memory) is paired with a warning.
"""
from __future__ import annotations

import json
import operator
import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .hub import load_model, model_fingerprint
from .sampling.streams import ImageStreams

# per-batch counts of decoding strategies that add up over the batches of one call
SUMMED_STATS = ("draft_forward_passes", "rounds", "drafted", "accepted", "tokens_consumed", "row_passes")


PIPELINE_NAME = "pipeline.json"

# what `Pipeline.generate(output_type=...)` returns; the float forms follow diffusers' `output_type` ("pt", "np", "pil")
OUTPUT_TYPES = {
    "uint8": "uint8 tensor (B, 3, H, W) in [0, 255]",
    "pt": "float32 tensor (B, 3, H, W) in [0, 1], as torchvision.utils.save_image takes it",
    "np": "float32 numpy array (B, H, W, 3) in [0, 1]",
    "pil": "list of B RGB PIL images",
}


def as_int(value, name: str) -> int:
    """`value` as a Python int: ints, numpy integers and one-element integer tensors pass; bools, floats (even 2.0)
    and strings are refused by `name`."""
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        raise ValueError(f"{name} must be an int, got the bool {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an int, got {value!r} ({type(value).__name__})") from None


def as_labels(labels) -> torch.Tensor:
    """Class labels as a (B,) long tensor: a sequence of ints (numpy integers too), or a 1-D integer numpy array or
    tensor. Floats are never rounded to classes, and bools and nested (2-D) input are refused."""
    if isinstance(labels, np.ndarray):
        if labels.dtype.kind not in "iu":
            raise ValueError(f"labels must be integers, got a numpy array of dtype {labels.dtype}")
        labels = torch.from_numpy(labels.astype(np.int64))
    if isinstance(labels, torch.Tensor):
        if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
            raise ValueError(f"labels must be integers, got a tensor of dtype {labels.dtype}")
        if labels.dim() != 1:
            raise ValueError(f"labels must be one-dimensional (B,), got shape {tuple(labels.shape)}")
        return labels.long()
    if isinstance(labels, (str, bytes)) or not isinstance(labels, (list, tuple, range)):
        raise ValueError(f"labels must be a sequence of ints or a (B,) integer tensor, got {type(labels).__name__}")
    return torch.tensor([as_int(label, f"labels[{index}]") for index, label in enumerate(labels)], dtype=torch.long)


class Pipeline:
    """A tokenizer and the generator trained on its ids.

    Args:
        tokenizer: a :class:`flexar.tokenizers.Tokenizer`, or the folder of one (``save_pretrained``,
            ``flexar-export`` or ``flexar-convert``).
        generator: a :mod:`flexar.generators` model with the tokenizer's vocabulary, length and grid, or its folder.
        check_provenance: refuse a tokenizer whose fingerprint differs from the one the generator recorded
            (default). ``False`` skips the check, for a tokenizer known to give the same ids (for example the same
            weights saved with another config layout).
        draft: a draft model for speculative decoding and LANTERN, kept as ``self.draft``: a loaded module or the
            folder of one (see :meth:`load_draft`); None (default) for none.
    """

    def __init__(self, tokenizer, generator, check_provenance: bool = True, draft=None):
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = load_model(tokenizer)
        if isinstance(generator, (str, os.PathLike)):
            generator = load_model(generator)
        self.tokenizer = tokenizer.eval()
        self.generator = generator.eval()
        self.check_compatible()
        if check_provenance:
            self.check_provenance()
        self.draft = None if draft is None else self.load_draft(draft)

    def load_draft(self, draft) -> torch.nn.Module:
        """A draft for this pipeline's generator, in eval mode on the pipeline's device.

        draft: the folder of a draft saved with ``save_pretrained`` (read with :func:`flexar.hub.load_model`), or a
        loaded module: a generator with token-by-token decoding and this generator's vocabulary and classes, or an
        :class:`flexar.generators.EagleDraftHead` as wide as this generator. Anything else is refused by name.
        """
        from .generators import EagleDraftHead, Generator
        from .sampling.speculative import check_draft

        source = None
        if isinstance(draft, (str, os.PathLike)):
            source = os.fspath(draft)
            draft = load_model(draft)
        if source is not None and not isinstance(draft, (Generator, EagleDraftHead)):
            raise ValueError(f"draft folder {source} holds a {type(draft).__name__}, not a generator or an "
                             "EagleDraftHead: pass the folder of a draft model trained on the target's tokens")
        check_draft(draft, "Pipeline draft")
        where = f"draft folder {source}" if source is not None else f"draft {type(draft).__name__}"
        generator = self.generator
        if isinstance(draft, EagleDraftHead):
            width = getattr(generator, "dim", None)
            if width != draft.dim:
                raise ValueError(f"{where}: EAGLE head width {draft.dim} != generator width {width}")
        else:
            for field in ("vocab_size", "num_classes"):
                if getattr(draft, field) != getattr(generator, field):
                    raise ValueError(f"{where}: draft {field} {getattr(draft, field)} != generator {field} "
                                     f"{getattr(generator, field)}")
        return draft.to(self.device, self.dtype).eval()

    def check_compatible(self) -> None:
        """Refuse a generator that was trained on another tokenizer's vocabulary or token layout (a flow generator:
        on another latent shape, or paired with a tokenizer of ids)."""
        tokenizer, generator = self.tokenizer, self.generator
        if getattr(generator, "continuous", False):
            self.check_continuous()
            return
        if not hasattr(tokenizer, "codebook_size"):
            raise ValueError(f"{type(generator).__name__} generates token ids, but {type(tokenizer).__name__} has no "
                             "codebook (a continuous tokenizer): pair it with the tokenizer whose ids it was trained on")
        problems = []
        if generator.vocab_size != tokenizer.codebook_size:
            problems.append(f"generator vocab_size {generator.vocab_size} != tokenizer codebook_size {tokenizer.codebook_size}")
        if generator.max_tokens != tokenizer.max_tokens:
            problems.append(f"generator max_tokens {generator.max_tokens} != tokenizer max_tokens {tokenizer.max_tokens}")
        generator_grid = None if generator.grid is None else list(generator.grid)
        tokenizer_grid = None if tokenizer.grid is None else list(tokenizer.grid)
        if generator_grid != tokenizer_grid:
            problems.append(f"generator grid {generator_grid} != tokenizer grid {tokenizer_grid}")
        if problems:
            raise ValueError("tokenizer and generator do not match: " + "; ".join(problems))

    def check_continuous(self) -> None:
        """A flow generator (xAR) needs a continuous tokenizer (``decode_latents``) of its latent shape."""
        tokenizer, generator = self.tokenizer, self.generator
        if not callable(getattr(tokenizer, "decode_latents", None)):
            raise ValueError(f"{type(generator).__name__} generates continuous latents, but {type(tokenizer).__name__} "
                             "has no decode_latents: pair it with the VAE (flexar.tokenizers.VAE) whose latents it "
                             "was trained on")
        problems = [f"generator {field} {getattr(generator, field)} != tokenizer {field} {getattr(tokenizer, field, None)}"
                    for field in ("latent_channels", "latent_size")
                    if getattr(generator, field) != getattr(tokenizer, field, None)]
        if problems:
            raise ValueError("tokenizer and generator do not match: " + "; ".join(problems))

    @property
    def continuous(self) -> bool:
        """Whether the generator is a flow over continuous latents (then samplers are FlowSamplers)."""
        return bool(getattr(self.generator, "continuous", False))

    def check_provenance(self) -> None:
        """Refuse a tokenizer other than the one whose tokens the generator was trained on (by fingerprint)."""
        recorded = (getattr(self.generator, "provenance", None) or {}).get("tokenizer_fingerprint")
        if recorded is None:
            warnings.warn(
                f"{type(self.generator).__name__} records no tokenizer fingerprint (saved before flexar recorded "
                "provenance, or not trained on a token cache): cannot check that it was trained on this tokenizer's "
                "ids", stacklevel=3,
            )
            return
        # a loaded tokenizer carries the fingerprint of its folder; an in-memory one is hashed as it would be saved
        actual = getattr(self.tokenizer, "fingerprint", None) or model_fingerprint(self.tokenizer)
        if actual != recorded:
            raise ValueError(
                f"the generator was trained on the ids of tokenizer {recorded[:12]}..., but this "
                f"{type(self.tokenizer).__name__} is {actual[:12]}... (fingerprints of config.json + model.safetensors): "
                "its ids mean other images. Pair the generator with the tokenizer that wrote its token cache, or pass "
                "check_provenance=False if you know the two give the same ids"
            )

    # -- persistence ---------------------------------------------------------------------------------------------------
    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write folder/tokenizer, folder/generator (its config keeps the generator's provenance) and pipeline.json."""
        folder = Path(folder)
        self.tokenizer.save_pretrained(folder / "tokenizer")
        self.generator.save_pretrained(folder / "generator")
        (folder / PIPELINE_NAME).write_text(json.dumps({"tokenizer": "tokenizer", "generator": "generator"}, indent=2))
        return folder

    @staticmethod
    def read_layout(folder: str | os.PathLike) -> dict[str, Path]:
        """The sub-folders named by folder/pipeline.json, checked: {"tokenizer": Path, "generator": Path}."""
        folder = Path(folder)
        path = folder / PIPELINE_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{folder} has no {PIPELINE_NAME}: not a folder written by Pipeline.save_pretrained")
        try:
            layout = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from None
        if not isinstance(layout, dict):
            raise ValueError(f"{path} must hold an object with fields 'tokenizer' and 'generator', "
                             f"got {type(layout).__name__}")
        folders = {}
        for field in ("tokenizer", "generator"):
            if field not in layout:
                raise ValueError(f"{path} lacks the field {field!r} (the {field} sub-folder)")
            name = layout[field]
            if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
                raise ValueError(f"{path}: field {field!r} must name a sub-folder of {folder}, got {json.dumps(name)}")
            if not (folder / name).is_dir():
                raise FileNotFoundError(f"{path}: field {field!r} names {name!r}, but {folder / name} does not exist")
            folders[field] = folder / name
        return folders

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, device: str | torch.device = "cpu",
                        check_provenance: bool = True, draft=None, dtype: torch.dtype | None = None) -> "Pipeline":
        """Load a folder written by :meth:`save_pretrained`; ``check_provenance`` as in the constructor.

        ``draft``: the folder of a draft model (or a loaded one) for speculative decoding and LANTERN, loaded on
        ``device`` and checked against the generator (:meth:`load_draft`); it becomes ``pipeline.draft``.
        ``dtype``: the floating-point precision of every model (``torch.bfloat16``, ``torch.float16``); None keeps the
        saved float32. Sampling arithmetic (CFG, temperature, softmax, flow steps) stays float32 whatever it is.
        """
        from .generators import Generator
        from .tokenizers import Tokenizer

        from .tokenizers import VAE

        folders = cls.read_layout(folder)
        generator = load_model(folders["generator"], kind=Generator).to(device)
        # a flow generator decodes through a continuous tokenizer, every other one through a tokenizer of ids
        tokenizer = load_model(folders["tokenizer"], kind=VAE if generator.continuous else Tokenizer).to(device)
        pipeline = cls(tokenizer, generator, check_provenance=check_provenance, draft=draft)
        return pipeline if dtype is None else pipeline.to(dtype)

    def to(self, *args, **kwargs) -> "Pipeline":
        """Move every model, as ``torch.nn.Module.to``: a device, a floating-point dtype, or both
        (``pipe.to("cuda", torch.bfloat16)``). Integer buffers (ids, counters) keep their dtype."""
        dtype = kwargs.get("dtype", next((arg for arg in args if isinstance(arg, torch.dtype)), None))
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"a pipeline's precision must be a floating-point dtype (torch.bfloat16, torch.float16, "
                             f"torch.float32), got {dtype}")
        self.tokenizer.to(*args, **kwargs)
        self.generator.to(*args, **kwargs)
        if self.draft is not None:
            self.draft.to(*args, **kwargs)
        return self

    def compile(self, enabled: bool = True) -> "Pipeline":
        """Compile the decoding steps of the generator and of the draft (``torch.compile``; CUDA graphs on CUDA):
        every later :meth:`generate` decodes through them. The first call of each shape compiles (seconds).
        A generator without a compiled decoding step is refused by name; ``enabled=False`` returns to eager."""
        self.generator.compile_decoding(enabled)
        if self.draft is not None and hasattr(self.draft, "compile_decoding"):
            self.draft.compile_decoding(enabled)
        return self

    @property
    def dtype(self) -> torch.dtype:
        """The generator's floating-point precision."""
        return next(p.dtype for p in self.generator.parameters() if p.is_floating_point())

    @property
    def device(self) -> torch.device:
        return next(self.generator.parameters()).device

    @property
    def num_classes(self) -> int:
        return self.generator.num_classes

    # -- generation ----------------------------------------------------------------------------------------------------
    @staticmethod
    def to_output(decoded: torch.Tensor, output_type: str) -> torch.Tensor:
        """Decoded images (B, C, H, W) in [-1, 1] -> (B, 3, H, W) on the CPU: float in [0, 1] for ``"pt"`` and
        ``"np"``, else uint8 (grayscale repeated to three channels)."""
        from .utils import to_uint8

        if decoded.shape[1] == 1:
            decoded = decoded.repeat(1, 3, 1, 1)
        if output_type in ("pt", "np"):
            return ((decoded.detach().float().clamp(-1, 1) + 1) / 2).cpu()
        return to_uint8(decoded).cpu()

    @torch.no_grad()
    def generate(
        self,
        labels,
        num_tokens: int | None = None,
        sampler=None,
        seed: int = 0,
        batch_size: int = 64,
        return_stats: bool = False,
        progress: bool | None = None,
        use_cache: bool = True,
        output_type: str = "uint8",
        compile: bool = False,
    ):
        """Sample images for `labels` (a sequence of ints or a (B,) integer tensor or array; see :func:`as_labels`).

        ``num_tokens``, ``seed`` and ``batch_size`` (>= 1) take ints or numpy integers; anything else is refused.

        Returns the images in the form ``output_type`` names (grayscale tokenizers are repeated to 3 channels):

        - ``"uint8"`` (default): uint8 tensor (B, 3, H, W), ``round(255 * x)`` of the ``"pt"`` values;
        - ``"pt"``: float32 tensor (B, 3, H, W) in [0, 1], the decoded [-1, 1] images mapped by ``(x + 1) / 2``
          without rounding, so ``torchvision.utils.save_image(images, path)`` writes them as they are;
        - ``"np"``: the same values as a float32 numpy array (B, H, W, 3), channels last (diffusers' ``"np"``);
        - ``"pil"``: a list of B RGB ``PIL.Image.Image`` built from the uint8 values.

        With `return_stats=True` it also returns a dict with forward passes, tokens and seconds summed over batches,
        the strategy's counts in ``SUMMED_STATS`` (draft passes, rounds, drafted and accepted tokens, tokens
        consumed, label rows over the passes) where it reports them, and ``lengths``, the token count of every image
        (a list of B ints).

        Adaptive lengths: a generator with an end-of-sequence token (trained on KARL or ALIT tokens) chooses how many
        tokens each image gets; the tokenizer decodes each image from exactly those (``decode(ids, lengths)``), and
        ``num_tokens`` caps them. Every other generator gives ``num_tokens`` (default ``max_tokens``) to each image.
        The same seed gives the same images whatever ``batch_size``: image i draws from its own random stream, keyed
        by (seed, i) (:class:`flexar.sampling.streams.ImageStreams`), in the generator and in a sampling decoder.
        This holds for every sampler and strategy whose rows advance in lockstep; speculative decoding and LANTERN
        advance each row by its own accepted drafts, but a round drafts no more tokens than the batch's shortest
        remaining row needs, so their images still depend on the batch composition.

        ``compile=True`` runs the decoding steps compiled (:meth:`compile`) from this call on.
        """
        from .sampling import Sampler

        if not isinstance(output_type, str) or output_type not in OUTPUT_TYPES:
            allowed = "; ".join(f"{json.dumps(name)}: {meaning}" for name, meaning in OUTPUT_TYPES.items())
            raise ValueError(f"output_type must be one of {allowed}; got {output_type!r}")
        labels = self.generator.check_labels(as_labels(labels).to(self.device))
        if self.continuous:
            from .sampling.flow import check_flow_sampler

            sampler = check_flow_sampler(sampler, f"this pipeline's {type(self.generator).__name__}")
            if num_tokens is not None:
                raise ValueError(f"num_tokens must be None for {type(self.generator).__name__}: a flow generator "
                                 f"generates whole latents, got {num_tokens!r}")
        elif num_tokens is not None:
            num_tokens = self.tokenizer.check_num_tokens(as_int(num_tokens, "num_tokens"))
        seed = as_int(seed, "seed")
        batch_size = as_int(batch_size, "batch_size")
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size}")
        if compile:
            self.compile()
        sampler = sampler if sampler is not None else Sampler()  # a flow generator's FlowSampler is checked above
        if hasattr(sampler, "prepare"):  # decoding strategies read what they need (token geometry, a draft model)
            sampler.prepare(self)
        chunks = labels.split(batch_size)
        show = progress if progress is not None else len(chunks) > 1
        stats = {"forward_passes": 0, "tokens": 0, "seconds": 0.0, "decode_seconds": 0.0}
        images, lengths = [], []
        first = 0
        for chunk in tqdm(chunks, desc="generate", disable=not show):
            indices = torch.arange(first, first + chunk.shape[0])
            first += chunk.shape[0]
            streams = ImageStreams(seed, indices, self.device)
            out = self.generator.generate_with(chunk, sampler, generator=streams, num_tokens=num_tokens,
                                               use_cache=use_cache)
            for key in ("forward_passes", "tokens", "seconds"):
                stats[key] += out.stats[key]
            for key in SUMMED_STATS:  # counts a decoding strategy reports, where it reports them
                if key in out.stats:
                    stats[key] = stats.get(key, 0) + out.stats[key]
            start = time.perf_counter()
            lengths.append(out.lengths.cpu())
            if out.latents is not None:  # a flow generator: continuous latents for the VAE's decoder
                decoded = self.tokenizer.decode_latents(out.latents)
                stats["decode_seconds"] += time.perf_counter() - start
                images.append(self.to_output(decoded, output_type))
                continue
            # lengths the generator chose (an end-of-sequence token) reach the tokenizer; full rows decode as before
            chosen = {} if bool((out.lengths == out.ids.shape[1]).all()) else {"lengths": out.lengths}
            if getattr(self.tokenizer, "decode_draws", False):  # a second stream per image, apart from the generator's
                decoded = self.tokenizer.decode(out.ids, generator=ImageStreams(seed, indices, self.device).split(1),
                                                **chosen)
            else:
                decoded = self.tokenizer.decode(out.ids, **chosen)
            stats["decode_seconds"] += time.perf_counter() - start
            images.append(self.to_output(decoded, output_type))
        images = torch.cat(images)
        stats["lengths"] = torch.cat(lengths).tolist()
        if output_type == "np":
            images = images.permute(0, 2, 3, 1).contiguous().numpy()
        elif output_type == "pil":
            from PIL import Image

            images = [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in images]
        return (images, stats) if return_stats else images
