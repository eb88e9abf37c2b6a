"""Shared pytest fixtures: tiny tokenizers and tiny checkpoints saved to temporary folders."""

from tests.fixtures.models import *  # noqa: F403
from tests.fixtures.script_runs import *  # noqa: F403
from tests.fixtures.tiny_vlms import *  # noqa: F403
from tests.fixtures.tokenizers import *  # noqa: F403
from tests.fixtures.training import *  # noqa: F403
