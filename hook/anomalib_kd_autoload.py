"""Make anomalib see the models registered under the ``anomalib.models`` entry-point group.

anomalib 2.7 resolves model names through the ``anomalib.models`` namespace
(``get_model("aand")``, ``get_model({"class_path": "Aand"})``, ``list_models()``,
``anomalib train --model Aand``, ``anomalib benchmark``) but reads no entry points.
This module is imported at interpreter start-up by the ``anomalib_kd_autoload.pth``
file that the anomalib-kd wheel installs into ``site-packages``. It only appends a
tiny finder to ``sys.meta_path`` (no other import, well under a millisecond). When,
and only when, ``anomalib.models`` is imported, the finder wraps that module's loader
so that right after the module has executed, every ``anomalib.models`` entry point is
loaded and set as an attribute of the module. Plugin classes subclass
``AnomalibModule`` directly, so ``get_model``/``list_models`` find them too.

Switch it off with the environment variable ``ANOMALIB_KD_AUTOLOAD=0``; the models
are then still usable as ``anomalib_aand.Aand`` / ``anomalib_memkd.MemKD`` or by
calling :func:`register` yourself.
"""

import os
import sys

_TARGET = "anomalib.models"
_GROUP = "anomalib.models"


def _entry_points():
    from importlib.metadata import entry_points

    return entry_points(group=_GROUP)


def _is_initialising(module_name):
    """True while ``module_name`` is part-way through its own import (a circular import)."""
    module = sys.modules.get(module_name)
    spec = getattr(module, "__spec__", None)
    return module is not None and bool(getattr(spec, "_initializing", False))


def _install_lazy_getattr(module):
    """PEP 562 fallback: ``anomalib.models.<Name>`` loads the entry point on first access."""
    previous = module.__dict__.get("__getattr__")

    def __getattr__(name):  # noqa: N807
        if not (name.startswith("__") and name.endswith("__")):
            for entry_point in _entry_points():
                if entry_point.name == name:
                    cls = entry_point.load()
                    setattr(module, name, cls)
                    return cls
        if previous is not None:
            return previous(name)
        msg = f"module {module.__name__!r} has no attribute {name!r}"
        raise AttributeError(msg)

    module.__getattr__ = __getattr__


def register(module=None):
    """Load the ``anomalib.models`` entry points and expose them on ``anomalib.models``.

    A plugin whose own import is what triggered ``import anomalib.models`` (e.g. a user who
    imports ``anomalib_aand`` first) cannot be loaded yet; it is picked up on first attribute
    access through a module ``__getattr__``, and by ``get_model``/``list_models`` because by then
    its class exists as a subclass of ``AnomalibModule``.
    """
    if module is None:
        module = sys.modules.get(_TARGET)
        if module is None:
            import anomalib.models as module  # noqa: PLC0415 (re-enters this hook once)
    if "__getattr__" not in module.__dict__ or not getattr(module.__getattr__, "_anomalib_kd", False):
        _install_lazy_getattr(module)
        module.__getattr__._anomalib_kd = True
    loaded = {}
    for entry_point in _entry_points():
        if entry_point.name in module.__dict__:
            continue
        if _is_initialising(entry_point.module.split(".")[0]):
            continue  # circular: resolved lazily, see above
        try:
            cls = entry_point.load()
        except Exception as exc:  # a broken plugin must not break anomalib itself
            import warnings

            warnings.warn(f"anomalib-kd: could not load model entry point {entry_point.name!r}: {exc!r}", stacklevel=2)
            continue
        setattr(module, entry_point.name, cls)
        loaded[entry_point.name] = cls
    return loaded


class _LoaderWrapper:
    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        register(module)

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _Finder:
    """Meta-path finder that reacts to nothing but ``import anomalib.models``."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _LoaderWrapper(spec.loader)
                return spec
        return None


def install():
    if not any(isinstance(finder, _Finder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


if os.environ.get("ANOMALIB_KD_AUTOLOAD", "1").strip().lower() not in {"0", "false", "no", "off"}:
    if _TARGET in sys.modules:  # anomalib.models already imported (e.g. hook imported late)
        register(sys.modules[_TARGET])
    else:
        install()
