"""The CLI's refusals, as every test of bad input checks them: exit code 2 and one line on stderr."""

from __future__ import annotations

import pytest

from batchseg.cli import main


def refusal(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run ``batchseg argv``, which must refuse: exit 2 (argparse's refusals included) and exactly one
    ``... error: ...`` line on stderr, which is returned."""
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own refusals
        code = int(e.code or 0)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and " error: " in err, err
    return err
