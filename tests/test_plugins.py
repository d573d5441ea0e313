"""Plugin loading and transport selection: registry, URL schemes, drivers, conflicts, real entry points."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from weavelet_core import plugins
from weavelet_core.errors import DuplicateScheme, MissingDriver, PluginError, UnknownTransport
from weavelet_core.hookspecs import hookimpl
from weavelet_core.memory import MemoryTransport
from weavelet_core.plugins import PluginRegistry, default_url, mask_password, open_transport, url_scheme
from weavelet_core.specs import OptimizerSpec, TransportSpec
from weavelet_core.transport import Transport

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "third_party_transport"

CliRunner = Callable[..., subprocess.CompletedProcess[str]]  # the run_cli fixture of conftest.py


def _memory(url: str, **options: Any) -> Transport:
    return MemoryTransport(url, **options)


class _Plugin:
    """A plugin object offering the given transports."""

    def __init__(self, *specs: TransportSpec) -> None:
        self.specs = list(specs)

    @hookimpl
    def weavelet_transports(self) -> list[TransportSpec]:
        return self.specs


def _registry(*plugins_and_packages: tuple[object, str]) -> PluginRegistry:
    registry = PluginRegistry(autoload=False)
    for plugin, package in plugins_and_packages:
        registry.register(plugin, package=package)
    return registry


@pytest.fixture
def use_registry(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Make :func:`open_transport` use a given registry."""

    def install(registry: PluginRegistry) -> None:
        monkeypatch.setattr(plugins, "get_registry", lambda: registry)

    return install


# -- registry ----------------------------------------------------------------------------------------------


def test_builtin_transports_register_through_entry_points() -> None:
    registry = PluginRegistry(autoload=False)
    schemes = registry.schemes()
    assert schemes["memory"].package == "weavelet"
    assert schemes["file"].package == "weavelet"
    assert schemes["file"].spec.driver_installed


def test_unknown_scheme_lists_known_ones_and_the_closest() -> None:
    registry = _registry()
    with pytest.raises(UnknownTransport) as info:
        registry.resolve("flie:///tmp/x")
    message = str(info.value)
    assert "unknown transport URL scheme 'flie'" in message
    assert "did you mean 'file'?" in message
    assert "known schemes: file, memory" in message
    with pytest.raises(UnknownTransport) as info:
        registry.resolve("zzzz://host")
    assert "did you mean" not in str(info.value)


def test_url_without_scheme_shows_the_form() -> None:
    with pytest.raises(UnknownTransport, match=r"'/tmp/store' is not a transport URL; write it as SCHEME://"):
        url_scheme("/tmp/store")


def test_missing_driver_names_the_pip_command() -> None:
    spec = TransportSpec(
        name="needy", schemes=("needy",), factory=_memory, requires=("weavelet_absent_driver_xyz",), extra="nats"
    )
    registry = _registry((_Plugin(spec), "weavelet"))
    assert spec.missing_modules() == ["weavelet_absent_driver_xyz"]
    with pytest.raises(MissingDriver) as info:
        registry.resolve("needy://host")
    assert str(info.value) == (
        "the 'needy' transport needs weavelet_absent_driver_xyz, which is not installed; "
        'install it with: pip install "weavelet[nats]"'
    )
    third_party = TransportSpec(
        name="kafka",
        schemes=("kafka",),
        factory=_memory,
        requires=("weavelet_absent_driver_xyz",),
        install_hint="pip install weavelet-kafka",
    )
    assert third_party.install_command() == "pip install weavelet-kafka"


def test_two_plugins_claiming_one_scheme_are_both_named(use_registry: Any) -> None:
    first = TransportSpec(name="queue-a", schemes=("queue",), factory=_memory)
    second = TransportSpec(name="queue-b", schemes=("queue", "qb"), factory=_memory)
    registry = _registry((_Plugin(first), "weavelet-queue-a"), (_Plugin(second), "weavelet-queue-b"))
    use_registry(registry)
    with pytest.raises(DuplicateScheme) as info:
        open_transport("queue://x")
    message = str(info.value)
    assert "URL scheme 'queue' is claimed by two plugins" in message
    assert "'queue-a' from package 'weavelet-queue-a'" in message
    assert "'queue-b' from package 'weavelet-queue-b'" in message
    assert "uninstall one of them" in message


def test_plugin_returning_wrong_objects_is_reported() -> None:
    class Bad:
        @hookimpl
        def weavelet_transports(self) -> list[object]:
            return ["not a spec"]

    registry = _registry((Bad(), "weavelet-bad"))
    with pytest.raises(PluginError, match=r"returned str from weavelet_transports\(\); return TransportSpec"):
        registry.transports()


