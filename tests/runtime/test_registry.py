"""The backend registry: built-ins in auto order, plug-ins from the entry-point group (a fake one
through a monkeypatched ``importlib.metadata.entry_points``), and one test per refusal."""

from __future__ import annotations

import importlib.metadata
import sys
import types
from pathlib import Path
from typing import ClassVar

import pytest
from cops_tiny_bundle import rng_images

from cops_deploy.errors import BundleError, ConfigError, MissingDependencyError
from cops_deploy.runtime.backends import (
    ENTRY_POINT_GROUP,
    Backend,
    BackendRegistry,
    OnnxRuntimeBackend,
    backend_names,
    get_backend,
    open_backends,
)
from cops_deploy.runtime.bundle import Bundle
from cops_deploy.runtime.detector import Detector

BUILT_IN = ("tensorrt", "onnxruntime", "openvino")
PLUGIN_MODULE = "cops_fake_backend_plugin"
REAL_ENTRY_POINTS = importlib.metadata.entry_points


class FakeBackend(OnnxRuntimeBackend):
    """A plug-in backend: ONNX Runtime under another name, that says it cannot run when told."""

    kind = "fake"
    reason: ClassVar[str | None] = None

    @classmethod
    def unavailable_reason(cls, bundle: Bundle) -> str | None:
        return cls.reason


class MisnamedBackend(FakeBackend):
    kind = "other"


@pytest.fixture
def plugins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """``plugins(name=value, ...)``: entry points added to the group, beside the installed ones;
    their module ``cops_fake_backend_plugin`` holds FakeBackend and friends."""
    module = types.ModuleType(PLUGIN_MODULE)
    module.FakeBackend = FakeBackend  # type: ignore[attr-defined]
    module.MisnamedBackend = MisnamedBackend  # type: ignore[attr-defined]
    module.not_a_class = 42  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, PLUGIN_MODULE, module)
    # A plug-in module that needs a package which is not installed.
    (tmp_path / "cops_needs_sdk_plugin.py").write_text("import fancy_accelerator_sdk_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(FakeBackend, "reason", None)

    def add(**values: str) -> None:
        extra = [importlib.metadata.EntryPoint(n, v, ENTRY_POINT_GROUP) for n, v in values.items()]

        def entry_points(**selection):
            found = list(REAL_ENTRY_POINTS(**selection))
            return found + extra if selection.get("group") == ENTRY_POINT_GROUP else found

        monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)

    return add


def _pretend_missing(monkeypatch: pytest.MonkeyPatch, *kinds: str) -> None:
    for kind in kinds:
        missing = classmethod(lambda cls, bundle: "pretend it is missing")
        monkeypatch.setattr(get_backend(kind), "unavailable_reason", missing)


# ----------------------------------------------------------------------------------------------
# The installed registry


def test_auto_order_is_built_ins_then_the_torch_plug_in() -> None:
    assert backend_names() == (*BUILT_IN, "torch")
    torch_backend = get_backend("torch")  # through the entry point in pyproject.toml
    assert torch_backend.__module__ == "cops_deploy.export.torch_backend"
    assert issubclass(torch_backend, Backend) and torch_backend.kind == "torch"
    assert get_backend("onnxruntime") is OnnxRuntimeBackend


def test_unknown_backend_lists_the_registered_ones(plugins) -> None:
    plugins(fake=f"{PLUGIN_MODULE}:FakeBackend")
    with pytest.raises(
        ConfigError,
        match="unknown backend 'tflite'; valid: 'auto', 'tensorrt', 'onnxruntime', 'openvino', "
        "'fake', 'torch'.*entry-point group 'cops_deploy.backends'",
    ):
        get_backend("tflite")


# ----------------------------------------------------------------------------------------------
# A plug-in: listed, chosen when asked, skipped with its reason in auto mode


def test_plugin_is_listed_and_chosen_when_asked(plugins, tiny_bundle: Path) -> None:
    plugins(fake=f"{PLUGIN_MODULE}:FakeBackend")
    assert backend_names() == (*BUILT_IN, "fake", "torch")  # plug-ins in name order
    assert get_backend("fake") is FakeBackend
    with Detector.open(tiny_bundle, backend="fake", threads=1) as det:
        assert det.backend_name == "fake" and type(det.vision) is FakeBackend
        assert det.skipped == {}
        assert len(det.predict(rng_images(2))) == 2


def test_auto_skips_a_plugin_that_cannot_run(plugins, tiny_bundle: Path, monkeypatch) -> None:
    plugins(fake=f"{PLUGIN_MODULE}:FakeBackend")
    monkeypatch.setattr(FakeBackend, "reason", "needs a fake accelerator")
    _pretend_missing(monkeypatch, "onnxruntime", "openvino")
    with Detector.open(tiny_bundle) as det:
        assert det.backend_name == "torch"
        assert det.skipped["fake"] == "needs a fake accelerator"
        assert list(det.skipped) == ["tensorrt", "onnxruntime", "openvino", "fake"]


