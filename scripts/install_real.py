"""Install the `real` extra (pyproject.toml) into this environment, never another torch.

Each package installs with torch held at the build already here (a constraints file), so a
requirement that would pull another torch fails instead of replacing it; the packages listed in
[tool.bngraph] real-no-deps install without their requirements. pip leaves what is already
installed alone, so running this again changes nothing.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pip carries the same parser
    from pip._vendor import tomli as tomllib

import torch

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    real = pyproject["project"]["optional-dependencies"]["real"]
    no_deps = set(pyproject.get("tool", {}).get("bngraph", {}).get("real-no-deps", []))
    with_deps = [r for r in real if r not in no_deps]
    without = [r for r in real if r in no_deps]
    pip = [sys.executable, "-m", "pip", "install", "--quiet"]
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as pin:
        pin.write(f"torch=={torch.__version__}\n")
    try:
        if with_deps:
            subprocess.run([*pip, "-c", pin.name, *with_deps], check=True)
        if without:
            subprocess.run([*pip, "--no-deps", *without], check=True)
    finally:
        Path(pin.name).unlink()
    now = subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__)"],
                         capture_output=True, text=True, check=True).stdout.strip()
    if now != torch.__version__:
        print(f"install_real: torch is now {now}, was {torch.__version__}", file=sys.stderr)
        return 1
    print(f"real extra installed: {len(real)} packages, torch {torch.__version__} kept")
    return 0


if __name__ == "__main__":
    sys.exit(main())
