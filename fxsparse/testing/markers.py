"""pytest marks for tests that need an optional extra (the test extra installs them all; CI runs every test)."""
import importlib.util

import pytest

needs_reference_attacks = pytest.mark.skipif(
    importlib.util.find_spec("pyautoattack") is None,
    reason="APGD / Square / AutoAttack need the eval extra: pip install 'fxsparse[eval]'")
