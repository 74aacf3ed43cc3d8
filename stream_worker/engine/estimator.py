"""The engine: many spectra and all their Monte Carlo draws through the network in few passes.

Per spectrum: clean input + ``num_draws`` noisy inputs (noise from that spectrum's own
generator) form one contiguous block of rows; blocks of many spectra are stacked and pushed
through the network in batches of ``batch_size`` rows. Spectra are taken ``chunk_spectra`` at a
time so memory stays bounded for any number of inputs; on a GPU the next chunk is queued before
the previous one's outputs are summarised, so the device does not wait for the host. A spectrum
that fails (bad values, a network error, non-finite outputs) gets a failed :class:`~stream_worker.core.estimate.Estimate`;
the others are unaffected. The engine returns estimates, never records: those are built in
:mod:`stream_worker.core.records`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from stream_worker.core.estimate import Estimate, failed, measured
from stream_worker.core.labels import APOGEENET_III
from stream_worker.core.records import Provenance
from stream_worker.engine.host_memory import keep_freed_memory
from stream_worker.engine.kernels import TRUNK_ROWS, FusedApogeeNet
from stream_worker.engine.network import ApogeeNet
from stream_worker.engine.precision import PrecisionMode, PrecisionPlan, parse_plan, precision_mode
from stream_worker.engine.preprocess import dtype_groups, input_rows, noise_draws
from stream_worker.engine.tuning import checked_plan, measured_plan
from stream_worker.engine.uncertainty import summarise, unnormalise
from stream_worker.engine.weights import DEMO_MODEL_NAME, load_model, random_model, resolve_device

if TYPE_CHECKING:  # the engine runs without the config's YAML dependency (bench/gpu.py)
    from stream_worker.config import EngineConfig

log = logging.getLogger(__name__)


class Estimator:
    """Runs APOGEENet on ``(N, L)`` flux and ivar arrays and returns one estimate per spectrum."""

    def __init__(
        self,
        model: ApogeeNet,
        num_draws: int = 20,
        seed: int | None = None,
        device: str | torch.device | None = None,
        batch_size: int | None = None,
        chunk_spectra: int = 64,
        precision: str = "exact",
        fft: bool = True,
        kernels: str = "measure",
    ) -> None:
        """``precision``: a mode of :data:`~stream_worker.engine.precision.MODES`, resolved into a
        plan for this device and network by ``kernels``: ``"measure"`` times every form the mode
        allows on this device (:mod:`~stream_worker.engine.tuning`), ``"rules"`` takes the mode's
        fixed rules, and a plan's label pins that plan. ``fft``: allow FFT convolutions;
        ``False`` keeps the direct sums and their exact rounding."""
        if num_draws < 0 or num_draws == 1:
            raise ValueError(f"num_draws must be 0 (no uncertainties) or at least 2, got {num_draws}")
        mode = precision_mode(precision)
        self.device = resolve_device(device) if device is not None else next(model.parameters()).device
        model = model.eval().to(self.device)
        if self.device.type == "cpu":
            keep_freed_memory()  # ~15% of a CPU pass went to faulting in freed tensors' pages again
        self.weights_info = model.weights_info
        self.card = getattr(self.weights_info, "card", APOGEENET_III)
        # The fused form computes the same function faster; other modules (test doubles) run as given.
        # The clean rows, which give the reported values, always go through the plan's clean network;
        # the Monte Carlo draws, which give the spread, through its draws network (the same one
        # unless the mode reduces their precision).
        self.model = self.draws_model = model
        self.plan: PrecisionPlan | None = None
        if isinstance(model, ApogeeNet):
            self.plan = self._resolve(mode, model, kernels, fft)
            self.plan.apply()
            self.model = self.draws_model = FusedApogeeNet(model, self.plan.clean)
            if self.plan.draws != self.plan.clean:
                self.draws_model = FusedApogeeNet(model, self.plan.draws)
            log.info("precision plan: %s", self.plan.label)
        self.precision = mode.name
        self.num_draws = int(num_draws)
        self.seed = 0 if seed is None else int(seed)
        self.batch_size = int(batch_size or (1024 if self.device.type == "cuda" else 256))
        self.chunk_spectra = int(chunk_spectra)
        # A GPU computes the newest chunk while the one before is copied back and summarised
        # (~20 us of host time per spectrum, the GPU idle otherwise); a CPU has computed a chunk
        # by the time it is queued, and summarising at once keeps its inference_seconds its own.
        self.chunks_ahead = 1 if self.device.type == "cuda" else 0

    def _resolve(self, mode: PrecisionMode, model: ApogeeNet, kernels: str, fft: bool) -> PrecisionPlan:
        sizes = model.sizes
        rows = TRUNK_ROWS.get(self.device.type, TRUNK_ROWS["cuda"])
        if kernels == "rules":
            return mode.plan(self.device.type, sizes.channels, sizes.kernel_size, fft=fft)
        if kernels == "measure":
            return measured_plan(model, mode, self.device, rows, fft=fft)
        plan = parse_plan(kernels)
        if plan.device_type != self.device.type:
            raise ValueError(f"the pinned plan is for {plan.device_type}, the engine runs on {self.device.type}")
        return checked_plan(model, mode.check(plan, sizes.channels, fft=fft), self.device, rows)

    @property
    def provenance(self) -> Provenance:
        """What every record of this engine says produced it."""
        info = self.weights_info
        plan = self.plan.label if self.plan is not None else f"{self.precision}/{self.device.type} module as given"
        return Provenance(info.name, info.trained, info.sha256, plan)

    @classmethod
    def from_config(cls, engine: EngineConfig) -> Estimator:
        """The engine the config describes: explicit ``engine.weights`` first; else, only when
        ``allow_random_weights`` is set, an untrained network (tests, benchmarks); else the
        shipped demonstration model, announced as such. A missing weights path never gives
        random numbers."""
        if engine.num_threads:
            torch.set_num_threads(engine.num_threads)
        if engine.weights:
            model = load_model(engine.weights, device=engine.device, sha256=engine.weights_sha256)
        elif engine.allow_random_weights:
            log.warning("running an UNTRAINED network with random weights: results are meaningless")
            model = random_model(device=engine.device)
        else:
            model = load_model(None, device=engine.device, sha256=engine.weights_sha256)
            log.warning(
                "engine.weights is not set: using the shipped DEMONSTRATION model %s (sha256 %s), a small "
                "APOGEENet trained on emulated spectra only, not APOGEENet III; see docs/accuracy.md. "
                "Set engine.weights (or --weights) to the official weights for science results",
                DEMO_MODEL_NAME, model.weights_info.sha256[:12],
            )
        return cls(
            model,
            num_draws=engine.num_draws,
            seed=engine.seed,
            batch_size=engine.batch_size,
            chunk_spectra=engine.chunk_spectra,
            precision=engine.precision,
            fft=engine.fft,
            kernels=engine.kernels,
        )

    def estimate(self, flux: np.ndarray, ivar: np.ndarray | Sequence[np.ndarray],
                 ids: Sequence[str] | None = None) -> list[Estimate]:
        """Estimates for ``N`` spectra: ``flux`` ``(N, L)``; ``ivar`` ``(N, L)`` or ``N`` rows of
        ``L`` (each row's error is computed in its own dtype, as the pipeline does, so a float32
        spectrum gets the same bits beside float64 ones). ``ids`` seed each spectrum's noise;
        without them the row index is the identifier, so pass real identifiers wherever results
        must be reproducible."""
        flux = np.asarray(flux)
        ivar = list(ivar) if not isinstance(ivar, np.ndarray) else ivar
        shapes = {np.shape(row) for row in ivar}
        if flux.ndim != 2 or len(ivar) != len(flux) or shapes - {flux.shape[1:]}:
            raise ValueError(f"flux and ivar must both be (N, L) arrays, got {flux.shape} and "
                             f"{np.shape(ivar) if isinstance(ivar, np.ndarray) else f'{len(ivar)} rows of {sorted(shapes)}'}")
        ids = [str(i) for i in range(len(flux))] if ids is None else [str(i) for i in ids]
        if len(ids) != len(flux):
            raise ValueError(f"{len(ids)} ids for {len(flux)} spectra")
        estimates: list[Estimate] = []
        queued: list[_Queued] = []
        for start, (chunk_flux, chunk_ivar, started) in zip(range(0, len(flux), self.chunk_spectra),
                                                            self._on_device(flux, ivar)):
            queued.append(self._queue(chunk_flux, chunk_ivar, ids[start : start + self.chunk_spectra], started))
            while len(queued) > self.chunks_ahead:
                estimates += self._collect(queued.pop(0))
        for chunk in queued:
            estimates += self._collect(chunk)
        return estimates

    def _on_device(self, flux: np.ndarray, ivar: np.ndarray | Sequence[np.ndarray]):
        """Each chunk's flux ``(n, L)`` and ivar (:func:`_ivar_through`) as tensors on the engine's
        device, with the time its work began. Only flux and ivar cross to the device: the draws
        are made there. On a GPU the next chunk is copied (pinned buffers, one copy per array, a
        side stream) while the current one computes; on a CPU the arrays are used in place."""
        step = self.chunk_spectra
        starts = range(0, len(flux), step)
        if self.device.type != "cuda":
            for start in starts:
                yield (_host_tensor(flux[start : start + step]), _ivar_through(ivar[start : start + step], _host_tensor),
                       time.perf_counter())
            return
        copies = torch.cuda.Stream(self.device)

        def stage(start: int):
            """Queues the chunk's copies on the side stream; returns its tensors and an event."""
            with torch.cuda.stream(copies):
                def to_device(array: np.ndarray) -> torch.Tensor:
                    return _pinned(array).to(self.device, non_blocking=True)
                chunk_flux = to_device(flux[start : start + step])
                chunk_ivar = _ivar_through(ivar[start : start + step], to_device)
                ready = torch.cuda.Event()
                ready.record(copies)
            return chunk_flux, chunk_ivar, ready

        staged = stage(starts[0]) if starts else None
        for k, _ in enumerate(starts):
            chunk_flux, chunk_ivar, ready = staged
            started = time.perf_counter()
            if k + 1 < len(starts):
                staged = stage(starts[k + 1])  # runs on the side stream while this chunk computes
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(ready)
            for tensor in [chunk_flux, *(chunk_ivar if isinstance(chunk_ivar, list) else [chunk_ivar])]:
                tensor.record_stream(compute)  # allocated on the side stream, used on this one
            yield chunk_flux, chunk_ivar, started

    def _queue(self, flux: torch.Tensor, ivar: torch.Tensor | list[torch.Tensor], ids: list[str],
               started: float) -> _Queued:
        """A chunk's inputs prepared and its network passes queued on the device (on a CPU: run)."""
        failures: dict[int, BaseException] = {}
        indices, rows = self._input_blocks(flux, ivar, ids, failures)
        return _Queued(ids, started, failures, indices, self._queue_blocks(indices, rows))

    def _collect(self, queued: _Queued) -> list[Estimate]:
        """A queued chunk's estimates, in input order: its outputs copied to the host and summarised."""
        outcomes: dict[int, tuple | BaseException] = dict(queued.failures)
        outcomes.update(self._summarise_blocks(queued.indices, queued.outputs))
        seconds = (time.perf_counter() - queued.started) / max(len(queued.ids), 1)
        estimates = []
        for i, spectrum_id in enumerate(queued.ids):
            outcome = outcomes[i]
            if isinstance(outcome, BaseException):
                log.warning("spectrum %s failed: %s: %s", spectrum_id, type(outcome).__name__, outcome)
                estimates.append(failed(spectrum_id, outcome, seconds))
            else:
                estimates.append(measured(spectrum_id, *outcome, self.card, seconds))
        return estimates

    def _input_blocks(self, flux: torch.Tensor, ivar: torch.Tensor | list[torch.Tensor], ids: list[str],
                      failures: dict[int, BaseException]) -> tuple[list[int], torch.Tensor]:
        """The spectra that could be prepared and their rows ``(n, 1 + num_draws, 1, L)`` on the
        engine's device: per spectrum the clean input first, then the noisy ones, its noise drawn
        by its own generator straight into the buffer. Prepared as one stack; if that raises,
        spectrum by spectrum, recording failures."""
        def rows_of(indices: list[int]) -> torch.Tensor:
            rows = torch.empty((len(indices), 1 + self.num_draws, flux.shape[-1]), dtype=torch.float32,
                               device=self.device)
            if self.num_draws:
                for row, i in zip(rows, indices):
                    noise_draws(ids[i], self.seed, self.num_draws, flux.shape[-1], out=row[1:])
            if len(indices) == len(flux):  # all of them: no copy
                return input_rows(flux, ivar, rows).unsqueeze(2)
            chunk_ivar = ivar[indices] if isinstance(ivar, torch.Tensor) else [ivar[i] for i in indices]
            return input_rows(flux[indices], chunk_ivar, rows).unsqueeze(2)

        indices = list(range(len(ids)))
        try:
            return indices, rows_of(indices)
        except Exception:
            prepared = {}
            for i in indices:
                try:
                    prepared[i] = rows_of([i])
                except Exception as exc:
                    failures[i] = exc
            rows = torch.cat(list(prepared.values())) if prepared else flux.new_empty(0)
            return list(prepared), rows

    def _queue_blocks(self, indices: list[int], rows: torch.Tensor) -> torch.Tensor | dict:
        """The network's outputs for all spectra's rows in one stack (still on the device); if
        that raises, each spectrum's alone (a dict by spectrum of outputs or errors), so one bad
        spectrum cannot take down the others."""
        if not indices:
            return {}
        try:
            return self._forward(rows.flatten(0, 1))
        except Exception as exc:
            log.warning("batched forward pass failed (%s); retrying spectrum by spectrum", exc)
            per_block: dict[int, torch.Tensor | BaseException] = {}
            for i, block in zip(indices, rows):
                try:
                    per_block[i] = self._forward(block)
                except Exception as single_exc:
                    per_block[i] = single_exc
            return per_block

    def _summarise_blocks(self, indices: list[int], outputs: torch.Tensor | dict) -> dict[int, tuple | BaseException]:
        """Each spectrum's parameters and raw uncertainties from its block of outputs, unnormalised
        on the host (one copy back per chunk: a GPU is not synchronised between batches)."""
        if isinstance(outputs, torch.Tensor):
            blocks = dict(zip(indices, unnormalise(outputs.cpu(), self.card).split(1 + self.num_draws)))
        else:
            blocks = {i: block if isinstance(block, BaseException) else unnormalise(block.cpu(), self.card)
                      for i, block in outputs.items()}
        outcomes: dict[int, tuple | BaseException] = {}
        for i, block in blocks.items():
            if isinstance(block, BaseException):
                outcomes[i] = block
                continue
            try:
                outcomes[i] = summarise(block[0], block[1:] if self.num_draws else None, self.card)
            except Exception as exc:
                outcomes[i] = exc
        return outcomes

    @torch.inference_mode()
    def _forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Normalised outputs ``(rows, 3)``, on the engine's device, for whole blocks of
        ``1 + num_draws`` rows (clean row first). With a separate draws network the clean rows and the draws go through
        their own networks; each network sees fixed-size passes, so a row's numbers do not depend
        on which rows share its batch."""
        if self.draws_model is self.model or not self.num_draws:
            return self._run(self.model, inputs)
        blocks = inputs.view(-1, 1 + self.num_draws, *inputs.shape[1:])
        clean = self._run(self.model, blocks[:, 0])
        draws = self._run(self.draws_model, blocks[:, 1:].reshape(-1, *inputs.shape[1:]))
        return torch.cat([clean.unsqueeze(1), draws.view(len(blocks), self.num_draws, -1)], 1).flatten(0, 1)

    def _run(self, model: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        """``model`` over ``inputs``, ``batch_size`` rows at a time, on the engine's device."""
        return torch.cat([model(batch).float() for batch in inputs.split(self.batch_size)])


