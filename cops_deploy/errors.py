"""Typed exceptions shared by the build side and the torch-free run side."""

from __future__ import annotations


class CopsError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(CopsError, ValueError):
    """An unknown architecture name or an invalid configuration value."""


class WeightsError(CopsError):
    """A weight file that cannot be read, or whose keys or shapes do not fit the model."""


class ImageReadError(CopsError):
    """An input image that cannot be read or converted (names the file).

    ``reason`` is a short machine-readable code for the kind of failure (e.g. ``"empty"``,
    ``"symlink_loop"``, ``"too_many_pixels"``; the list is in ``cops_deploy.imaging.decode``),
    recorded with each failure in ``cops predict``'s results and mapped to HTTP by the service.
    """

    def __init__(self, message: str, reason: str = "unreadable") -> None:
        super().__init__(message)
        self.reason = reason


class BundleError(CopsError):
    """A deployment bundle that is missing, tampered with, truncated or mismatched."""


class BackendError(CopsError):
    """A backend (ONNX Runtime, OpenVINO, TensorRT, a plug-in) failed to load or run a graph with
    an error of its own; the message names the graph and backend, the cause is chained."""


class DatasetError(CopsError):
    """A dataset root or file that does not have the expected layout."""


class MissingDependencyError(CopsError, ImportError):
    """An optional package is needed for this feature; the message gives the install command."""


class ExportError(CopsError):
    """An export step (ONNX export, ONNX check, engine build) failed; the message names it."""


class ParityError(ExportError):
    """An exported graph's measured parity with PyTorch exceeds its precision's tolerance (the
    message names the output, the difference and the tolerance)."""


class EngineBuildError(ExportError):
    """TensorRT could not parse the ONNX graph or build the engine (the message says which)."""


class TrainingError(CopsError):
    """Training cannot go on (a loss that is not finite)."""
