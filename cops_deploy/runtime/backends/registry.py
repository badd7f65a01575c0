"""The backend registry: which backends exist, in which order auto selection tries them, and
opening a bundle's two graphs on one of them.

Built-in backends register here in code: TensorRT, ONNX Runtime, OpenVINO (the auto order).
Plug-ins come after them, in name order: each is an entry point of the group
``cops_deploy.backends`` whose name is the backend name and whose value is a
:class:`~cops_deploy.runtime.backends.base.Backend` subclass, e.g. in a ``pyproject.toml``::

    [project.entry-points."cops_deploy.backends"]
    torch = "cops_deploy.export.torch_backend:TorchBackend"

A plug-in is imported only when it is asked for, or when auto selection reaches it; one that
cannot be imported (a missing package) is reported with the reason and an install hint.
"""

from __future__ import annotations

import logging
from importlib import metadata

from cops_deploy.errors import BundleError, ConfigError, CopsError, MissingDependencyError
from cops_deploy.extras import BUILD_INSTALL
from cops_deploy.runtime.backends.base import Backend, check_threads
from cops_deploy.runtime.backends.onnxruntime import ORT_INSTALL, OnnxRuntimeBackend
from cops_deploy.runtime.backends.openvino import OpenVinoBackend
from cops_deploy.runtime.backends.tensorrt import TRT_INSTALL, TensorRTBackend
from cops_deploy.runtime.bundle import Bundle

__all__ = [
    "AUTO",
    "ENTRY_POINT_GROUP",
    "REGISTRY",
    "BackendRegistry",
    "backend_names",
    "check_backend_choice",
    "get_backend",
    "open_backends",
    "register_backend",
]

AUTO = "auto"
ENTRY_POINT_GROUP = "cops_deploy.backends"
_LOG = logging.getLogger(__name__)