def test_plugin_hook_that_raises_is_listed_as_broken_not_fatal() -> None:
    class Crashing:
        @hookimpl
        def weavelet_transports(self) -> list[TransportSpec]:
            raise RuntimeError("boom")

    registry = _registry((Crashing(), "weavelet-crashing"))
    names = [t.spec.name for t in registry.transports()]
    assert {"file", "memory"} <= set(names)
    assert [b.error for b in registry.broken if b.package == "weavelet-crashing"] == ["RuntimeError: boom"]


def test_factory_returning_a_non_transport_is_refused(use_registry: Any) -> None:
    spec = TransportSpec(name="odd", schemes=("odd",), factory=lambda url, **_: object())  # type: ignore[arg-type]
    use_registry(_registry((_Plugin(spec), "weavelet-odd")))
    with pytest.raises(PluginError, match=r"factory returned object, not a weavelet_core.Transport"):
        open_transport("odd://x")


def test_optimizer_specs_come_from_plugins() -> None:
    class Optimizers:
        @hookimpl
        def weavelet_optimizers(self) -> list[OptimizerSpec]:
            return [OptimizerSpec(name="Lion", factory=lambda params, **hp: None, description="sign momentum")]

    registry = _registry((Optimizers(), "weavelet-lion"))
    assert list(registry.optimizers()) == ["lion"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "Bad Name", "schemes": ("x",)}, "use lowercase letters"),
        ({"name": "ok", "schemes": ()}, "give at least one URL scheme"),
        ({"name": "ok", "schemes": ("9x",)}, "invalid URL scheme '9x'"),
    ],
)
def test_transport_spec_validates_its_fields(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TransportSpec(factory=_memory, **kwargs)
    with pytest.raises(TypeError, match="factory must be callable"):
        TransportSpec(name="ok", schemes=("ok",), factory="not callable")  # type: ignore[arg-type]


def test_default_url_prefers_environment_then_state_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("WEAVELET_URL", "memory://from-env")
    assert default_url() == "memory://from-env"
    monkeypatch.delenv("WEAVELET_URL")
    monkeypatch.setenv("WEAVELET_STATE_DIR", str(tmp_path / "state"))
    assert default_url() == (tmp_path / "state").as_uri()
    monkeypatch.delenv("WEAVELET_STATE_DIR")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert default_url() == (tmp_path / "xdg" / "weavelet").as_uri()


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("nats://alice:s3cret@host:4222", "nats://alice:***@host:4222"),
        ("redis://:s3cret@host:6379/0", "redis://:***@host:6379/0"),
        ("nats://token@host", "nats://***@host"),
        ("file:///tmp/x", "file:///tmp/x"),
    ],
)
def test_passwords_are_masked_in_messages(url: str, masked: str) -> None:
    assert mask_password(url) == masked


# -- real entry points, real processes ---------------------------------------------------------------------


def _fake_distribution(site: Path, dist: str, module: str, source: str) -> None:
    """Install a one-module distribution into ``site`` the way pip lays it out (dist-info + entry points)."""
    (site / f"{module}.py").write_text(textwrap.dedent(source))
    info = site / f"{dist.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[weavelet]\n{module} = {module}\n")


_SPEC_MODULE = """
    from weavelet_core import TransportSpec, hookimpl
    from weavelet_core.memory import MemoryTransport

    @hookimpl
    def weavelet_transports():
        return [TransportSpec(name={name!r}, schemes=({scheme!r},), factory=MemoryTransport,
                              requires={requires!r}, install_hint={hint!r})]
"""


@pytest.fixture
def odd_plugins(tmp_path: Path) -> dict[str, str]:
    """A site directory with a plugin missing its driver, two plugins claiming one scheme, and a broken one."""
    site = tmp_path / "site"
    site.mkdir()
    _fake_distribution(
        site,
        "weavelet-needy",
        "weavelet_needy",
        _SPEC_MODULE.format(
            name="needy", scheme="needy", requires=("weavelet_absent_driver_xyz",), hint="pip install needy-driver"
        ),
    )
    for suffix in ("a", "b"):
        _fake_distribution(
            site,
            f"weavelet-dup-{suffix}",
            f"weavelet_dup_{suffix}",
            _SPEC_MODULE.format(name=f"dup-{suffix}", scheme="dup", requires=(), hint=None),
        )
    _fake_distribution(site, "weavelet-broken", "weavelet_broken", "raise ImportError('cannot import foo')\n")
    return {"PYTHONPATH": str(site)}


