"""Training a (small) APOGEENet on realistic synthetic spectra: ``python -m devtools.training``.

The network is the production class (:class:`~stream_worker.engine.network.ApogeeNet`) at smaller sizes,
fed exactly what inference feeds it (:func:`stream_worker.engine.preprocess.network_inputs`), with
targets normalised by the model card inference reads (:mod:`stream_worker.core.labels`), so a
trained checkpoint is a drop-in ``engine.weights`` file.

Data: noise-free synthetic spectra (:mod:`devtools.synthetic`) are generated once into
memory; every epoch each one is given a new S/N (log-uniform in ``snr_range``), a new overall
flux level, a new noise realisation and a new gap style. Half of the inputs (``draw_fraction``)
are then noised a second time exactly as the Monte Carlo draws are at inference (``flux + error
* N(0, 1)`` on the already noisy spectrum), so the draws the uncertainties come from are in the
training distribution too. A held-out validation set (its own seed, fixed noise) is scored in
physical units after every epoch. The Monte Carlo-like inputs are phased in (none in the first
10 % of the steps, full share from 30 %): their chip gaps are a telegraph noise between log(1e-6)
and log(5 x median error) that, from the start, drowns the signal and leaves a network that
predicts the training mean. After training the BatchNorm running statistics are
recomputed over training inputs (cumulative average, not the momentum trail of the last
batches), the state dict is saved with ``torch.save`` and a metadata JSON written beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from devtools.synthetic import LABEL_NAMES, SpectrumGenerator
from stream_worker import __version__
from stream_worker.core.labels import APOGEENET_III, ModelCard
from stream_worker.engine.network import ApogeeNet, ModelSizes
from stream_worker.engine.preprocess import network_inputs
from stream_worker.engine.weights import load_model

log = logging.getLogger(__name__)

DEMO_SIZES = dict(channels=(4, 8, 8, 16), kernel_size=8, pooled_length=128, linear_width=256, linear_layers=3)
"""Sizes of the shipped demonstration model (``stream_worker/models/apogeenet-demo.pt``)."""


@dataclass
class TrainSettings:
    """Everything that determines a training run (recorded in the metadata JSON)."""

    n_train: int = 24000
    n_val: int = 1200
    epochs: int = 12
    batch_size: int = 32
    learning_rate: float = 1e-3
    clip_grad_norm: float = 1.0
    weight_decay: float = 1e-5
    snr_range: tuple[float, float] = (15.0, 400.0)
    val_snr_range: tuple[float, float] = (20.0, 300.0)
    draw_fraction: float = 0.5
    draw_ramp: tuple[float, float] = (0.1, 0.3)
    level_sigma: float = 0.7
    dwarf_fraction: float = 0.35
    seed: int = 20260101
    threads: int = 2
    bn_recalibration_spectra: int = 1024
    sizes: dict = field(default_factory=lambda: dict(DEMO_SIZES))
    init_from: str | None = None


def normalise_targets(labels: np.ndarray, card: ModelCard = APOGEENET_III) -> np.ndarray:
    """``[teff, logg, fe_h, ...]`` → the network's normalised outputs, in the card's order: the
    constants inference undoes, written into the checkpoint's metadata."""
    physical_values = {"logg": labels[:, 1], "log10_teff": np.log10(labels[:, 0]), "fe_h": labels[:, 2]}
    return np.column_stack([card.normalise(physical_values[name], name) for name in card.outputs]).astype(np.float32)


def physical(outputs: np.ndarray, card: ModelCard = APOGEENET_III) -> np.ndarray:
    """Normalised network outputs ``(N, 3)`` → ``(N, 3)`` ``[teff, logg, fe_h]``."""
    value = {name: card.unnormalise(outputs[:, i], name) for i, name in enumerate(card.outputs)}
    return np.column_stack([10 ** value["log10_teff"], value["logg"], value["fe_h"]])


