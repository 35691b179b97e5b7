"""FID and KID of generated images against a reference set, computed by torch-fidelity.

- FID: Heusel et al., 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium".
  The Frechet distance between Gaussians fitted to the two sets' features,
  ``|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))``.
- KID: Binkowski et al., 2018, "Demystifying MMD GANs": the unbiased squared MMD with the cubic polynomial kernel,
  averaged over random subsets (mean and standard deviation over subsets).
- Computation: torch-fidelity (Obukhov et al., 2020), with either its ``inception-v3-compat`` extractor (the
  TensorFlow FID Inception weights, matching the reference TensorFlow implementation) or a flexar classifier saved by
  ``flexar.eval.classifier.DigitClassifier.save_pretrained`` (``"classifier:PATH"``), the usual choice for small
  grayscale sets such as digits and MNIST.

Images are uint8 (N, 3, H, W) or (N, 1, H, W) tensors, or Datasets yielding such images one at a time; float images
are read with flexar's [-1, 1] convention and quantised to uint8 first, so every set is scored from the same 8-bit
pixels a saved PNG would hold.

``frechet_distance`` recomputes FID from feature statistics with scipy's matrix square root instead of
torch-fidelity's eigenvalue route, so the two can check each other.

Feature extractors are loaded once, before any image is scored (:func:`load_extractor`, which ``compute_metrics``
calls for an extractor given by name): torch-fidelity 0.4 reads Inception weights with ``torch.load(...,
weights_only=False)``, which runs whatever code a pickle carries, and reads the file again every time it builds the
network. flexar reads the file (or torch-hub's cached download) once with the restricted ``weights_only=True``
loader, builds the network from those tensors to check them, and hands torch-fidelity an in-memory serialisation of
the same tensors in place of the path. The file is never opened again, so a file swapped after the check cannot
run code. The default weights are torch-fidelity's own (``URL_INCEPTION_V3``), downloaded once into torch-hub's
cache with their sha256 prefix checked.

FID of fewer images than feature dimensions is biased: the covariance of n images has rank at most n - 1, so with
n <= D it is singular. Such sets are scored with a :class:`SmallSetWarning`.
"""

from __future__ import annotations

import contextlib
import io
import numbers
import os
import warnings
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import torch
import torch_fidelity
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.metric_fid import KEY_METRIC_FID
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

from flexar.eval.classifier import CLASSIFIER_EXTRACTOR, DigitClassifier, register_classifier_extractor
from flexar.utils import to_uint8

INCEPTION_EXTRACTOR = "inception-v3-compat"
INCEPTION_FEATURE_DIM = 2048  # pool3, the layer FID reads
CLASSIFIER_PREFIX = "classifier:"
# torch-fidelity's default; smaller sets use every sample in each subset.
KID_SUBSET_SIZE = 1000


