"""Code from outside the package: entry-point plugins and ``file.py:Name`` / ``module:Name`` references.

A separate distribution adds methods, heads and encoders by declaring entry points
(the packaging convention; ``pip install -e my-lab-methods`` makes them visible)::

    [project.entry-points."avcl.methods"]
    mydistill = "my_lab.methods:MyDistill"        # a train.methods.Method subclass

    [project.entry-points."avcl.heads"]
    gated = "my_lab.heads:GatedFusion"            # a train.heads.Head subclass

    [project.entry-points."avcl.encoders"]
    myencoder = "my_lab.encoder"                  # a module with build(**options), or "module:build"

The entry point's name is the name on the command line (``--method mydistill``).
Registries read entry points lazily: looking up a built-in name never imports a
plugin; looking up any other name imports only the entry point of that name; a
listing imports every one. A plugin that fails to import (or that names the wrong
kind of object) is recorded with its error: a listing warns about it, asking for
its name raises an error that names the plugin and the error, and every other
name keeps working. A plugin cannot replace a built-in name (the built-in wins
and the listing says so), so a shipped method name always means the shipped method.

A one-off reference needs no packaging: ``path/to/file.py:Name`` loads the file
as a module (once per process, under a name derived from its absolute path) and
``package.module:Name`` imports the module; either then takes its attribute ``Name``.

Protocol files outside the shipped ones are found through ``AVCL_PROTOCOLS``
(see :func:`avcl_core.protocols.protocol_dirs`).
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import re
import sys
import types
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator

#: entry-point group of each kind of plugin
GROUPS = {"method": "avcl.methods", "head": "avcl.heads", "encoder": "avcl.encoders"}

BUILTIN = "built-in"


class PluginError(ValueError):
    """A plugin or ``file.py:Name`` reference that cannot be used; the message names it and says why."""


class PluginWarning(UserWarning):
    """A plugin skipped while listing (it failed to import, or its name is taken)."""


# -- where a registered object came from ------------------------------------------------
_ORIGIN: list[str] = []  # innermost plugin being imported (registrations inside it are its own)


@contextlib.contextmanager
def loading(origin: str) -> Iterator[None]:
    """Registrations made inside this block are recorded as coming from ``origin``."""
    _ORIGIN.append(origin)
    try:
        yield
    finally:
        _ORIGIN.pop()


def origin_of(obj: Any) -> str:
    """Where a class being registered comes from: the plugin being loaded, ``built-in`` for the
    package's own modules (``train``, ``extract``, ``avcl_core``), else ``module <name>``."""
    if _ORIGIN:
        return _ORIGIN[-1]
    module = getattr(obj, "__module__", "") or ""
    if module.split(".")[0] in ("train", "extract", "avcl_core"):
        return BUILTIN
    return f"module {module}"


def entry_point_origin(ep: metadata.EntryPoint) -> str:
    """``plugin <distribution> <version> (<module:attr>)``, the text listings show as origin."""
    dist = getattr(ep, "dist", None)
    who = f"{dist.metadata['Name']} {dist.version}" if dist is not None else "(unknown distribution)"
    return f"plugin {who} ({ep.value})"


def describe_error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


# -- one-off references -------------------------------------------------------------------
def is_reference(text: str) -> bool:
    """True for ``path/to/file.py:Name`` and ``package.module:Name`` (a registered name has no colon)."""
    left, sep, right = text.rpartition(":")
    return bool(sep and left and right.isidentifier())


def _is_file_ref(left: str) -> bool:
    return left.endswith(".py") or "/" in left or "\\" in left


def reference_key(text: str) -> str:
    """The reference with a file path made absolute, so another process (a sweep worker started
    elsewhere) loads the same file."""
    left, _, attr = text.rpartition(":")
    if _is_file_ref(left):
        return f"{Path(left).expanduser().resolve()}:{attr}"
    return text


def _module_name_for(path: Path) -> str:
    stem = re.sub(r"\W", "_", path.stem)
    return f"avcl_user_{stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:10]}"