class BackendRegistry:
    """Backend classes by name: those registered in code (in auto order), then the plug-ins of
    the entry-point group ``group`` (discovered on each call, imported when first needed).

    The process-wide registry is :data:`REGISTRY`; the module's functions are its methods.
    """

    def __init__(self, group: str = ENTRY_POINT_GROUP) -> None:
        self.group = group
        self._registered: dict[str, type[Backend]] = {}

    def register(self, cls: type[Backend]) -> type[Backend]:
        """Register ``cls`` under its ``kind``, after those already registered (auto order);
        returns ``cls``, so it works as a class decorator. Registering a class again is a no-op.

        Raises:
            ConfigError: ``cls`` is not a Backend subclass, its kind is not a plain name, or
                another class is registered under that name.
        """
        if not (isinstance(cls, type) and issubclass(cls, Backend)):
            raise ConfigError(
                f"cannot register {cls!r} as a backend; valid: a subclass of "
                f"cops_deploy.runtime.backends.Backend. Fix: derive it from Backend."
            )
        name = cls.kind
        if not isinstance(name, str) or not name.replace("_", "").isalnum() or name == AUTO:
            raise ConfigError(
                f"backend class {cls.__name__} has kind {name!r}; valid: a plain name such as "
                f"'mybackend' (letters, digits, '_'; not {AUTO!r}). Fix: set its class attribute "
                f"kind."
            )
        other = self._registered.get(name)
        if other is not None and other is not cls:
            raise ConfigError(
                f"backend name {name!r} is already registered by {other.__module__}."
                f"{other.__qualname__}; cannot register {cls.__module__}.{cls.__qualname__} "
                f"too. Fix: give the new class another kind."
            )
        self._registered[name] = cls
        return cls

    def plugins(self) -> dict[str, metadata.EntryPoint]:
        """The group's entry points by name, in name order; one whose name a registered backend
        (or an earlier entry point) already has is ignored, with a warning."""
        found: dict[str, metadata.EntryPoint] = {}
        for ep in sorted(metadata.entry_points(group=self.group), key=lambda e: e.name):
            if ep.name in self._registered or ep.name in found:
                _LOG.warning(
                    "ignoring backend plug-in %s = %r: the name %r is already taken",
                    ep.name,
                    ep.value,
                    ep.name,
                )
                continue
            found[ep.name] = ep
        return found

    def names(self) -> tuple[str, ...]:
        """Every backend name, in auto order: those registered in code, then the plug-ins."""
        return (*self._registered, *self.plugins())

    def get(self, name: str) -> type[Backend]:
        """The backend class registered as ``name`` (a plug-in is imported here).

        Raises:
            ConfigError: no backend has that name (the message lists the registered ones), or
                the plug-in does not name a Backend subclass whose kind is ``name``.
            MissingDependencyError: the plug-in cannot be imported (the message gives the
                reason and an install hint).
        """
        if isinstance(name, str) and name in self._registered:
            return self._registered[name]
        plugins = self.plugins()
        if not isinstance(name, str) or name not in plugins:
            valid = ", ".join(repr(n) for n in (AUTO, *self._registered, *plugins))
            raise ConfigError(
                f"unknown backend {name!r}; valid: {valid}. Fix: pass one of those, or install "
                f"the package whose plug-in provides it (entry-point group {self.group!r})."
            )
        return self._load(plugins[name])

    def _load(self, ep: metadata.EntryPoint) -> type[Backend]:
        """Import the class the entry point names and check it is a Backend of that kind."""
        try:
            cls = ep.load()
        except ImportError as exc:
            raise MissingDependencyError(
                f"backend {ep.name!r} (plug-in {ep.value}) cannot be imported: {exc}. Fix: "
                f"{_install_hint(ep, exc)}, or pass another backend: "
                f"{', '.join(self._registered)}."
            ) from exc
        except AttributeError as exc:
            raise ConfigError(
                f"backend plug-in {ep.name!r} names {ep.value!r}, which does not exist ({exc}). "
                f"Fix: reinstall the package that declares it, or correct its entry point."
            ) from exc
        if not (isinstance(cls, type) and issubclass(cls, Backend)):
            raise ConfigError(
                f"backend plug-in {ep.name!r} names {ep.value!r}, a {type(cls).__name__}; "
                f"valid: a subclass of cops_deploy.runtime.backends.Backend. Fix: correct its "
                f"entry point."
            )
        if cls.kind != ep.name:
            raise ConfigError(
                f"backend plug-in {ep.name!r} names {ep.value!r}, whose kind is {cls.kind!r}; "
                f"valid: kind == the entry point's name. Fix: rename one of them to match."
            )
        return cls

    def check_choice(
        self, backend: str, precision: str = "fp32", threads: int | None = None
    ) -> type[Backend] | None:
        """Check the arguments of :meth:`open` before any bundle is read; returns the backend
        class, or None for 'auto'.

        Raises:
            ConfigError: an unknown backend or precision, a precision the backend does not run
                (auto runs fp32 only), or invalid ``threads``.
            MissingDependencyError: the backend is a plug-in that cannot be imported.
        """
        cls = None if backend == AUTO else self.get(backend)
        check_threads(threads)
        supports = {name: c.precisions for name, c in self._registered.items()}
        if cls is not None:
            supports[cls.kind] = cls.precisions
        known = sorted({p for ps in supports.values() for p in ps})
        if precision not in known:
            raise ConfigError(
                f"unknown precision {precision!r}; valid: {known}. Fix: pass one of those."
            )
        if precision not in (cls.precisions if cls is not None else ("fp32",)):
            runs_on = [f"backend={n!r}" for n, ps in supports.items() if precision in ps]
            raise ConfigError(
                f"precision={precision!r} runs on {' or '.join(runs_on)} only (got "
                f"backend={backend!r}). Fix: pass {runs_on[0]}, or precision='fp32'."
            )
        return cls

    def open(
        self,
        bundle: Bundle,
        backend: str = AUTO,
        *,
        threads: int | None = None,
        precision: str = "fp32",
    ) -> tuple[Backend, Backend, dict[str, str]]:
        """The bundle's vision and head graphs, active, on ``backend``; and, for 'auto', why
        each backend tried before the chosen one was passed over (name -> reason).

        'auto' tries :meth:`names` in order: a backend is skipped when its class says it cannot
        run the bundle here (:meth:`Backend.unavailable_reason`), when its plug-in cannot be
        imported, or when opening it raises a typed refusal (:class:`CopsError`).

        Raises:
            ConfigError, MissingDependencyError: see :meth:`check_choice`; also the explicit
                backend's own refusals.
            BundleError: the explicit backend does not fit the bundle; or (auto) no backend can
                run it (the message gives each backend's reason).
        """
        cls = self.check_choice(backend, precision, threads)
        if cls is not None:
            vision, head = cls.open_pair(bundle, threads=threads, precision=precision)
            return vision, head, {}
        skipped: dict[str, str] = {}
        for name in self.names():
            try:
                candidate = self.get(name)
                reason = candidate.unavailable_reason(bundle)
                if reason is None:
                    vision, head = candidate.open_pair(bundle, threads=threads, precision=precision)
                    return vision, head, skipped
            except CopsError as exc:  # a typed refusal: engine key, missing package, plug-in...
                reason = str(exc)
            skipped[name] = reason
        reasons = "; ".join(f"{k}: {v}" for k, v in skipped.items())
        raise BundleError(
            f"no backend can run bundle {bundle.root}: {reasons}. Fix: {ORT_INSTALL} (the "
            f"portable backend), or {TRT_INSTALL} on an NVIDIA machine."
        )


def _install_hint(ep: metadata.EntryPoint, exc: ImportError) -> str:
    """What to install when the plug-in ``ep`` raised ``exc`` on import."""
    missing = (exc.name or "").split(".")[0]
    if missing and ep.module.startswith("cops_deploy."):  # our own plug-ins: the build side
        return BUILD_INSTALL
    if missing and missing != ep.module.split(".")[0]:
        return f"install the package that provides {missing!r} (usually `pip install {missing}`)"
    dist = ep.dist.name if ep.dist is not None else "the package that declares the plug-in"
    return f"reinstall {dist} (its plug-in module {ep.module!r} does not import)"


REGISTRY = BackendRegistry()
for _builtin in (TensorRTBackend, OnnxRuntimeBackend, OpenVinoBackend):
    REGISTRY.register(_builtin)

register_backend = REGISTRY.register
backend_names = REGISTRY.names
get_backend = REGISTRY.get
check_backend_choice = REGISTRY.check_choice
open_backends = REGISTRY.open