def test_plugins_command_lists_missing_drivers_conflicts_and_broken_plugins(
    run_cli: CliRunner, odd_plugins: dict[str, str]
) -> None:
    done = run_cli("plugins", env_extra=odd_plugins)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert any(line.split()[:3] == ["needy", "needy://", "weavelet-needy"] for line in lines)
    assert any(line.endswith("missing: pip install needy-driver") for line in lines)
    assert (
        "conflict: dup:// is claimed by dup-a (weavelet-dup-a) and dup-b (weavelet-dup-b); uninstall one of them"
        in lines
    )
    assert "broken: plugin 'weavelet_broken' from package 'weavelet-broken': ImportError: cannot import foo" in lines
    body = json.loads(run_cli("plugins", "--json", env_extra=odd_plugins).stdout)
    needy = next(t for t in body["transports"] if t["name"] == "needy")
    assert needy["driver_installed"] is False
    assert needy["missing_modules"] == ["weavelet_absent_driver_xyz"]
    assert body["conflicts"] == {"dup": ["dup-a (weavelet-dup-a)", "dup-b (weavelet-dup-b)"]}


def test_using_odd_plugins_by_url_gives_one_clear_line(run_cli: CliRunner, odd_plugins: dict[str, str]) -> None:
    done = run_cli("--url", "needy://host", "runs", env_extra=odd_plugins)
    assert done.returncode == 1
    assert "weavelet: error: the 'needy' transport needs weavelet_absent_driver_xyz, which is not installed; " in (
        done.stderr
    )
    assert "install it with: pip install needy-driver" in done.stderr
    done = run_cli("--url", "dup://x", "runs", env_extra=odd_plugins)
    assert done.returncode == 1
    assert "'dup-a' from package 'weavelet-dup-a'" in done.stderr
    assert "'dup-b' from package 'weavelet-dup-b'" in done.stderr
    # A broken plugin is a warning (one line), not a failure, for unrelated commands.
    done = run_cli("--url", "memory://x", "runs", env_extra=odd_plugins)
    assert done.returncode == 0
    assert (
        "weavelet: warning: weavelet plugin 'weavelet_broken' from package 'weavelet-broken' failed to load"
        in done.stderr
    )
    assert "Traceback" not in done.stderr


@pytest.fixture(scope="module")
def example_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example third-party transport, built and installed by pip into a private directory."""
    target = tmp_path_factory.mktemp("example-site")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(target),
            str(EXAMPLE),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, f"pip could not install the example plugin:\n{done.stdout}\n{done.stderr}"
    return target


def test_third_party_plugin_is_listed_and_usable_by_url(run_cli: CliRunner, example_site: Path, tmp_path: Path) -> None:
    env = {"PYTHONPATH": str(example_site)}
    body = json.loads(run_cli("plugins", "--json", env_extra=env).stdout)
    example = next(t for t in body["transports"] if t["name"] == "example")
    assert example["schemes"] == ["example"]
    assert example["package"] == "weavelet-example-transport"
    assert example["driver_installed"] is True
    url = f"example://{tmp_path / 'store'}"
    done = run_cli("--url", url, "set", "demo", "lr=0.01", env_extra=env)
    assert done.returncode == 0, done.stderr
    done = run_cli("get", "demo", "--json", env_extra={**env, "WEAVELET_URL": url})
    assert json.loads(done.stdout)["config"] == {"lr": 0.01}
    assert (tmp_path / "store" / "runs" / "demo" / "latest.json").is_file()


def test_disabling_autoload_hides_the_third_party_plugin(
    run_cli: CliRunner, example_site: Path, tmp_path: Path
) -> None:
    env = {"PYTHONPATH": str(example_site), "WEAVELET_DISABLE_PLUGIN_AUTOLOAD": "1"}
    body = json.loads(run_cli("plugins", "--json", env_extra=env).stdout)
    assert body["autoload"] is False
    names = {t["name"] for t in body["transports"]}
    assert "example" not in names
    assert {"file", "memory"} <= names
    done = run_cli("--url", f"example://{tmp_path}", "runs", env_extra=env)
    assert done.returncode == 1
    assert "unknown transport URL scheme 'example'" in done.stderr


def test_third_party_plugin_passes_the_conformance_suite(example_site: Path, isolated_env: dict[str, str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLE / "tests")],
        env={**isolated_env, "PYTHONPATH": str(example_site)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:]
    summary = done.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"\d+ passed.*", summary), summary