def load_reference(text: str, what: str) -> tuple[Any, str]:
    """``(object, origin)`` named by ``path/to/file.py:Name`` or ``package.module:Name``.

    A file is executed once per process as the module ``avcl_user_<stem>_<hash>`` (kept in
    ``sys.modules``, so pickling and a second lookup find it). ``what`` (e.g. ``"method"``)
    is used in error messages.
    """
    if not is_reference(text):
        raise PluginError(f"{what} {text!r}: expected path/to/file.py:ClassName or package.module:ClassName")
    left, _, attr = text.rpartition(":")
    if _is_file_ref(left):
        path = Path(left).expanduser().resolve()
        origin = f"file {path}"
        if not path.is_file():
            raise PluginError(f"{what} {text!r}: file {path} does not exist")
        modname = _module_name_for(path)
        module = sys.modules.get(modname)
        if module is None:
            spec = importlib.util.spec_from_file_location(modname, path)
            if spec is None or spec.loader is None:
                raise PluginError(f"{what} {text!r}: {path} cannot be loaded as a Python module")
            module = importlib.util.module_from_spec(spec)
            sys.modules[modname] = module
            try:
                with loading(origin):
                    spec.loader.exec_module(module)
            except Exception as e:  # noqa: BLE001 - any error in the user's file is reported, named
                sys.modules.pop(modname, None)
                raise PluginError(f"{what} {text!r}: importing {path} failed: {describe_error(e)}") from e
    else:
        origin = f"module {left}"
        try:
            with loading(origin):
                module = importlib.import_module(left)
        except Exception as e:  # noqa: BLE001
            raise PluginError(f"{what} {text!r}: importing module {left!r} failed: {describe_error(e)}") from e
    try:
        return getattr(module, attr), origin
    except AttributeError:
        names = sorted(n for n in vars(module) if not n.startswith("_") and isinstance(vars(module)[n], type))
        raise PluginError(f"{what} {text!r}: {left} has no attribute {attr!r} "
                          f"(classes defined there: {', '.join(names) or 'none'})") from None


# -- entry points -------------------------------------------------------------------------
class EntryPoints:
    """The entry points of one group, imported on demand and remembered with their errors.

    ``adopt(name, obj, origin)`` is the registry's own step: it registers ``obj`` (the
    loaded entry point) under ``name`` or raises :class:`PluginError` when ``obj`` is not
    the kind of thing the group holds. ``is_registered(name)`` says whether the
    registry already holds ``name`` (a built-in, or an entry point loaded earlier).
    """

    def __init__(self, kind: str, adopt: Callable[[str, Any, str], None],
                 is_registered: Callable[[str], bool]) -> None:
        self.kind = kind
        self.group = GROUPS[kind]
        self._adopt = adopt
        self._is_registered = is_registered
        self._eps: dict[str, metadata.EntryPoint] | None = None
        self.failures: dict[str, str] = {}  # name -> "<origin>: <error>"
        self._done: set[str] = set()
        self._warned: set[str] = set()

    def reset(self) -> None:
        """Forget what was read (the next lookup rescans ``sys.path``); registered objects stay."""
        self._eps, self.failures, self._done, self._warned = None, {}, set(), set()

    def entry_points(self) -> dict[str, metadata.EntryPoint]:
        """``{name: entry point}`` of the group over every distribution on ``sys.path`` (first one wins)."""
        if self._eps is None:
            found: dict[str, metadata.EntryPoint] = {}
            for ep in metadata.entry_points(group=self.group):
                found.setdefault(ep.name, ep)
            self._eps = found
        return self._eps

    def load(self, name: str) -> bool:
        """Import the entry point ``name`` (once); True when it is now registered."""
        ep = self.entry_points().get(name)
        if ep is None:
            return False
        if name not in self._done:
            self._done.add(name)
            origin = entry_point_origin(ep)
            try:
                with loading(origin):
                    obj = ep.load()
                    self._adopt(name, obj, origin)
            except Exception as e:  # noqa: BLE001 - a broken plugin must not break the other names
                self.failures[name] = f"{origin}: {describe_error(e)}"
        return name not in self.failures and self._is_registered(name)

    def load_all(self, warn: bool = True) -> dict[str, str]:
        """Import every entry point of the group; returns the failures, warned about when ``warn``."""
        for name in self.entry_points():
            self.load(name)
        if warn:
            for name, failure in self.failures.items():
                if name not in self._warned:  # once per process, not at every listing
                    self._warned.add(name)
                    warnings.warn(f"{self.kind} plugin {name!r} skipped: {failure}", PluginWarning, stacklevel=3)
        return dict(self.failures)

    def failure(self, name: str) -> str | None:
        """The recorded error of entry point ``name`` (after :meth:`load`), or None."""
        return self.failures.get(name)


def first_line(doc: str | None) -> str:
    """The first sentence of a docstring's first paragraph, on one line (for listings), or ''."""
    para = []
    for line in (doc or "").strip().splitlines():
        if not line.strip():
            break
        para.append(line.strip())
    text = " ".join(para)
    m = re.search(r"[.!?](?=\s+[A-Z(`\"]|$)", text)  # not after "e.g." inside a sentence
    return text[: m.start() + 1] if m else text