def test_auto_reaches_a_plugin_that_can_run(plugins, tiny_bundle: Path, monkeypatch) -> None:
    plugins(fake=f"{PLUGIN_MODULE}:FakeBackend")
    _pretend_missing(monkeypatch, "onnxruntime", "openvino")
    with Detector.open(tiny_bundle) as det:
        assert det.backend_name == "fake" and "torch" not in det.skipped


def test_plugin_whose_import_fails_gives_the_reason_and_install_hint(
    plugins, tiny_bundle: Path, monkeypatch
) -> None:
    plugins(sdk="cops_needs_sdk_plugin:SdkBackend")
    message = (
        r"backend 'sdk' \(plug-in cops_needs_sdk_plugin:SdkBackend\) cannot be imported: No "
        r"module named 'fancy_accelerator_sdk_xyz'\. Fix: .*pip install fancy_accelerator_sdk_xyz"
        r".*another backend: tensorrt, onnxruntime, openvino"
    )
    with pytest.raises(MissingDependencyError, match=message):
        get_backend("sdk")
    with pytest.raises(MissingDependencyError, match=message):
        Detector.open(tiny_bundle, backend="sdk")
    with Detector.open(tiny_bundle) as det:  # auto: a skip reason, not a traceback
        assert det.backend_name == "onnxruntime"
    _pretend_missing(monkeypatch, "onnxruntime", "openvino")
    with Detector.open(tiny_bundle) as det:
        assert det.backend_name == "torch"
        assert "No module named 'fancy_accelerator_sdk_xyz'" in det.skipped["sdk"]
        assert "pip install fancy_accelerator_sdk_xyz" in det.skipped["sdk"]


def test_plugin_whose_own_module_is_missing_says_reinstall(plugins) -> None:
    plugins(gone="cops_no_such_plugin_module:Backend")
    with pytest.raises(MissingDependencyError, match="reinstall .*'cops_no_such_plugin_module'"):
        get_backend("gone")


@pytest.mark.parametrize(
    "value, message",
    [
        (f"{PLUGIN_MODULE}:NoSuchClass", "names .*NoSuchClass', which does not exist"),
        (f"{PLUGIN_MODULE}:not_a_class", "names .*not_a_class', a int; valid: a subclass"),
        (f"{PLUGIN_MODULE}:MisnamedBackend", "whose kind is 'other'; valid: kind =="),
    ],
)
def test_badly_declared_plugin_is_refused(plugins, value: str, message: str) -> None:
    plugins(odd=value)
    with pytest.raises(ConfigError, match=message):
        get_backend("odd")


def test_plugin_cannot_shadow_a_built_in(plugins, caplog) -> None:
    plugins(onnxruntime=f"{PLUGIN_MODULE}:FakeBackend")
    assert backend_names() == (*BUILT_IN, "torch")
    assert get_backend("onnxruntime") is OnnxRuntimeBackend
    assert "ignoring backend plug-in onnxruntime" in caplog.text


# ----------------------------------------------------------------------------------------------
# Registering in code, and the arguments


def test_register_in_code() -> None:
    registry = BackendRegistry(group="cops_deploy.no_such_group")
    assert registry.register(FakeBackend) is FakeBackend
    registry.register(FakeBackend)  # again: a no-op
    assert registry.names() == ("fake",) and registry.get("fake") is FakeBackend


@pytest.mark.parametrize(
    "cls, message",
    [
        (dict, "cannot register <class 'dict'> as a backend"),
        (type("Auto", (FakeBackend,), {"kind": "auto"}), "has kind 'auto'; valid: a plain name"),
        (type("Dotted", (FakeBackend,), {"kind": "a.b"}), "has kind 'a.b'"),
        (type("Twin", (FakeBackend,), {}), "'fake' is already registered by .*FakeBackend"),
    ],
)
def test_register_refusals(cls: type, message: str) -> None:
    registry = BackendRegistry()
    registry.register(FakeBackend)
    with pytest.raises(ConfigError, match=message):
        registry.register(cls)


def test_auto_runs_fp32_only(bundle: Bundle) -> None:
    with pytest.raises(ConfigError, match="precision='bf16' runs on backend='openvino' only"):
        open_backends(bundle, precision="bf16")


def test_invalid_threads_are_refused_before_auto_selection(bundle: Bundle) -> None:
    with pytest.raises(ConfigError, match="invalid threads=0"):
        open_backends(bundle, threads=0)


def test_auto_with_every_backend_missing_names_each_reason(bundle: Bundle, monkeypatch) -> None:
    _pretend_missing(monkeypatch, *backend_names())
    with pytest.raises(BundleError, match="no backend can run.*openvino: pretend.*torch: pretend"):
        open_backends(bundle)
