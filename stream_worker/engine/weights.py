"""The network's weights: reading them (official chunked directory or one file), checking them
strictly, and describing where they came from.

The original pipeline loads with ``strict=False``, which silently leaves mismatched layers
random; here every missing, unexpected or mis-shaped key is named.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from stream_worker.core.labels import APOGEENET_III, ModelCard, ModelCardError
from stream_worker.engine.network import ApogeeNet, ModelSizes

log = logging.getLogger(__name__)

class WeightsError(ValueError):
    """The weights cannot be used with this network (missing, corrupt, or mismatched)."""


@dataclass(frozen=True)
class WeightsInfo:
    """Where a model's weights came from, so every record can name them."""

    name: str
    source: str
    sha256: str
    sizes: dict = field(default_factory=dict)
    trained: bool = True
    card: ModelCard = APOGEENET_III
    """What the outputs mean, from the metadata beside the weights (default: APOGEENet III)."""


def metadata_path(weights: Path) -> Path:
    """Where a checkpoint's metadata JSON lives: ``X.json`` beside ``X.pt``, or ``metadata.json``
    inside a ``deconstructed_model/`` directory."""
    return weights / "metadata.json" if weights.is_dir() else weights.with_suffix(".json")


def read_card(weights: Path, sha256: str) -> ModelCard:
    """The model card of the weights at ``weights``: from their metadata JSON when there is one
    (its ``sha256``, if recorded, must be theirs), else APOGEENet III's."""
    path = metadata_path(weights)
    if not path.is_file():
        return APOGEENET_III
    try:
        metadata = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightsError(f"cannot read the model metadata {path}: {exc}") from None
    if not isinstance(metadata, dict):
        raise WeightsError(f"{path}: expected a JSON object of model metadata")
    if metadata.get("sha256") not in (None, sha256):
        raise WeightsError(f"{path} describes other weights (sha256 {metadata['sha256']}), not {weights} ({sha256})")
    try:
        return ModelCard.from_metadata(metadata)
    except ModelCardError as exc:
        raise WeightsError(f"{path}: {exc}") from None


_CHUNK = re.compile(r"^model_chunk_(\d+)$")


def expand_path(path: str | os.PathLike) -> Path:
    """Expands ``~`` and environment variables (``$MWM_ASTRA/...``); an unset variable is an error."""
    expanded = os.path.expanduser(os.path.expandvars(os.fspath(path)))
    if "$" in expanded:
        raise WeightsError(f"weights path {path!r} names an unset environment variable ({expanded!r})")
    return Path(expanded)


def read_weights_bytes(path: Path) -> bytes:
    """Reads a single ``torch.save`` file, or the official ``deconstructed_model/`` directory
    whose ``model_chunk_0..N`` concatenate (in numeric order) into one."""
    if path.is_dir():
        chunks = sorted(
            (int(m.group(1)), p) for p in path.iterdir() if (m := _CHUNK.match(p.name))
        )
        if not chunks:
            raise WeightsError(f"{path} is a directory without model_chunk_N files")
        numbers = [n for n, _ in chunks]
        if numbers != list(range(len(numbers))):
            raise WeightsError(f"{path}: model chunks are not numbered 0..N without gaps: found {numbers}")
        return b"".join(p.read_bytes() for _, p in chunks)
    if not path.exists():
        raise WeightsError(f"weights not found: {path}")
    return path.read_bytes()


