"""Shared pytest set-up. Fixtures live in plugin modules, one per area, so that areas do not edit one file."""
import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("AWS_REQUEST_CHECKSUM_CALCULATION", "when_required")
os.environ.setdefault("AWS_RESPONSE_CHECKSUM_VALIDATION", "when_required")

pytest_plugins = ["tests.fixtures_data", "tests.fixtures_stack"]
