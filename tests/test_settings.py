"""Configuration: defaults = config/node.toml, TOML file, environment overrides, clear errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from node.settings import ConfigError, load_settings

REPO = Path(__file__).resolve().parents[1]


def test_shipped_node_toml_equals_the_defaults() -> None:
    assert (
        load_settings(REPO / "config" / "node.toml").model_dump()
        == load_settings(None).model_dump()
    )


def test_defaults_match_the_interface_contract() -> None:
    s = load_settings(None)
    assert (s.dicom.ae_title, s.dicom.port) == ("MEDGEMMA", 11112)
    assert (s.api.host, s.api.port) == ("127.0.0.1", 8080)
    assert s.storage.data_dir == "./var" and s.queue.broker_url == ""
    assert s.engine.name == "medgemma" and s.destinations == []


def test_file_then_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_text(
        '[dicom]\nae_title = "CXRNODE"\nport = 104\n'
        '[[destinations]]\nae_title = "PACS"\nhost = "127.0.0.1"\nport = 4242\n'
    )
    s = load_settings(cfg)
    assert (s.dicom.ae_title, s.dicom.port) == ("CXRNODE", 104)
    assert s.destinations[0].ae_title == "PACS"
    monkeypatch.setenv("MEDGEMMA_NODE_DICOM__PORT", "11113")
    monkeypatch.setenv("MEDGEMMA_NODE_STORAGE__DATABASE_URL", "postgresql+psycopg://x@h/db")
    s = load_settings(cfg)
    assert (s.dicom.ae_title, s.dicom.port) == ("CXRNODE", 11113)
    assert s.storage.resolved_database_url() == "postgresql+psycopg://x@h/db"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('[dicom]\nae_title = "A_TITLE_THAT_IS_FAR_TOO_LONG"\n', "1-16 ASCII"),
        ("[dicom]\nport = 70000\n", "port"),
        ("[unknown]\nx = 1\n", "unknown"),
        ("[dicom\n", "invalid configuration"),
    ],
)
def test_bad_configuration_is_a_clear_error(tmp_path: Path, content: str, message: str) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(content)
    with pytest.raises(ConfigError, match=message):
        load_settings(cfg)


def test_cli_reports_a_missing_config_file(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "node.cli", "--config", str(tmp_path / "nope.toml"), "status"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_config_from_before_the_pdu_limit_still_loads_with_the_default_limit() -> None:
    # older config/node.toml files said maximum_pdu_size = 0 (unlimited)
    settings = load_settings(None, dicom={"maximum_pdu_size": 0})
    assert settings.dicom.maximum_pdu_size == 1_048_576


def test_a_misspelt_key_inside_a_section_is_an_error_naming_it(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text('[dicom]\nae_titel = "PACS"\n')
    done = subprocess.run(
        [sys.executable, "-m", "node.cli", "--config", str(config), "status"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    assert "dicom.ae_titel" in done.stderr and "Traceback" not in done.stderr
