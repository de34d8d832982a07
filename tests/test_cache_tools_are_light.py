"""Reading a cache and asking for help must not import the heavy stack (issue 20): `precompute
status`/`validate` on a cluster login node, or `--help`, should answer in well under a second,
not after 6-7 s and ~780 MB of torch, timm, transformers and Ray."""

from __future__ import annotations

import subprocess
import sys

import pytest

from test_cache_storage import write_cache

HEAVY = ("torch", "timm", "transformers", "ray", "scipy.signal")

PROBE = """
import sys
from {module} import main
try:
    main({argv!r})
except SystemExit:
    pass
heavy = sorted(name for name in {heavy!r} if name in sys.modules)
print("HEAVY:", ",".join(heavy))
"""


def imported_heavy(module: str, argv: list[str]) -> str:
    result = subprocess.run([sys.executable, "-c", PROBE.format(module=module, argv=argv, heavy=HEAVY)],
                            capture_output=True, text=True)
    [line] = [line for line in result.stdout.splitlines() if line.startswith("HEAVY:")]
    return line.removeprefix("HEAVY:").strip()


@pytest.mark.parametrize("command", [["status"], ["status", "--json"], ["validate"]])
def test_reading_a_cache_imports_no_model_stack(tmp_path, command):
    write_cache(str(tmp_path / "cache"), "zarr")
    assert imported_heavy("precompute.cli", [*command, "--cache", str(tmp_path / "cache")]) == ""


@pytest.mark.parametrize("module, argv", [("precompute.cli", ["--help"]), ("precompute.cli", ["run", "--help"]),
                                          ("trainer.cli", ["--help"]), ("trainer.cli", ["fit", "--help"])])
def test_help_imports_no_model_stack(module, argv):
    assert imported_heavy(module, argv) == ""


OPEN_CACHE_PROBE = """
import sys
from cache_schema import open_cache
cache = open_cache({root!r})
for name, split in cache.splits.items():
    print(name, split.num_samples, {{feature: spec.model_id for feature, spec in split.features.items()}})
    split.feature("ocr").commit_records()
print("HEAVY:", ",".join(sorted(name for name in {heavy!r} if name in sys.modules)))
"""


def test_opening_a_cache_from_python_imports_no_model_stack(tmp_path):
    """`open_cache`, its splits, their feature specs and commit records: torch only once a dataset is built."""
    write_cache(str(tmp_path / "cache"), "zarr")
    result = subprocess.run([sys.executable, "-c", OPEN_CACHE_PROBE.format(root=str(tmp_path / "cache"), heavy=HEAVY)],
                            capture_output=True, text=True)
    assert "toy/train 10 {'ocr': 'm'}" in result.stdout, result.stderr
    assert result.stdout.splitlines()[-1].strip() == "HEAVY:"
