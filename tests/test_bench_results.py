"""benchmarks/results.py: sections of RESULTS.md written, replaced in place, printed."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from results import publish, record_section  # noqa: E402


def test_publish_prints_records_and_replaces_its_section(tmp_path, capsys):
    path = tmp_path / "RESULTS.md"
    record_section("## a\n\nfirst a", path)
    record_section("## b\n\nonly b", path)
    text = publish(["## a", "", "second a", "| x |", ""], record=True, path=path)
    assert text == "## a\n\nsecond a\n| x |\n"
    assert text in capsys.readouterr().out
    assert path.read_text() == "# Benchmark results\n\n## a\n\nsecond a\n| x |\n\n## b\n\nonly b\n"
    publish(["## c", "", "not recorded"], record=False, path=path)
    assert "## c" not in path.read_text()
    with pytest.raises(ValueError, match="starts with '## '"):
        publish(["no heading"], record=True, path=path)
