"""Shared pytest fixtures. Keep this file small: one fixture per shared resource."""
from pathlib import Path

import pytest

# ../shared/data/odir5k-256 beside the repository: present on the project's machines, absent in a
# user's fresh clone, where tests that need it skip.
ODIR256 = Path(__file__).resolve().parents[1].parent / "shared/data/odir5k-256"


@pytest.fixture(scope="session")
def odir256() -> Path:
    """Folder of the 2,239-patient real ODIR-5K subset (data.xlsx, full_df.csv, Training Images/)."""
    if not (ODIR256 / "data.xlsx").is_file():
        pytest.skip(f"real ODIR subset not found at {ODIR256}")
    return ODIR256
