"""Precision plans: which form each heavy layer of the network runs in, on which device.

A *mode* (``engine.precision``: ``exact`` or ``fast``) is a named rule, one entry in
:data:`MODES`. Resolved for a device and a network's sizes it gives a :class:`PrecisionPlan`:
for the clean pass (which gives the reported values) and for the Monte Carlo draws (which give
the spread), the form of every residual-block convolution and of the head's first layer. The
plan is decided once, when the engine is built; the fused network is built from it, its label
is logged, shown in the ``model_info`` metric and written into every record, because records
are bit-identical only under the same plan (``docs/messages.md``). A new mode is one new entry.

No torch at import: the config validates ``engine.precision`` against :data:`MODES` without it.
"""

from __future__ import annotations

from dataclasses import dataclass

CONV_FORMS = ("fft-f32", "direct-f32", "direct-bf16")
"""A residual convolution by FFT (overlap-save, float32), or by direct sums in float32 or in
bfloat16 (float32 accumulation). Reduced precision is for the Monte Carlo draws of the last
:data:`REDUCED_BLOCKS` blocks only, and only where a start-up check at the layer's shape finds
it computes what float32 does to bfloat16's rounding (:mod:`~stream_worker.engine.tuning`):
torch 2.15's CPU bfloat16 convolution on an AMX Xeon computes wrong numbers (~100% relative
error) for 8 input channels and kernel widths 8, 12 and 16. Correct bfloat16 convolutions move
the trained demonstration model's uncertainties by a median 0.3-0.5% in its last blocks."""

REDUCED_FORMS = ("direct-bf16", "bf16")
"""The forms that round to bfloat16: each is checked against float32 before it is used."""

HEAD_FORMS = ("f32", "bf16")
"""The dense head's first layer (65536 x 1024 in APOGEENet III) in float32 or bfloat16."""

# Where the FFT pays on a CPU (measured per residual block, 16-row passes, 2-core AVX-512 EPYC): every
# residual block of the full-size network, from 4->8 channels (0.25 vs 0.32 ms per row) to the last
# block (3.0 vs 7.5 ms per row; 4.1 in direct bfloat16). Short kernels and narrow channels stay direct.
FFT_MIN_TAPS = 16
FFT_MIN_CHANNEL_PRODUCT = 32
REDUCED_BLOCKS = 2
"""Reduced precision may touch only the last residual blocks' convolutions (~95% of their
arithmetic in APOGEENet III): in all blocks it moved the demonstration model's uncertainties 1.4-1.8%."""


@dataclass(frozen=True)
class NetworkForm:
    """How one fused network computes: ``convs`` holds the form of each residual block's two
    convolutions in order (block 0 conv1, block 0 conv2, block 1 conv1, ...)."""

    convs: tuple[str, ...]
    head: str = "f32"

    def __post_init__(self) -> None:
        unknown = [form for form in self.convs if form not in CONV_FORMS] + \
            ([self.head] if self.head not in HEAD_FORMS else [])
        if unknown:
            raise ValueError(f"unknown layer forms {unknown}: convolutions take {CONV_FORMS}, the head {HEAD_FORMS}")

    def label(self) -> str:
        """Runs of equal forms compressed: ``convs direct-f32x2,fft-f32x6 head bf16``."""
        runs: list[list] = []
        for form in self.convs:
            if runs and runs[-1][0] == form:
                runs[-1][1] += 1
            else:
                runs.append([form, 1])
        return f"convs {','.join(f'{form}x{count}' for form, count in runs)} head {self.head}"


@dataclass(frozen=True)
class PrecisionPlan:
    """A mode resolved for one device type and one network."""

    mode: str
    device_type: str
    clean: NetworkForm
    draws: NetworkForm
    tf32: bool = False

    def apply(self) -> None:
        """Sets torch's process-wide TF32 switches to the plan's: torch leaves cuDNN's TF32
        convolutions on by default, so on Ampere and Hopper "float32" would otherwise round
        inputs to 10 mantissa bits. The clean pass is exact in every mode, so no mode turns it on."""
        import torch

        torch.backends.cuda.matmul.allow_tf32 = self.tf32
        torch.backends.cudnn.allow_tf32 = self.tf32

    @property
    def label(self) -> str:
        """What records and the ``model_info`` metric carry, e.g.
        ``exact/cpu clean=draws: convs fft-f32x8 head f32``."""
        if self.draws == self.clean:
            return f"{self.mode}/{self.device_type} clean=draws: {self.clean.label()}"
        return f"{self.mode}/{self.device_type} clean: {self.clean.label()}; draws: {self.draws.label()}"