def check_state_dict(model: nn.Module, state_dict: dict) -> None:
    """Strict key and shape check that names every difference (load_state_dict's message
    stops at the first shape mismatch and says nothing useful about chunk mix-ups)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong_shape = [
        f"{k}: expected {tuple(expected[k].shape)}, found {tuple(state_dict[k].shape)}"
        for k in expected
        if k in state_dict and tuple(expected[k].shape) != tuple(state_dict[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {', '.join(unexpected)}")
    if wrong_shape:
        problems.append(f"wrong shapes: {'; '.join(wrong_shape)}")
    if problems:
        raise WeightsError("weights do not match the network: " + " | ".join(problems))


def infer_sizes(state_dict: dict) -> ModelSizes:
    """Reads the network's sizes off a state dict, so a trained variant loads without
    being told its sizes."""
    try:
        channels = [state_dict["first_conv.conv_layer.weight"].shape[0]]
        kernel_size = state_dict["first_conv.conv_layer.weight"].shape[2]
        block = 0
        while f"res_blocks.{block}.conv1.weight" in state_dict:
            channels.append(state_dict[f"res_blocks.{block}.conv1.weight"].shape[0])
            block += 1
        linear = sorted(
            int(m.group(1))
            for k in state_dict
            if (m := re.match(r"^linear_sequential\.(\d+)\.linear_layer\.weight$", k))
        )
        head = state_dict[f"linear_sequential.{len(linear)}.weight"]
        first = state_dict["linear_sequential.0.linear_layer.weight"] if linear else head
    except KeyError as exc:
        raise WeightsError(f"weights lack the key {exc.args[0]!r} needed to size the network") from None
    return ModelSizes(
        channels=tuple(int(c) for c in channels),
        kernel_size=int(kernel_size),
        pooled_length=int(first.shape[1] // channels[-1]),
        linear_width=int(first.shape[0]) if linear else int(head.shape[1]),
        linear_layers=len(linear),
        n_outputs=int(head.shape[0]),
    )


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None`` or ``"auto"`` picks CUDA when available, else CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_model(
    path: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    sha256: str | None = None,
    sizes: ModelSizes | None = None,
) -> ApogeeNet:
    """Loads weights into an :class:`ApogeeNet` in eval mode on ``device``.

    ``path`` is a ``torch.save`` state-dict file or a ``deconstructed_model/`` directory;
    ``None`` loads the shipped demonstration model (:func:`load_demo_model`).
    Sizes are read from the weights unless given (then they must match exactly). The loaded
    model carries a :class:`WeightsInfo` as ``model.weights_info``.
    """
    if path is None:
        return load_demo_model(device=device, sha256=sha256)
    resolved = expand_path(path)
    raw = read_weights_bytes(resolved)
    digest = hashlib.sha256(raw).hexdigest()
    if sha256 and digest != sha256.lower():
        raise WeightsError(f"weights checksum mismatch for {resolved}: expected sha256 {sha256}, found {digest}")
    try:
        state_dict = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt or truncated files
        raise WeightsError(f"cannot read weights from {resolved}: {exc}") from exc
    if not isinstance(state_dict, dict):
        raise WeightsError(f"{resolved} holds a {type(state_dict).__name__}, not a state dict")
    model = ApogeeNet(**asdict(sizes or infer_sizes(state_dict)))
    check_state_dict(model, state_dict)
    model.load_state_dict(state_dict, strict=True)
    model.weights_info = WeightsInfo(
        name=resolved.name, source=str(resolved), sha256=digest, sizes=asdict(model.sizes),
        card=read_card(resolved, digest),
    )
    log.info("loaded weights %s (sha256 %s)", resolved, digest[:12])
    return model.eval().to(resolve_device(device))


DEMO_MODEL_NAME = "apogeenet-demo (demonstration model trained on emulated spectra)"
"""``weights_info.name`` of the shipped model, so every record says what produced it."""

DEMO_MODEL_FILE = "apogeenet-demo.pt"
"""The shipped checkpoint in ``stream_worker/models/``; its metadata is the ``.json`` beside it."""


def load_demo_model(
    device: str | torch.device | None = None, sha256: str | None = None, directory: str | os.PathLike | None = None
) -> ApogeeNet:
    """The small APOGEENet shipped in ``stream_worker/models/`` (or ``directory``), trained on
    emulated spectra only (``python -m devtools.training``; accuracy in ``docs/accuracy.md``). Not
    APOGEENet III: it exists so the product works out of the box. Its checksum must match the
    one recorded in its metadata JSON, else :class:`WeightsError`."""
    from importlib import resources

    models = Path(directory) if directory is not None else resources.files("stream_worker") / "models"
    with resources.as_file(models / DEMO_MODEL_FILE) as checkpoint, resources.as_file(
        models / DEMO_MODEL_FILE.replace(".pt", ".json")
    ) as metadata_file:
        if not checkpoint.exists() or not metadata_file.exists():
            raise WeightsError(f"the shipped demonstration model is missing ({checkpoint}, {metadata_file})")
        recorded = json.loads(metadata_file.read_text())["sha256"]
        found = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
        if found != recorded:
            raise WeightsError(
                f"the shipped demonstration model {checkpoint} is corrupt or was replaced: its sha256 is "
                f"{found}, its metadata ({metadata_file.name}) records {recorded}"
            )
        model = load_model(checkpoint, device=device, sha256=sha256 or recorded)
    model.weights_info = dataclasses.replace(model.weights_info, name=DEMO_MODEL_NAME)
    return model


def random_model(device: str | torch.device | None = None, seed: int = 0, **sizes) -> ApogeeNet:
    """An untrained network with deterministic random weights, for benchmarks and tests only."""
    torch.manual_seed(seed)
    model = ApogeeNet(**sizes)
    digest = hashlib.sha256(f"random:{seed}:{sorted(asdict(model.sizes).items())}".encode()).hexdigest()
    model.weights_info = WeightsInfo(
        name="random-untrained", source=f"random(seed={seed})", sha256=digest,
        sizes=asdict(model.sizes), trained=False,
    )
    return model.eval().to(resolve_device(device))