@dataclass
class _Queued:
    """A chunk whose network passes are queued: what :meth:`Estimator._collect` needs."""

    ids: list[str]
    started: float
    failures: dict[int, BaseException]  # spectra whose inputs could not be prepared
    indices: list[int]  # the others, in the order of their blocks of outputs
    outputs: torch.Tensor | dict  # one stack on the device, or by spectrum after a failed stack


def _ivar_through(chunk: np.ndarray | Sequence[np.ndarray], to_tensor) -> torch.Tensor | list[torch.Tensor]:
    """A chunk's ivar through ``to_tensor`` (a host array to a tensor on the device): an ``(n, L)``
    array, or rows of one dtype, as one tensor; rows of several dtypes as one stack per dtype,
    each row a view of its stack, so no row is converted to another precision and each stack
    crosses once."""
    groups = dtype_groups(chunk) if not isinstance(chunk, np.ndarray) else {}
    if len(groups) <= 1:
        return to_tensor(np.asarray(chunk))
    rows: list = [None] * len(chunk)
    for indices in groups.values():
        stack = to_tensor(np.stack([chunk[i] for i in indices]))
        for j, i in enumerate(indices):
            rows[i] = stack[j]
    return rows


def _host_tensor(array) -> torch.Tensor:
    """``array`` as a CPU tensor sharing its memory where its layout allows."""
    return torch.from_numpy(_native(array))


def _native(array) -> np.ndarray:
    """``array`` contiguous in the machine's byte order (FITS data is big-endian), its dtype kept."""
    array = np.asarray(array)
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("="))


def _pinned(array: np.ndarray) -> torch.Tensor:
    """A page-locked copy of ``array``, so its copy to the GPU runs asynchronously."""
    return _host_tensor(array).pin_memory()
