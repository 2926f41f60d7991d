"""connectors.registry: built-ins by module path and plugins through a real entry-point distribution."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from connectors import registry
from connectors.base import ConnectorSettings
from connectors.scim import ScimConnector

SETTINGS = ConnectorSettings(name="app", url="http://127.0.0.1:9/scim/v2/")

PLUGIN = """
from connectors.base import Connector, Result


class EchoConnector(Connector):
    kind = "echo"
    default_mapping = {"email": "emails[primary].value"}
    match_field = "email"

    def __init__(self, settings):
        self.settings = settings

    def upsert(self, record):
        return Result(record.remote_id, "unchanged")

    def deprovision(self, record, action):
        return Result(record.remote_id, "absent")

    def find(self, match_key):
        return None

    def probe(self):
        return None


NOT_A_CONNECTOR = 42
"""


@pytest.fixture
def plugin_dist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake installed distribution on sys.path registering ``echo`` (a class) and ``broken`` (not one)."""
    (tmp_path / "idhub_echo_plugin.py").write_text(PLUGIN)
    info = tmp_path / "idhub_echo_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: idhub-echo-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        textwrap.dedent(
            """\
            [idhub.connectors]
            echo = idhub_echo_plugin:EchoConnector
            broken = idhub_echo_plugin:NOT_A_CONNECTOR
            echomod = idhub_echo_plugin
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))  # also invalidates the import caches
    return tmp_path


def test_builtin_scim_is_built_lazily() -> None:
    connector = registry.build("scim", SETTINGS)
    assert isinstance(connector, ScimConnector)
    connector.close()
    assert "scim" in registry.kinds()


def test_entry_point_plugin_is_found_and_built(plugin_dist: Path) -> None:
    assert {"echo", "broken", "scim"} <= set(registry.kinds())
    connector = registry.build("echo", SETTINGS)
    assert type(connector).__name__ == "EchoConnector"
    assert connector.settings is SETTINGS  # type: ignore[attr-defined]


def test_entry_point_that_is_not_a_connector_class_is_refused(plugin_dist: Path) -> None:
    with pytest.raises(ValueError, match="not a Connector class"):
        registry.build("broken", SETTINGS)
    with pytest.raises(ValueError, match="no Connector class with kind 'echomod'"):
        registry.build("echomod", SETTINGS)


def test_unknown_kind_names_it_and_the_known_kinds_in_one_line() -> None:
    with pytest.raises(ValueError, match="unknown connector kind") as info:
        registry.build("fax", SETTINGS)
    message = str(info.value)
    assert "\n" not in message
    assert "'fax'" in message
    assert "scim" in message


def test_a_missing_builtin_module_breaks_only_its_own_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(registry.BUILTINS, "ghost", "connectors.no_such_module")
    assert "ghost" not in registry.kinds()
    with pytest.raises(ValueError, match="unknown connector kind 'ghost'"):
        registry.build("ghost", SETTINGS)
    assert isinstance(registry.build("scim", SETTINGS), ScimConnector)
