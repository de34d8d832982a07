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
