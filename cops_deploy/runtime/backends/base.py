"""The backend contract: one bundle graph behind one runner interface, as Polygraphy's runners.

A backend is context-managed (``with backend:`` activates and deactivates it), publishes
``input_metadata`` (name -> :class:`~cops_deploy.runtime.manifest.TensorSpec`, from the bundle
manifest), and ``infer(feed)`` takes and returns ``{name: numpy array}``. The feed is checked
once, here in the base class (names, dtype, rank, fixed dims, agreement of named dims such as
the batch), so subclasses only run the graph; ``last_inference_time`` holds the seconds the
latest call spent in the graph. Calls are serialised with a lock unless the subclass declares
``thread_safe``. An exception of the backend's own (anything but a :class:`CopsError`) raised
while activating or running is re-raised as a :class:`BackendError` naming the graph and the
backend, with the original chained as its cause.

A backend class also says, as class methods, whether it can run a bundle here without importing
its package (:meth:`Backend.unavailable_reason`) and how to open the bundle's vision and head
graphs as a pair (:meth:`Backend.open_pair`); the registry (:mod:`.registry`) uses both.
"""

from __future__ import annotations

import abc
import importlib.util
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any, ClassVar

import numpy as np

from cops_deploy.errors import BackendError, BundleError, ConfigError, CopsError
from cops_deploy.runtime.bundle import Bundle
from cops_deploy.runtime.contract import GRAPH_IO_NAMES
from cops_deploy.runtime.manifest import GraphIO, TensorSpec

__all__ = [
    "Backend",
    "activate_pair",
    "check_graph_names",
    "check_io_names",
    "check_threads",
    "graph_io",
]


def _spec_text(spec: TensorSpec) -> str:
    """'image float32[batch, 3, 518, 518]'."""
    return f"{spec.name} {spec.dtype}[{', '.join(str(d) for d in spec.shape)}]"


def graph_io(bundle: Bundle, graph: str) -> GraphIO:
    """The manifest entry of ``graph`` ('vision' or 'head'); BundleError naming those present."""
    graphs = bundle.manifest.graphs
    if graph not in graphs:
        raise BundleError(
            f"bundle {bundle.root} has no graph {graph!r} in manifest.graphs; graphs present: "
            f"{sorted(graphs)}. Valid: a bundle written by cops-export (graphs 'vision' and "
            f"'head'). Fix: re-export the bundle."
        )
    return graphs[graph]


def check_graph_names(bundle: Bundle, graph: str) -> GraphIO:
    """``graph_io`` plus the contract's tensor names (:data:`GRAPH_IO_NAMES`) for ``graph``."""
    io = graph_io(bundle, graph)
    want_in, want_out = GRAPH_IO_NAMES[graph]
    got_in = tuple(s.name for s in io.inputs)
    got_out = tuple(s.name for s in io.outputs)
    if sorted(got_in) != sorted(want_in) or not set(want_out) <= set(got_out):
        raise BundleError(
            f"bundle {bundle.root}: graph {graph!r} has inputs {list(got_in)} and outputs "
            f"{list(got_out)}; valid: inputs {list(want_in)} and outputs including "
            f"{list(want_out)}. Fix: re-export the bundle with this version's cops-export."
        )
    return io


def check_io_names(
    what: str, path: Path, graph: GraphIO, inputs: Sequence[str], outputs: Sequence[str]
) -> None:
    """Refuse a loaded graph (``what`` at ``path``: an ONNX file, an engine) unless it has the
    manifest's input names and produces its output names: BundleError naming both sides."""
    want_in = sorted(s.name for s in graph.inputs)
    want_out = sorted(s.name for s in graph.outputs)
    if sorted(inputs) != want_in or not set(want_out) <= set(outputs):
        raise BundleError(
            f"{what} {path} has inputs {sorted(inputs)} and outputs {sorted(outputs)}, but the "
            f"manifest lists inputs {want_in} and outputs {want_out} (file and manifest "
            f"disagree). Fix: re-export the bundle with cops-export."
        )


def check_threads(threads: int | None) -> int | None:
    """``threads`` as given when None or an integer >= 1; ConfigError otherwise."""
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ConfigError(
            f"invalid threads={threads!r}; valid: None (the runtime's default: one per core) "
            f"or an integer >= 1. Fix: pass e.g. threads=2."
        )
    return threads


