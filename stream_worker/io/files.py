"""Spectra referenced by input messages, read from shared storage, but only under the data roots."""

from __future__ import annotations

import os
from pathlib import Path

from stream_worker.core.spectrum import InputError, Spectrum
from stream_worker.io.apstar import read_apstar_spectra
from stream_worker.io.wire import FileReference


class FileReader:
    """Reads referenced apStar spectra, but only from under the configured data roots."""

    def __init__(self, data_roots: list[str]) -> None:
        self.roots = [Path(os.path.realpath(os.path.expandvars(root))) for root in data_roots]

    def read(self, reference: FileReference) -> Spectrum:
        if not self.roots:
            raise InputError("path_not_allowed", "file references are disabled: inputs.data_roots is empty")
        try:
            resolved = Path(os.path.realpath(reference.path))
        except (ValueError, OSError) as exc:  # NUL bytes, over-long names
            raise InputError("invalid_field", f"unusable path {reference.path!r}: {exc}") from None
        if not any(resolved == root or root in resolved.parents for root in self.roots):
            raise InputError(
                "path_not_allowed",
                f"{reference.path} is outside the allowed data roots ({', '.join(map(str, self.roots))})",
            )
        try:
            (spectrum,) = read_apstar_spectra(resolved, [reference.which])
        except OSError as exc:  # e.g. a path component longer than the filesystem allows
            raise InputError("missing_file", f"{reference.path}: {exc}") from None
        for name, value in reference.header.items():
            if value is not None:
                setattr(spectrum, name, value)
        return spectrum
