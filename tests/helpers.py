"""Shared builders for the tests (placeholder: filled in by the restructure)."""
from tests.conftest import ROOT, run_cmd  # noqa: F401
from tests.train_helpers import losses, ok  # noqa: F401

ASSETS = ROOT / "tests" / "assets"
