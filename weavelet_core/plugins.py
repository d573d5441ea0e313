"""Loading plugins and choosing a transport for a URL.

Plugins come from the ``weavelet`` entry-point group. weavelet's own (distribution ``weavelet``) are always
loaded; third-party ones too unless ``WEAVELET_DISABLE_PLUGIN_AUTOLOAD=1``. A third-party plugin that fails to
import is reported (``weavelet plugins`` lists it, a warning is emitted) and skipped, never fatal.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib.metadata
import os
import warnings
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import pluggy

from weavelet_core import hookspecs
from weavelet_core.errors import DuplicateScheme, MissingDriver, PluginError, UnknownTransport
from weavelet_core.specs import OptimizerSpec, SubcommandSpec, TransportSpec

if TYPE_CHECKING:
    from weavelet_core.transport import Transport

OWN_DISTRIBUTION = "weavelet"
DISABLE_AUTOLOAD_ENV = "WEAVELET_DISABLE_PLUGIN_AUTOLOAD"
URL_ENV = "WEAVELET_URL"


@dataclasses.dataclass(frozen=True)
class LoadedTransport:
    """A transport spec with the distribution that provided it."""

    spec: TransportSpec
    package: str


@dataclasses.dataclass(frozen=True)
class LoadedSubcommand:
    """A plugin subcommand with the distribution that provided it."""

    spec: SubcommandSpec
    package: str


@dataclasses.dataclass(frozen=True)
class BrokenPlugin:
    """A plugin entry point that could not be loaded."""

    name: str
    package: str
    error: str


class PluginRegistry:
    """The plugin manager plus the validated views weavelet needs of it."""

    def __init__(self, *, autoload: bool | None = None) -> None:
        if autoload is None:
            autoload = os.environ.get(DISABLE_AUTOLOAD_ENV, "").strip().lower() not in ("1", "true", "yes")
        self.autoload = autoload
        """Whether third-party plugins were loaded (``False`` when autoloading is disabled)."""
        self.pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        self.broken: list[BrokenPlugin] = []
        self._package_of: dict[int, str] = {}
        self._load_entry_points(autoload)

    def _load_entry_points(self, autoload: bool) -> None:
        for ep in importlib.metadata.entry_points(group=hookspecs.PROJECT_NAME):
            dist = ep.dist.name if ep.dist is not None else "?"
            own = _normalize(dist) == OWN_DISTRIBUTION
            if not own and not autoload:
                continue
            if self.pm.get_plugin(ep.name) is not None or self.pm.is_blocked(ep.name):
                continue
            try:
                plugin = ep.load()
            except Exception as exc:  # a broken third-party plugin must not break weavelet
                self.broken.append(BrokenPlugin(ep.name, dist, f"{type(exc).__name__}: {exc}"))
                warnings.warn(
                    f"weavelet plugin {ep.name!r} from package {dist!r} failed to load: {exc}",
                    RuntimeWarning,
                    stacklevel=2,
                )
                continue
            self.register(plugin, name=ep.name, package=dist)

    def register(self, plugin: object, *, name: str | None = None, package: str = "<local>") -> None:
        """Register a plugin object or module directly (for tests and embedded use)."""
        self.pm.register(plugin, name=name)
        self._package_of[id(plugin)] = package

    def transports(self) -> list[LoadedTransport]:
        """Every transport offered by a loaded plugin, validated."""
        loaded: list[LoadedTransport] = []
        for impl in self.pm.hook.weavelet_transports.get_hookimpls():
            package = self._package_of.get(id(impl.plugin), impl.plugin_name)
            try:
                result = impl.function()
            except Exception as exc:
                broken = BrokenPlugin(impl.plugin_name, package, f"{type(exc).__name__}: {exc}")
                if broken not in self.broken:
                    self.broken.append(broken)
                continue
            for spec in _as_list(result):
                if not isinstance(spec, TransportSpec):
                    raise PluginError(
                        f"plugin {impl.plugin_name!r} ({package}) returned {type(spec).__name__} from "
                        "weavelet_transports(); return TransportSpec objects"
                    )
                loaded.append(LoadedTransport(spec, package))
        loaded.sort(key=lambda t: t.spec.name)
        return loaded

    def claims(self) -> dict[str, list[LoadedTransport]]:
        """Every URL scheme with the transports that claim it (more than one is a conflict)."""
        by_scheme: dict[str, list[LoadedTransport]] = {}
        for loaded in self.transports():
            for scheme in loaded.spec.schemes:
                claimants = by_scheme.setdefault(scheme, [])
                if loaded not in claimants:
                    claimants.append(loaded)
        return by_scheme

    def schemes(self) -> dict[str, LoadedTransport]:
        """Map each URL scheme to its transport; raise :class:`DuplicateScheme` if two plugins claim one."""
        by_scheme: dict[str, LoadedTransport] = {}
        for scheme, claimants in self.claims().items():
            _check_single(scheme, claimants)
            by_scheme[scheme] = claimants[0]
        return by_scheme

    def optimizers(self) -> dict[str, OptimizerSpec]:
        """Optimizers offered by plugins, by lowercase name."""
        found: dict[str, OptimizerSpec] = {}
        for result in self.pm.hook.weavelet_optimizers():
            for spec in _as_list(result):
                if not isinstance(spec, OptimizerSpec):
                    raise PluginError(
                        f"weavelet_optimizers() returned {type(spec).__name__}; return OptimizerSpec objects"
                    )
                found[spec.name] = spec
        return found

    def subcommands(self, reserved: Iterable[str] = ()) -> list[LoadedSubcommand]:
        """Every subcommand offered by a loaded plugin, validated, sorted by name.

        A name in ``reserved`` (the built-in commands), or one an earlier plugin already claimed, is skipped
        with a ``RuntimeWarning`` naming both packages. A hook that raises or returns something other than
        :class:`SubcommandSpec` objects is listed in :attr:`broken` and skipped.
        """
        taken: dict[str, str] = {name: "weavelet (built in)" for name in reserved}
        loaded: list[LoadedSubcommand] = []
        for impl in self.pm.hook.weavelet_subcommands.get_hookimpls():  # registration order
            package = self._package_of.get(id(impl.plugin), impl.plugin_name)
            try:
                result = _as_list(impl.function())
                for spec in result:
                    if not isinstance(spec, SubcommandSpec):
                        raise PluginError(
                            f"returned {type(spec).__name__} from weavelet_subcommands(); return SubcommandSpec objects"
                        )
            except Exception as exc:
                broken = BrokenPlugin(impl.plugin_name, package, f"{type(exc).__name__}: {exc}")
                if broken not in self.broken:
                    self.broken.append(broken)
                continue
            for spec in result:
                if spec.name in taken:
                    warnings.warn(
                        f"weavelet plugin {impl.plugin_name!r} from package {package!r} offers the command "
                        f"{spec.name!r}, which {taken[spec.name]} already provides; ignoring it",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                    continue
                taken[spec.name] = f"package {package!r}"
                loaded.append(LoadedSubcommand(spec, package))
        loaded.sort(key=lambda s: s.spec.name)
        return loaded

    def resolve(self, url: str) -> LoadedTransport:
        """The transport for ``url``'s scheme, with its driver installed; errors say what to do."""
        scheme = url_scheme(url)
        claims = self.claims()
        claimants = claims.get(scheme)
        if not claimants:
            known = sorted(claims)
            close = difflib.get_close_matches(scheme, known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise UnknownTransport(
                f"unknown transport URL scheme {scheme!r} in {mask_password(url)!r}; {hint}"
                f"known schemes: {', '.join(known)}. Run 'weavelet plugins' to list transports; a third-party "
                "transport is installed as its own package"
            )
        _check_single(scheme, claimants)  # a conflict on another scheme does not matter here
        loaded = claimants[0]
        missing = loaded.spec.missing_modules()
        if missing:
            raise MissingDriver(
                f"the {loaded.spec.name!r} transport needs {', '.join(missing)}, which is not installed; "
                f"install it with: {loaded.spec.install_command()}"
            )
        return loaded


def _check_single(scheme: str, claimants: list[LoadedTransport]) -> None:
    if len(claimants) > 1:
        first, second = claimants[0], claimants[1]
        raise DuplicateScheme(
            f"URL scheme {scheme!r} is claimed by two plugins: transport {first.spec.name!r} from "
            f"package {first.package!r} and transport {second.spec.name!r} from package "
            f"{second.package!r}; uninstall one of them, or set {DISABLE_AUTOLOAD_ENV}=1 to load "
            "only weavelet's own transports"
        )


def _normalize(dist_name: str) -> str:
    return dist_name.lower().replace("_", "-")


def _as_list(result: Any) -> list[Any]:
    if result is None:
        return []
    if isinstance(result, (TransportSpec, OptimizerSpec, SubcommandSpec)):
        return [result]
    if isinstance(result, Iterable):
        return list(result)
    return [result]


@functools.lru_cache(maxsize=1)
def get_registry() -> PluginRegistry:
    """The process-wide registry, loaded on first use."""
    return PluginRegistry()


def reset_registry() -> None:
    """Forget the cached registry (after installing a plugin, or changing the autoload variable)."""
    get_registry.cache_clear()


def url_scheme(url: str) -> str:
    """The lowercase scheme of ``url``; raise ``UnknownTransport`` when it has none."""
    if not isinstance(url, str) or "://" not in url:
        raise UnknownTransport(
            f"{url!r} is not a transport URL; write it as SCHEME://..., for example file:///tmp/weavelet, "
            "nats://127.0.0.1:4222 or redis://127.0.0.1:6379/0"
        )
    return url.split("://", 1)[0].lower()


def mask_password(url: str) -> str:
    """``url`` with any password (or token) replaced by ``***``, for messages and logs."""
    if "://" not in url:
        return url
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if "@" not in parts.netloc:
        return url
    userinfo, _, hostinfo = parts.netloc.rpartition("@")
    user, sep, _password = userinfo.partition(":")
    masked = f"{user}:***" if sep else "***"
    return parts._replace(netloc=f"{masked}@{hostinfo}").geturl()


def default_url() -> str:
    """``WEAVELET_URL`` if set, else the per-user ``file://`` directory (no server, no configuration)."""
    env = os.environ.get(URL_ENV, "").strip()
    if env:
        return env
    from weavelet_core.paths import default_state_dir

    return default_state_dir().as_uri()


def open_transport(url: str | None = None, **options: Any) -> Transport:
    """Build (not connect) the transport for ``url`` (default: :func:`default_url`)."""
    url = url or default_url()
    loaded = get_registry().resolve(url)
    transport = loaded.spec.factory(url, **options)
    from weavelet_core.transport import Transport

    if not isinstance(transport, Transport):
        raise PluginError(
            f"transport {loaded.spec.name!r} ({loaded.package}) factory returned {type(transport).__name__}, "
            "not a weavelet_core.Transport"
        )
    return transport