def scatter_stats(predicted: np.ndarray, truth: np.ndarray) -> dict:
    """Bias (median), robust scatter (1.4826 MAD) and std of ``predicted - truth`` per label."""
    out = {}
    for j, name in enumerate(("teff", "logg", "fe_h")):
        d = predicted[:, j] - truth[:, j]
        med = float(np.median(d))
        out[name] = {
            "bias": med,
            "robust_scatter": float(1.4826 * np.median(np.abs(d - med))),
            "std": float(np.std(d)),
        }
    return out


# --------------------------------------------------------------------------- data


@dataclass
class NoiseFreeSet:
    """Noise-free flux and its error at a reference S/N, with labels (training storage)."""

    model_flux: np.ndarray  # (N, L) float32, NaN in the gaps
    error: np.ndarray  # (N, L) float32, inf in the gaps, >= 1e10 at bad pixels
    snr: np.ndarray  # (N,) the S/N the error was scaled to
    labels: np.ndarray  # (N, 5)
    dwarf: np.ndarray  # (N,)


def build_set(n: int, seed: int, snr_range, dwarf_fraction: float, chunk: int = 1000) -> NoiseFreeSet:
    """``n`` synthetic spectra, generated ``chunk`` at a time (bounded memory)."""
    generator = SpectrumGenerator(dwarf_fraction)
    model_flux = np.empty((n, 8575), np.float32)
    error = np.empty((n, 8575), np.float32)
    snr, labels, dwarf = np.empty(n), np.empty((n, 5)), np.empty(n, bool)
    started = time.perf_counter()
    for k, start in enumerate(range(0, n, chunk)):
        stop = min(start + chunk, n)
        part = generator.generate(stop - start, tuple(snr_range), seed=seed * 1000 + k)
        model_flux[start:stop], error[start:stop] = part.model_flux, part.error
        snr[start:stop], labels[start:stop], dwarf[start:stop] = part.snr, part.labels, part.dwarf
        log.info("generated %d/%d spectra (%.0f s)", stop, n, time.perf_counter() - started)
    return NoiseFreeSet(model_flux, error, snr, labels, dwarf)


def make_inputs(
    data: NoiseFreeSet,
    index: np.ndarray,
    rng: np.random.Generator,
    snr_range,
    draw_fraction: float,
    level_sigma: float,
) -> torch.Tensor:
    """Network inputs ``(B, 1, L)`` for spectra ``index``: new S/N, flux level and noise, then
    the inference preprocessing; a ``draw_fraction`` of them as Monte Carlo draws."""
    b = len(index)
    new_snr = np.exp(rng.uniform(np.log(snr_range[0]), np.log(snr_range[1]), b))
    level = np.exp(rng.normal(0, level_sigma, b)).astype(np.float32)
    model_flux = data.model_flux[index] * level[:, None]
    good = np.isfinite(data.error[index]) & (data.error[index] < 1e5)
    error = np.where(good, data.error[index] * (level * data.snr[index] / new_snr).astype(np.float32)[:, None],
                     data.error[index])
    flux, ivar = SpectrumGenerator.observe(model_flux, error, rng, visit_style=rng.uniform(size=b) < 0.5)
    draws = rng.uniform(size=b) < draw_fraction
    noise = torch.from_numpy(rng.standard_normal((b, 1, flux.shape[1]), dtype=np.float32))
    rows = []
    for i in range(b):
        clean, noisy = network_inputs(flux[i], ivar[i], noise[i] if draws[i] else None)
        rows.append(noisy[0] if draws[i] else clean[0])
    return torch.stack(rows)


def observed_inputs(flux: np.ndarray, ivar: np.ndarray) -> torch.Tensor:
    """Clean-pass inputs ``(N, 1, L)`` of observed spectra, as inference makes them."""
    return torch.cat([network_inputs(f, v, None)[0] for f, v in zip(flux, ivar)])


