"""Fixtures for the application tests."""

import pytest

from sparsetrain.run.cli import main


@pytest.fixture
def cli(capsys):
    """cli(*argv): run the sparsetrain command in this process; returns (exit code, stdout, stderr)."""

    def run(*argv):
        code = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, err

    return run