def _checked_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 (..., C, H, W) passes through; float is read as [-1, 1] and quantised like a saved image would be."""
    if images.dtype == torch.uint8:
        return images
    if not torch.is_floating_point(images):
        raise TypeError(f"images must be uint8, or float in [-1, 1]; got {images.dtype}")
    if images.numel() and (images.min() < -1.0 - 1e-3 or images.max() > 1.0 + 1e-3):
        raise ValueError(
            f"float images must lie in [-1, 1] (flexar's convention), got [{images.min():.3f}, {images.max():.3f}]"
        )
    return to_uint8(images)


def _to_rgb(image: torch.Tensor) -> torch.Tensor:
    """(C, H, W) with C in {1, 3} -> (3, H, W); grey images are repeated, as torch-fidelity expects RGB."""
    if image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"each image must be (1, H, W) or (3, H, W), got {tuple(image.shape)}")
    return image.expand(3, -1, -1).contiguous() if image.shape[0] == 1 else image


class Uint8Images(Dataset):
    """The Dataset torch-fidelity reads: item i is a uint8 (3, H, W) tensor.

    ``source`` is a tensor (N, C, H, W) with C in {1, 3}, or a Dataset whose items are such (C, H, W) images or
    tuples whose first element is one (as in ``(image, label)``).
    """

    def __init__(self, source: torch.Tensor | Dataset) -> None:
        if torch.is_tensor(source):
            if source.dim() != 4 or source.shape[1] not in (1, 3):
                raise ValueError(f"images must be (N, 1, H, W) or (N, 3, H, W), got {tuple(source.shape)}")
            source = _checked_uint8(source.detach().cpu())
        elif not isinstance(source, Dataset) or not hasattr(source, "__len__"):
            raise TypeError(f"images must be a tensor or a sized torch Dataset, got {type(source).__name__}")
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> torch.Tensor:
        item = self.source[index]
        if isinstance(item, (tuple, list)):
            item = item[0]
        if not torch.is_tensor(item):
            raise TypeError(f"dataset items must be image tensors or (image, ...) tuples, got {type(item).__name__}")
        return _to_rgb(_checked_uint8(item.detach().cpu()))


class SmallSetWarning(UserWarning):
    """A set has no more images than the extractor has feature dimensions: its covariance is singular."""


@dataclass(frozen=True)
class FeatureExtractor:
    """A checked feature extractor, loaded once (see the module docstring); made by :func:`load_extractor`.

    ``spec``: flexar's name (``"inception"`` or ``"classifier:PATH"``); ``name``: torch-fidelity's registry name;
    ``feature_dim``: D of the FID features; ``source``: where the weights were read from; ``payload``: the Inception
    tensors serialised in memory (bytes) or the classifier folder (str).
    """

    spec: str
    name: str
    feature_dim: int
    source: str
    payload: bytes | str

    def weights_argument(self) -> io.BytesIO | str:
        """What torch-fidelity's ``feature_extractor_weights_path`` receives: a fresh in-memory file of the checked
        Inception tensors (never the path on disk), or the classifier folder."""
        return io.BytesIO(self.payload) if isinstance(self.payload, bytes) else self.payload


def load_extractor(extractor: str, inception_weights: str | os.PathLike | None = None) -> FeatureExtractor:
    """Check and load a feature extractor once: ``"inception"`` (weights from ``inception_weights``, a state dict
    saved by ``torch.save``, or torch-fidelity's download) or ``"classifier:PATH"`` (a saved flexar classifier).

    Raises ValueError for an unknown name or weights that do not fit the network, FileNotFoundError for a missing
    file or folder, and RuntimeError when the default Inception weights are neither cached nor downloadable.
    """
    if extractor == "inception":
        state, source = _inception_state(inception_weights)
        buffer = io.BytesIO()
        torch.save(state, buffer)
        checked = FeatureExtractor(extractor, INCEPTION_EXTRACTOR, INCEPTION_FEATURE_DIM, source, buffer.getvalue())
        try:
            # build torch-fidelity's network from these tensors now, so that wrong weights fail before any sampling
            create_feature_extractor(INCEPTION_EXTRACTOR, [str(INCEPTION_FEATURE_DIM)], cuda=False, verbose=False,
                                     feature_extractor_weights_path=checked.weights_argument())
        except Exception as error:
            message = f"{source} does not hold torch-fidelity's {INCEPTION_EXTRACTOR} weights: {error}"
            raise ValueError(message) from error
        return checked
    if isinstance(extractor, str) and extractor.startswith(CLASSIFIER_PREFIX):
        if inception_weights is not None:
            raise ValueError("inception_weights only applies to extractor='inception'")
        folder = extractor[len(CLASSIFIER_PREFIX) :]
        if not folder:
            raise ValueError("extractor 'classifier:PATH' needs the folder of a saved flexar classifier")
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"classifier folder {folder!r} does not exist")
        # safetensors and a checked JSON config: loading it here cannot run code, and a bad folder fails now
        classifier = DigitClassifier.from_pretrained(folder)
        register_classifier_extractor()
        return FeatureExtractor(extractor, CLASSIFIER_EXTRACTOR, classifier.feature_dim, folder, folder)
    raise ValueError(f"unknown extractor {extractor!r}: use 'inception' or 'classifier:PATH'")


def _inception_state(path: str | os.PathLike | None) -> tuple[dict, str]:
    """Inception weights read once with ``weights_only=True``: from ``path``, or torch-fidelity's download (cached
    by torch-hub, sha256 prefix checked). Returns the state dict and where it came from."""
    if path is None:
        try:
            state = torch.hub.load_state_dict_from_url(URL_INCEPTION_V3, map_location="cpu", progress=False,
                                                       check_hash=True, weights_only=True)  # fmt: skip
        except OSError as error:  # URLError and connection errors: offline, or the host is unreachable
            cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(URL_INCEPTION_V3))
            raise RuntimeError(
                f"the Inception weights for FID are not cached ({cached}) and could not be downloaded from "
                f"{URL_INCEPTION_V3} ({error}). Offline, pass a local copy of that file: inception_weights=PATH "
                "(scripts/eval_fid.py --inception-weights PATH), or score with a flexar classifier's features: "
                "extractor='classifier:PATH' (--extractor classifier:PATH)"
            ) from error
        except Exception as error:  # a failed hash check, or a cached file that is not a plain state dict
            cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(URL_INCEPTION_V3))
            message = f"could not read the Inception weights of {URL_INCEPTION_V3} (cache {cached}): {error}"
            raise ValueError(message) from error
        source = URL_INCEPTION_V3
    else:
        source = os.fspath(path)
        if not os.path.isfile(source):
            raise FileNotFoundError(f"Inception weights file {source!r} does not exist")
        try:
            state = torch.load(source, map_location="cpu", weights_only=True)
        except Exception as error:
            raise ValueError(f"{source!r} is not a plain PyTorch state dict of Inception weights: {error}") from error
    if not isinstance(state, dict) or not all(torch.is_tensor(value) for value in state.values()):
        raise ValueError(f"{source!r} does not hold a state dict (a mapping from names to tensors)")
    return state, source


def warn_small_sets(num_samples: int, num_reference: int, extractor: FeatureExtractor) -> None:
    """Warn (:class:`SmallSetWarning`) when a set has no more images than the extractor has feature dimensions."""
    small = {name: count for name, count in (("samples", num_samples), ("reference images", num_reference))
             if count <= extractor.feature_dim}  # fmt: skip
    if small:
        counts = " and ".join(f"{count} {name}" for name, count in small.items())
        warnings.warn(
            f"FID with {counts} for {extractor.feature_dim}-dimensional {extractor.spec} features: the covariance of "
            f"n images has rank at most n - 1, so it is singular and FID is biased; use more than "
            f"{extractor.feature_dim} images per set, or an extractor with fewer features",
            SmallSetWarning,
            stacklevel=3,
        )


def _prepared(extractor: str | FeatureExtractor, inception_weights) -> FeatureExtractor:
    if isinstance(extractor, FeatureExtractor):
        if inception_weights is not None:
            raise ValueError("inception_weights only applies when the extractor is given by name")
        return extractor
    return load_extractor(extractor, inception_weights)


def extract_features(
    images: torch.Tensor | Dataset,
    extractor: str | FeatureExtractor = "inception",
    inception_weights: str | None = None,
    batch_size: int = 64,
    device: str = "cpu",
) -> torch.Tensor:
    """Features torch-fidelity's FID would use for ``images``: (N, D) float32 on CPU.

    D is 2048 for ``"inception"`` (pool3) and the classifier's ``feature_dim`` for ``"classifier:PATH"``;
    ``extractor`` may also be a :class:`FeatureExtractor` from :func:`load_extractor`.
    """
    cuda = _is_cuda(device)
    extractor = _prepared(extractor, inception_weights)
    dataset = Uint8Images(images)
    layer = FEATURE_EXTRACTORS_REGISTRY[extractor.name].get_default_feature_layer_for_metric("fid")
    with _device_scope(device):
        network = create_feature_extractor(
            extractor.name, [layer], cuda=cuda, feature_extractor_weights_path=extractor.weights_argument(),
            verbose=False,
        )
        features = get_featuresdict_from_dataset(dataset, network, batch_size, cuda, True, False)
    return features[layer]


def gaussian_statistics(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D), in float64, of features (N, D)."""
    if torch.is_tensor(features):
        features = features.detach().cpu().numpy()
    features = np.asarray(features, dtype=np.float64)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al., 2017); means (D,), covariances (D, D).

    ``|mu1 - mu2|^2 + Tr(sigma1) + Tr(sigma2) - 2 Tr((sigma1 sigma2)^(1/2))``, the square root by scipy's Schur
    method. If it is not finite (singular product), ``eps`` is added to both diagonals, as pytorch-fid does.
    """
    mu1, mu2 = (np.atleast_1d(np.asarray(mu, dtype=np.float64)) for mu in (mu1, mu2))
    sigma1, sigma2 = (np.atleast_2d(np.asarray(sigma, dtype=np.float64)) for sigma in (sigma1, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0],) * 2:
        raise ValueError(f"shape mismatch: mu {mu1.shape} {mu2.shape}, sigma {sigma1.shape} {sigma2.shape}")
    difference = mu1 - mu2
    covariance_root = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covariance_root).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covariance_root = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    # Imaginary parts come from round-off on near-singular products; for a real matrix they cancel in the trace.
    trace_root = float(np.real(np.trace(covariance_root)))
    return float(difference @ difference + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_root)


def compute_metrics(
    samples: torch.Tensor | Dataset,
    reference: torch.Tensor | Dataset,
    extractor: str | FeatureExtractor = "inception",
    inception_weights: str | None = None,
    kid: bool = True,
    batch_size: int = 64,
    device: str = "cpu",
    kid_subset_size: int | None = None,
) -> dict:
    """FID (and KID) of ``samples`` against ``reference`` with torch-fidelity.

    Args:
        samples, reference: uint8 images (N, 3, H, W) or (N, 1, H, W), or Datasets of such (C, H, W) images.
        extractor: ``"inception"`` (torch-fidelity's ``inception-v3-compat``), ``"classifier:PATH"`` (a folder
            written by ``DigitClassifier.save_pretrained``), or a :class:`FeatureExtractor` from
            :func:`load_extractor` (to check and load it once, before sampling).
        inception_weights: local Inception weights (a state dict saved by ``torch.save``) for offline use; None
            downloads torch-fidelity's on first use. Read once, never unpickled without restriction.
        kid: also compute KID.
        batch_size: images per feature-extractor batch.
        device: ``"cpu"`` or a CUDA device such as ``"cuda"`` / ``"cuda:1"``.
        kid_subset_size: KID subset size; None uses 1000. Clamped to the smaller set, since torch-fidelity refuses
            subsets larger than either set.

    Returns:
        ``{"fid", "kid_mean", "kid_std", "num_samples", "num_reference", "extractor", "feature_dim"}``; the KID
        entries are None when ``kid`` is False. Nothing is cached on disk. Sets of at most ``feature_dim`` images
        are scored with a :class:`SmallSetWarning`.
    """
    cuda = _is_cuda(device)
    extractor = _prepared(extractor, inception_weights)
    samples_dataset, reference_dataset = Uint8Images(samples), Uint8Images(reference)
    num_samples, num_reference = len(samples_dataset), len(reference_dataset)
    if min(num_samples, num_reference) < 2:
        raise ValueError(
            f"FID needs at least 2 images per set, got {num_samples} samples and {num_reference} reference images"
        )
    if kid_subset_size is not None and kid_subset_size < 2:
        raise ValueError(f"kid_subset_size must be at least 2, got {kid_subset_size}")
    subset_size = min(kid_subset_size or KID_SUBSET_SIZE, num_samples, num_reference)
    warn_small_sets(num_samples, num_reference, extractor)
    with _device_scope(device):
        metrics = torch_fidelity.calculate_metrics(
            input1=samples_dataset,
            input2=reference_dataset,
            fid=True,
            kid=kid,
            feature_extractor=extractor.name,
            feature_extractor_weights_path=extractor.weights_argument(),
            kid_subset_size=subset_size,
            batch_size=batch_size,
            cuda=cuda,
            save_cpu_ram=True,
            cache=False,
            verbose=False,
        )
    return {
        "fid": float(metrics[KEY_METRIC_FID]),
        "kid_mean": float(metrics[KEY_METRIC_KID_MEAN]) if kid else None,
        "kid_std": float(metrics[KEY_METRIC_KID_STD]) if kid else None,
        "num_samples": num_samples,
        "num_reference": num_reference,
        "extractor": extractor.spec,
        "feature_dim": extractor.feature_dim,
    }


def _is_cuda(device: str) -> bool:
    kind = torch.device(device).type
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"torch-fidelity runs on 'cpu' or 'cuda' devices, got {device!r}")
    return kind == "cuda"


def _device_scope(device: str) -> contextlib.AbstractContextManager:
    # torch-fidelity moves modules and batches with a bare `.cuda()`, so `cuda:N` must be the current device.
    parsed = torch.device(device)
    if parsed.type == "cuda" and parsed.index is not None:
        return torch.cuda.device(parsed)
    return contextlib.nullcontext()


def reference_images(dataset: str, split: str = "test", image_size: int = 32, root: str | None = None,
                     limit: int | None = None) -> torch.Tensor:
    """A dataset split as uint8 RGB images (N, 3, H, W), the reference set FID compares samples with; ``limit``
    (an int >= 2, FID's minimum) keeps the first ``limit`` images."""
    from flexar.data import build_dataset

    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, numbers.Integral) or limit < 2):
        raise ValueError(f"reference limit must be an int >= 2 (FID needs two images per set) or None, got {limit!r}")
    data = build_dataset(dataset, split, image_size=image_size, root=root)
    count = len(data) if limit is None else min(limit, len(data))
    if count < 2:
        raise ValueError(f"reference set {dataset}:{split} has {count} images; FID needs at least 2")
    images = torch.stack([data[i][0] for i in range(count)])
    images = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return images.repeat(1, 3, 1, 1) if images.shape[1] == 1 else images