# -- a registry of named classes (methods, heads) ------------------------------------------
class Registry:
    """Named subclasses of ``base``: the package's own, entry-point plugins and one-off references.

    ``items`` is the registry's dict (``{name: class}``, kept as the public table, e.g.
    ``METHODS``); ``check(name, cls)`` (optional) raises for a class that cannot be
    registered, before :meth:`register` records it. ``error`` is the exception raised for
    an unknown or unusable name.
    """

    def __init__(self, kind: str, base: type, error: type[Exception], items: dict[str, type],
                 check: Callable[[str, type], Any] | None = None) -> None:
        self.kind, self.base, self.error, self.items = kind, base, error, items
        self._check = check
        self.origins: dict[str, str] = {}
        self.plugins = EntryPoints(kind, self._adopt, items.__contains__)
        self._refs: dict[str, str] = {}  # absolute reference -> registered name

    def register(self, name: str) -> Callable[[type], type]:
        """Class decorator: register a subclass of ``base`` under ``name`` (sets ``cls.name``).

        Where it came from (built-in, a plugin, a file) is recorded for ``avcl-train --list``.
        """
        def deco(cls: type) -> type:
            if name in self.items:
                raise self.error(f"{self.kind} {name!r} registered twice")
            if self._check is not None:
                self._check(name, cls)
            cls.name = name
            self.add(name, cls)
            return cls

        return deco

    def add(self, name: str, cls: type) -> None:
        """Record ``cls`` under ``name`` with where it came from (:func:`origin_of`)."""
        self.items[name] = cls
        self.origins[name] = origin_of(cls)

    def origin(self, name: str) -> str:
        """``built-in``, ``plugin <distribution> <version> (<module:attr>)``, ``file <path>`` or
        ``module <name>``, for anything :meth:`resolve` accepts."""
        name = self.resolve(name)
        return self.origins.get(name, origin_of(self.items[name]))

    def _adopt(self, name: str, obj: Any, origin: str) -> None:
        if isinstance(obj, type) and issubclass(obj, self.base):
            if self.items.get(name) is obj:  # its module registered it under this name already
                return
            if name in self.items:
                raise PluginError(f"the name {name!r} is taken by the {self.origin(name)} {self.kind} {name!r}")
            taken = [n for n, c in self.items.items() if c is obj]
            if taken:
                raise PluginError(f"{obj.__qualname__} is registered as {taken[0]!r}, not {name!r}")
            self.register(name)(obj)
        elif isinstance(obj, types.ModuleType):
            if name not in self.items:
                raise PluginError(f"module {obj.__name__} registers no {self.kind} named {name!r}")
            if self.origin(name) == BUILTIN:
                raise PluginError(f"the name {name!r} is taken by the built-in {self.kind} {name!r}")
        else:
            raise PluginError(f"{obj!r} is not a {self.base.__module__}.{self.base.__qualname__} subclass")

    def names(self, plugins: bool = True) -> list[str]:
        """Registered names, sorted; with ``plugins`` every entry point is imported first (failures warn)."""
        if plugins:
            self.plugins.load_all()
        return sorted(self.items)

    def _available(self) -> str:
        return (f"available {self.kind}s: {', '.join(self.names())} "
                f"(or path/to/file.py:ClassName, package.module:ClassName)")

    def resolve(self, name: str) -> str:
        """The registered name of ``name``: a registered name, an entry point (imported now) or a
        ``file.py:Class`` / ``module:Class`` reference (imported and registered now, see
        :meth:`reference_name`). Raises ``error`` naming the plugin and its error when it cannot be used."""
        if name in self.items:
            return name
        if is_reference(name):
            return self.reference_name(name)
        if self.plugins.load(name):
            return name
        failure = self.plugins.failure(name)
        if failure:
            raise self.error(f"{self.kind} {name!r} cannot be used: {failure}")
        raise self.error(f"unknown {self.kind} {name!r}; {self._available()}")

    def get(self, name: str) -> type:
        """The class of anything :meth:`resolve` accepts."""
        return self.items[self.resolve(name)]

    def reference_name(self, ref: str) -> str:
        """Load a ``path/to/file.py:Class`` or ``package.module:Class`` reference and return its name.

        A class its module registered (``@register_method("x")``) keeps that name. Any other
        subclass of the base is registered under its own ``name`` attribute when the class
        body sets one, else under its class name in lower case (``MyDistill`` -> ``mydistill``).
        """
        key = reference_key(ref)
        if key in self._refs:
            return self._refs[key]
        try:
            obj, origin = load_reference(key, self.kind)
        except PluginError as e:
            raise self.error(str(e)) from e
        if not (isinstance(obj, type) and issubclass(obj, self.base)):
            raise self.error(f"{self.kind} {ref!r}: {obj!r} is not a {self.base.__qualname__} subclass")
        taken = [n for n, c in self.items.items() if c is obj]
        if taken:
            name = taken[0]
        else:
            name = obj.__dict__.get("name") or obj.__name__.lower()
            if name in self.items:
                raise self.error(f"{self.kind} {ref!r}: the name {name!r} is taken by "
                                 f"{self.origin(name)} {self.kind} {name!r}; set name = '...' in the class body")
            with loading(origin):
                self.register(name)(obj)
        self._refs[key] = name
        return name