@torch.inference_mode()
def predict(model: nn.Module, inputs: torch.Tensor, batch_size: int = 128) -> np.ndarray:
    """Physical ``[teff, logg, fe_h]`` for inputs ``(N, 1, L)`` (eval mode)."""
    model.eval()
    out = torch.cat([model(batch) for batch in inputs.split(batch_size)]).numpy()
    return physical(out)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, inputs: torch.Tensor, batch_size: int = 64) -> None:
    """Recomputes every BatchNorm's running mean/variance as the plain average over ``inputs``
    (train-mode forward passes, no gradient), so eval-mode statistics describe the training
    distribution rather than the last few batches."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    model.train()
    for batch in inputs.split(batch_size):
        model(batch)
    for m, momentum in zip(norms, saved):
        m.momentum = momentum
    model.eval()


# --------------------------------------------------------------------------- training


def initialise(model: ApogeeNet) -> None:
    """He-normal weights and a small positive bias for the ReLU head. PyTorch's default Linear
    initialisation shrinks the signal by ~3x per layer, so the untrained head's output hardly
    depends on the input and the first large steps kill every ReLU of the first layer (seen:
    the network then predicts the training mean forever)."""
    linear = [m for m in model.linear_sequential.modules() if isinstance(m, nn.Linear)]
    for layer in linear[:-1]:
        nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
        nn.init.constant_(layer.bias, 0.01)
    nn.init.xavier_normal_(linear[-1].weight)
    nn.init.zeros_(linear[-1].bias)


def train(settings: TrainSettings, output: str | Path, description: str | None = None) -> dict:
    """Trains, saves ``output`` (state dict) and ``output.with_suffix('.json')`` (metadata);
    returns the metadata."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    started = time.perf_counter()

    log.info("generating %d training + %d validation spectra", settings.n_train, settings.n_val)
    data = build_set(settings.n_train, settings.seed, settings.snr_range, settings.dwarf_fraction)
    targets = torch.from_numpy(normalise_targets(data.labels))
    val = SpectrumGenerator().generate(  # the prior's dwarf share, whatever the training emphasis
        settings.n_val, tuple(settings.val_snr_range), seed=settings.seed + 7_777_777
    )
    val_inputs = observed_inputs(val.flux, val.ivar)
    val_truth = val.labels[:, :3]
    generation_seconds = time.perf_counter() - started

    parent = None
    if settings.init_from:
        # fine-tuning: start from a trained checkpoint of the same sizes (recorded in the metadata)
        sizes = ModelSizes(**{**settings.sizes, "channels": tuple(settings.sizes["channels"])})
        model = load_model(settings.init_from, device="cpu", sizes=sizes)
        model.train()
        parent_meta = Path(settings.init_from).with_suffix(".json")
        parent = {
            "checkpoint": Path(settings.init_from).name,
            "sha256": model.weights_info.sha256,
            "metadata": json.loads(parent_meta.read_text()) if parent_meta.exists() else None,
        }
        log.info("fine-tuning from %s (sha256 %s)", settings.init_from, model.weights_info.sha256[:12])
    else:
        model = ApogeeNet(**settings.sizes)
        initialise(model)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("network %s: %d parameters", settings.sizes, n_params)
    optimiser = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
    steps_per_epoch = settings.n_train // settings.batch_size
    total_steps = steps_per_epoch * settings.epochs
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=settings.learning_rate, total_steps=total_steps, pct_start=0.1
    )
    rng = np.random.default_rng(settings.seed + 1)
    history = []
    train_started = time.perf_counter()
    step = 0
    for epoch in range(settings.epochs):
        order = rng.permutation(settings.n_train)
        model.train()
        running, seen = 0.0, 0
        for k in range(steps_per_epoch):
            index = np.sort(order[k * settings.batch_size : (k + 1) * settings.batch_size])
            start, full = settings.draw_ramp
            ramp = 1.0 if full <= start else (step / total_steps - start) / (full - start)
            draw_fraction = settings.draw_fraction * min(max(ramp, 0.0), 1.0)
            inputs = make_inputs(data, index, rng, settings.snr_range, draw_fraction, settings.level_sigma)
            loss = nn.functional.mse_loss(model(inputs), targets[index])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), settings.clip_grad_norm)
            optimiser.step()
            schedule.step()
            step += 1
            running += float(loss.detach()) * len(index)
            seen += len(index)
            if step % 50 == 0 or k == steps_per_epoch - 1:
                elapsed = time.perf_counter() - train_started
                rate = step * settings.batch_size / elapsed
                eta = (total_steps - step) * settings.batch_size / rate
                log.info(
                    "epoch %d/%d step %d/%d loss %.4f lr %.2e %.0f spectra/s, ETA %.1f min",
                    epoch + 1, settings.epochs, step, total_steps, running / seen,
                    schedule.get_last_lr()[0], rate, eta / 60,
                )
                running, seen = 0.0, 0
        metrics = scatter_stats(predict(model, val_inputs), val_truth)
        history.append({"epoch": epoch + 1, **metrics})
        log.info(
            "epoch %d validation (running BN stats): Teff %.0f K, log g %.3f, [Fe/H] %.3f (robust scatter)",
            epoch + 1, metrics["teff"]["robust_scatter"], metrics["logg"]["robust_scatter"],
            metrics["fe_h"]["robust_scatter"],
        )
    train_seconds = time.perf_counter() - train_started

    calibration = np.random.default_rng(settings.seed + 2).choice(
        settings.n_train, min(settings.bn_recalibration_spectra, settings.n_train), replace=False
    )
    recalibrate_batchnorm(
        model,
        make_inputs(data, np.sort(calibration), np.random.default_rng(settings.seed + 3), settings.snr_range,
                    settings.draw_fraction, settings.level_sigma),
    )
    predicted = predict(model, val_inputs)
    final = scatter_stats(predicted, val_truth)
    by_snr = {}
    for lo, hi in ((20, 50), (50, 100), (100, 300)):
        sel = (val.snr >= lo) & (val.snr < hi)
        by_snr[f"{lo}-{hi}"] = {"n": int(sel.sum()), **scatter_stats(predicted[sel], val_truth[sel])}
    log.info(
        "final validation (recalibrated BN): Teff %.0f K, log g %.3f, [Fe/H] %.3f; S/N 100-300: %.0f K, %.3f, %.3f",
        final["teff"]["robust_scatter"], final["logg"]["robust_scatter"], final["fe_h"]["robust_scatter"],
        by_snr["100-300"]["teff"]["robust_scatter"], by_snr["100-300"]["logg"]["robust_scatter"],
        by_snr["100-300"]["fe_h"]["robust_scatter"],
    )

    model.eval()
    torch.save(model.state_dict(), output)
    digest = hashlib.sha256(output.read_bytes()).hexdigest()
    metadata = {
        "name": output.stem,
        "description": description
        or "APOGEENet (small variant) trained on emulated spectra only: a demonstration model, not APOGEENet III",
        "checkpoint": output.name,
        "sha256": digest,
        "bytes": output.stat().st_size,
        "parameters": n_params,
        "sizes": {**settings.sizes, "channels": list(settings.sizes["channels"]), "n_outputs": 3},
        **APOGEENET_III.to_metadata(),
        "training_set": {
            "generator": "devtools.synthetic.SpectrumGenerator",
            "spectra": settings.n_train,
            "labels": list(LABEL_NAMES),
            "label_ranges": {
                name: [float(data.labels[:, j].min()), float(data.labels[:, j].max())]
                for j, name in enumerate(LABEL_NAMES)
            },
            "dwarf_fraction": float(data.dwarf.mean()),
            "description": (
                "binspec_plus (giants, DR17 red-giant label prior) and binspec dwarf (main-sequence "
                "locus) emulated spectra on the apStar grid, realistic continuum, error spectrum, "
                "chip gaps and bad pixels; each epoch a new S/N (log-uniform), flux level and noise; "
                f"{settings.draw_fraction:.0%} of inputs re-noised like the Monte Carlo draws"
            ),
        },
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(settings).items()},
        "seed": settings.seed,
        "validation": {"spectra": settings.n_val, "seed": settings.seed + 7_777_777, "overall": final, "by_snr": by_snr},
        "history": history,
        "fine_tuned_from": parent,
        "timing": {
            "generation_seconds": round(generation_seconds, 1),
            "training_seconds": round(train_seconds, 1),
            "threads": settings.threads,
            "torch": torch.__version__,
        },
        "worker_version": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    output.with_suffix(".json").write_text(json.dumps(metadata, indent=2) + "\n")
    log.info("saved %s (%d bytes, sha256 %s) in %.1f min", output, metadata["bytes"], digest[:12],
             (time.perf_counter() - started) / 60)
    return metadata


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    """``python -m devtools.training``'s options."""
    defaults = TrainSettings()
    parser = argparse.ArgumentParser(prog="python -m devtools.training",
                                     description="train a small APOGEENet on synthetic spectra (demonstration model)")
    parser.add_argument("-o", "--output", type=Path, default=Path("out/apogeenet-demo.pt"),
                        help="checkpoint path; metadata goes to the same name with .json")
    parser.add_argument("--n-train", type=int, default=defaults.n_train)
    parser.add_argument("--n-val", type=int, default=defaults.n_val)
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--threads", type=int, default=defaults.threads)
    parser.add_argument("--channels", default=",".join(map(str, DEMO_SIZES["channels"])), help="e.g. 4,8,8,16")
    parser.add_argument("--kernel-size", type=int, default=DEMO_SIZES["kernel_size"], help="even")
    parser.add_argument("--pooled-length", type=int, default=DEMO_SIZES["pooled_length"])
    parser.add_argument("--linear-width", type=int, default=DEMO_SIZES["linear_width"])
    parser.add_argument("--linear-layers", type=int, default=DEMO_SIZES["linear_layers"])
    parser.add_argument("--dwarf-fraction", type=float, default=defaults.dwarf_fraction,
                        help="share of main-sequence stars in the training set (validation keeps the prior's)")
    parser.add_argument("--init-from", default=None,
                        help="fine-tune this checkpoint (same sizes) instead of starting from random weights; "
                             "the Monte Carlo-like inputs are then used from the first step")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Trains and writes the checkpoint and its metadata."""
    args = build_parser().parse_args(argv)
    sizes = dict(
        channels=tuple(int(c) for c in str(args.channels).split(",")),
        kernel_size=args.kernel_size,
        pooled_length=args.pooled_length,
        linear_width=args.linear_width,
        linear_layers=args.linear_layers,
    )
    if sizes["kernel_size"] % 2:
        raise ValueError("kernel_size must be even (the residual blocks' paddings keep the length only then)")
    settings = dataclasses.replace(
        TrainSettings(),
        n_train=args.n_train, n_val=args.n_val, epochs=args.epochs, batch_size=args.batch_size,
        learning_rate=args.learning_rate, seed=args.seed, threads=args.threads, sizes=sizes,
        dwarf_fraction=args.dwarf_fraction, init_from=args.init_from,
        draw_ramp=(0.0, 0.0) if args.init_from else TrainSettings.draw_ramp,
    )
    metadata = train(settings, args.output)
    overall = metadata["validation"]["overall"]
    print(
        f"{args.output}: sha256 {metadata['sha256']}; validation robust scatter "
        f"Teff {overall['teff']['robust_scatter']:.0f} K, log g {overall['logg']['robust_scatter']:.3f}, "
        f"[Fe/H] {overall['fe_h']['robust_scatter']:.3f}"
    )
    return 0


if __name__ == "__main__":  # pragma: no cover
    import sys

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    sys.exit(main())
