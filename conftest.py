"""Repository-wide pytest setup: in CI (NMOE_CI=1, set by .ci/run) hypothesis draws the same examples every run, so
a red CI is reproducible; elsewhere it draws new ones each run and keeps exploring."""

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True)
if os.environ.get("NMOE_CI") == "1":
    settings.load_profile("ci")