class Backend(abc.ABC):
    """One graph behind the shared runner contract (see the module docstring).

    Subclasses implement ``_activate``, ``_deactivate`` and ``_infer`` (which receives a feed
    already checked against ``input_metadata`` and returns at least every output name), and
    the class method :meth:`open_pair`. Class attributes:

    - ``kind``: the backend's registered name ('onnxruntime', 'torch', ...).
    - ``thread_safe``: True when concurrent ``_infer`` calls need no lock.
    - ``precisions``: the precisions :meth:`open_pair` accepts (the vision graph's).
    - ``required_modules`` and ``install_hint``: the packages the backend imports on
      activation, and the command that installs them (used by :meth:`unavailable_reason`).
    """

    kind: ClassVar[str] = "backend"
    thread_safe: ClassVar[bool] = False
    precisions: ClassVar[tuple[str, ...]] = ("fp32",)
    required_modules: ClassVar[tuple[str, ...]] = ()
    install_hint: ClassVar[str] = ""

    def __init__(
        self, name: str, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]
    ) -> None:
        self.name = name
        self._inputs = {spec.name: spec for spec in inputs}
        self._outputs = tuple(spec.name for spec in outputs)
        self._lock = threading.Lock()
        self.is_active = False
        self.last_inference_time: float | None = None

    # -- what the registry asks of a backend class ---------------------------------------------

    @classmethod
    def unavailable_reason(cls, bundle: Bundle) -> str | None:
        """Why this backend cannot run ``bundle`` here, found without importing its packages;
        None when it is worth trying. The default checks ``required_modules`` are installed."""
        for module in cls.required_modules:
            if importlib.util.find_spec(module) is None:
                return f"{module} is not installed ({cls.install_hint})"
        return None

    @classmethod
    @abc.abstractmethod
    def open_pair(
        cls, bundle: Bundle, *, threads: int | None = None, precision: str = "fp32"
    ) -> tuple[Backend, Backend]:
        """The bundle's vision and head graphs on this backend, both active (or an error and
        neither: see :func:`activate_pair`). ``precision`` is one of :attr:`precisions` and
        applies to the vision graph; ``threads`` is a hint a backend may ignore."""

    # -- metadata ------------------------------------------------------------------------------

    @property
    def input_metadata(self) -> Mapping[str, TensorSpec]:
        """Input name -> spec (dtype name; shape with ints for fixed dims, names for dynamic)."""
        return MappingProxyType(self._inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        """Names of the outputs ``infer`` returns, in manifest order."""
        return self._outputs

    @property
    def provider(self) -> str:
        """What actually runs the graph (e.g. 'CPUExecutionProvider', a GPU name, 'cpu')."""
        return self.kind

    @property
    def max_batch(self) -> int | None:
        """Largest batch this backend accepts; None when the batch dimension is unbounded."""
        first = next(iter(self._inputs.values()), None)
        if first is not None and first.shape and isinstance(first.shape[0], int):
            return first.shape[0]
        return None

    def __repr__(self) -> str:
        state = "active" if self.is_active else "inactive"
        return f"{type(self).__name__}(name={self.name!r}, {state})"

    # -- lifecycle -----------------------------------------------------------------------------

    def activate(self) -> None:
        """Load the graph (sessions, engines, device buffers); CopsError if already active."""
        if self.is_active:
            raise CopsError(
                f"backend {self.name!r} ({self.kind}) is already active. Fix: activate it once "
                f"(`with backend:` does it for you), or deactivate() it first."
            )
        try:
            self._activate()
        except CopsError:
            raise
        except Exception as exc:  # the backend's own types (pybind11, RuntimeError, ...)
            raise BackendError(
                f"backend {self.kind!r} cannot load graph {self.name!r} "
                f"({type(exc).__name__}: {exc}). Fix: open the bundle again with verification "
                f"(Detector.open(path)), re-export it if it is refused, or pass another backend."
            ) from exc
        self.is_active = True

    def deactivate(self) -> None:
        """Release everything ``activate`` acquired; a no-op when not active."""
        if not self.is_active:
            return
        try:
            self._deactivate()
        finally:
            self.is_active = False

    def __enter__(self) -> Backend:
        self.activate()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.deactivate()

    # -- inference -----------------------------------------------------------------------------

    def infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the graph on ``feed`` (input name -> array); returns output name -> array.

        Raises:
            CopsError: the backend is not active.
            ConfigError: ``feed`` does not match ``input_metadata`` (the message names the
                input, what was given and what is valid).
            BundleError: the graph did not return an output the manifest lists.
        """
        if not self.is_active:
            raise CopsError(
                f"backend {self.name!r} ({self.kind}) is not active. Fix: use it as "
                f"`with backend: backend.infer(feed)`, or call activate() first."
            )
        arrays = self.check_feed(feed)
        if self.thread_safe:
            outputs, seconds = self._timed_infer(arrays)
        else:
            with self._lock:
                outputs, seconds = self._timed_infer(arrays)
        self.last_inference_time = seconds
        missing = [n for n in self._outputs if n not in outputs]
        if missing:
            raise BundleError(
                f"backend {self.name!r} ({self.kind}) did not return output(s) {missing} that "
                f"the manifest lists; it returned {sorted(outputs)}. Fix: re-export the bundle."
            )
        return {n: outputs[n] for n in self._outputs}

    def _timed_infer(self, feed: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], float]:
        start = time.perf_counter()
        try:
            outputs = self._infer(feed)
        except CopsError:
            raise
        except Exception as exc:  # the backend's own types (pybind11, RuntimeError, MemoryError)
            shapes = ", ".join(f"{k} {v.dtype}{list(v.shape)}" for k, v in feed.items())
            raise BackendError(
                f"backend {self.kind!r} failed to run graph {self.name!r} on {shapes} "
                f"({type(exc).__name__}: {exc}). Fix: retry with a smaller batch if memory ran "
                f"out; otherwise open the bundle again with verification, or pass another "
                f"backend."
            ) from exc
        return outputs, time.perf_counter() - start

    def check_feed(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Validate ``feed`` against ``input_metadata``; returns C-contiguous arrays in order."""
        expected = ", ".join(_spec_text(s) for s in self._inputs.values())
        if not isinstance(feed, Mapping):
            raise ConfigError(
                f"feed for backend {self.name!r} is a {type(feed).__name__}; valid: a dict of "
                f"input name -> numpy array ({expected}). Fix: pass {{name: array}}."
            )
        missing = [n for n in self._inputs if n not in feed]
        unexpected = sorted(str(n) for n in feed if n not in self._inputs)
        if missing or unexpected:
            raise ConfigError(
                f"feed for backend {self.name!r} has missing input(s) {missing} and unexpected "
                f"input(s) {unexpected}; valid inputs: {expected}. Fix: feed exactly those names."
            )
        bound: dict[str, tuple[str, int]] = {}  # dim name -> (input that set it, size)
        return {
            name: self._check_array(feed[name], spec, bound) for name, spec in self._inputs.items()
        }

    def _check_array(
        self, value: Any, spec: TensorSpec, bound: dict[str, tuple[str, int]]
    ) -> np.ndarray:
        what = f"input {spec.name!r} of backend {self.name!r}"
        valid = _spec_text(spec)
        if not isinstance(value, np.ndarray):
            raise ConfigError(
                f"{what} is a {type(value).__name__}; valid: a numpy array {valid}. "
                f"Fix: numpy.asarray(x, dtype=numpy.{spec.dtype})."
            )
        if value.dtype.name != spec.dtype:
            raise ConfigError(
                f"{what} has dtype {value.dtype.name}; valid: {valid}. "
                f"Fix: x.astype(numpy.{spec.dtype})."
            )
        if value.ndim != len(spec.shape):
            raise ConfigError(
                f"{what} has shape {value.shape} (rank {value.ndim}); valid: rank "
                f"{len(spec.shape)}, {valid}. Fix: add or remove the batch axis."
            )
        for axis, (dim, size) in enumerate(zip(spec.shape, value.shape, strict=True)):
            if isinstance(dim, int):
                if size != dim:
                    raise ConfigError(
                        f"{what} has shape {value.shape}: axis {axis} is {size}, valid: {dim} "
                        f"({valid}). Fix: preprocess to the bundle's size."
                    )
                continue
            if size < 1:
                raise ConfigError(
                    f"{what} has shape {value.shape}: axis {axis} ({dim!r}) is {size}; valid: "
                    f">= 1. Fix: feed at least one item."
                )
            other = bound.setdefault(dim, (spec.name, size))
            if other[1] != size:
                raise ConfigError(
                    f"{what} has {dim!r} = {size} (axis {axis}) but input {other[0]!r} has "
                    f"{dim!r} = {other[1]}; valid: equal sizes. Fix: feed arrays of one batch."
                )
        return np.ascontiguousarray(value)

    # -- what subclasses implement -------------------------------------------------------------

    @abc.abstractmethod
    def _activate(self) -> None: ...

    @abc.abstractmethod
    def _deactivate(self) -> None: ...

    @abc.abstractmethod
    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def activate_pair(
    vision: Backend, make_head: Callable[[Backend], Backend]
) -> tuple[Backend, Backend]:
    """Activate ``vision``, then the head backend ``make_head(vision)`` gives (it may share
    what the vision backend loaded); returns both active, or raises with neither active."""
    vision.activate()
    try:
        head = make_head(vision)
        head.activate()
    except BaseException:
        vision.deactivate()
        raise
    return vision, head