@dataclass(frozen=True)
class PrecisionMode:
    """A named rule. ``reduced_draws``: the Monte Carlo draws may run the head's first layer, and
    (where measured faster and found correct) the last blocks' convolutions, in bfloat16; the
    clean pass never does, so the reported values are the exact mode's, bit for bit. The fixed
    rules reduce only the head: a reduced convolution is used only after its start-up check."""

    name: str
    description: str
    reduced_draws: bool

    def plan(self, device_type: str, channels: tuple[int, ...], kernel_size: int, fft: bool = True) -> PrecisionPlan:
        """The fixed-rule plan for a network of these sizes on ``device_type`` (``cpu``, ``cuda``):
        FFT where it was measured to pay on a 2-core EPYC (CPUs only, and ``fft``), else direct."""
        use_fft = fft and device_type == "cpu"

        def form(in_channels: int, out_channels: int) -> str:
            fits = kernel_size >= FFT_MIN_TAPS and in_channels * out_channels >= FFT_MIN_CHANNEL_PRODUCT
            return "fft-f32" if use_fft and fits else "direct-f32"

        convs = tuple(f for c_in, c_out in zip(channels, channels[1:]) for f in (form(c_in, c_out), form(c_out, c_out)))
        clean = NetworkForm(convs, "f32")
        return PrecisionPlan(self.name, device_type, clean, NetworkForm(convs, "bf16") if self.reduced_draws else clean)

    def choices(self, channels: tuple[int, ...], fft: bool = True, reduced: bool = False) -> tuple[list, tuple]:
        """The forms this mode allows each convolution (in order) and the head, for the clean
        network or (``reduced``) the draws network: what a measurement may choose between."""
        base = ("fft-f32", "direct-f32") if fft else ("direct-f32",)
        blocks = len(channels) - 1
        reduce = reduced and self.reduced_draws
        convs = [base + (("direct-bf16",) if reduce and block >= blocks - REDUCED_BLOCKS else ())
                 for block in range(blocks) for _ in (1, 2)]
        return convs, (("f32", "bf16") if reduce else ("f32",))

    def check(self, plan: PrecisionPlan, channels: tuple[int, ...], fft: bool = True) -> PrecisionPlan:
        """``plan`` if this mode allows it for this network (a pinned ``engine.kernels``), else a
        ValueError saying which layer breaks the mode."""
        if plan.mode != self.name:
            raise ValueError(f"the plan is for precision {plan.mode!r}, the engine runs {self.name!r}")
        for part, form, reduced in (("clean", plan.clean, False), ("draws", plan.draws, True)):
            convs, heads = self.choices(channels, fft, reduced)
            if len(form.convs) != len(convs):
                raise ValueError(f"the plan's {part} network has {len(form.convs)} convolutions, the network {len(convs)}")
            for i, (chosen, allowed) in enumerate(zip(form.convs, convs)):
                if chosen not in allowed:
                    raise ValueError(f"{part} convolution {i}: {chosen!r} is not allowed in {self.name} mode "
                                     f"(allowed: {', '.join(allowed)})")
            if form.head not in heads:
                raise ValueError(f"{part} head: {form.head!r} is not allowed in {self.name} mode")
        return plan


MODES = {
    mode.name: mode
    for mode in (
        PrecisionMode("exact", "every layer in float32 (TF32 off on GPUs): within float32 rounding of the "
                               "reference loop", reduced_draws=False),
        PrecisionMode("fast", "the clean pass as in exact mode; the Monte Carlo draws with the head's first "
                              "layer, and the last blocks' convolutions where faster and checked, in bfloat16",
                      reduced_draws=True),
    )
}


def parse_form(text: str) -> NetworkForm:
    """The inverse of :meth:`NetworkForm.label`."""
    words = text.split()
    if len(words) != 4 or words[0] != "convs" or words[2] != "head":
        raise ValueError(f"not a network form: {text!r} (expected 'convs FORMxN,... head FORM')")
    convs: list[str] = []
    for run in words[1].split(","):
        form, _, count = run.rpartition("x")
        if not form or not count.isdigit():
            raise ValueError(f"not a run of convolution forms: {run!r} (expected FORMxN)")
        convs += [form] * int(count)
    return NetworkForm(tuple(convs), words[3])


def parse_plan(label: str) -> PrecisionPlan:
    """The inverse of :attr:`PrecisionPlan.label`: a plan as logged, shown in ``model_info`` and
    written in records, to pin with ``engine.kernels``."""
    head, _, body = label.partition(" ")
    mode, _, device_type = head.partition("/")
    if not mode or not device_type:
        raise ValueError(f"not a precision plan: {label!r} (expected 'MODE/DEVICE clean...')")
    if body.startswith("clean=draws: "):
        form = parse_form(body[len("clean=draws: "):])
        return PrecisionPlan(mode, device_type, form, form)
    clean, sep, draws = body.partition("; draws: ")
    if not clean.startswith("clean: ") or not sep:
        raise ValueError(f"not a precision plan: {label!r} (expected 'clean: ...; draws: ...')")
    return PrecisionPlan(mode, device_type, parse_form(clean[len("clean: "):]), parse_form(draws))


def precision_mode(name: str) -> PrecisionMode:
    """The mode called ``name``, or a ValueError that lists the known ones."""
    try:
        return MODES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown precision {name!r}: choose one of {', '.join(MODES)}") from None
