"""What the Adult tests share: the generated files' size, and where UCI's real files are (the repository's sibling
shared/, where CI sees them, or JAXDP_ADULT_DIR) with the skip mark for tests that need them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

NUM_ROWS = 1_200
REAL_DIR = Path(os.environ.get("JAXDP_ADULT_DIR") or Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
                / "adult")
needs_real = pytest.mark.skipif(not (REAL_DIR / "adult.data").is_file(),
                                reason=f"UCI Adult's files are not in {REAL_DIR} (set JAXDP_ADULT_DIR to their folder)")
