"""The README's first command end to end: ``scripts/quickstart``'s program, with a broker and a
worker of its own, on the two DR17 files in tests/data."""

import pytest

from devtools.quickstart import main


@pytest.mark.integration
@pytest.mark.slow
def test_the_quickstart_gets_every_result_one_dead_letter_and_a_clean_stop(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "quickstart OK" in out
    assert "dead letter: key=b'not-a-spectrum'" in out
    # the coadd read by the worker from the file gets the inline coadd's values, for both files
    assert out.count("the coadd by file reference has the same teff, logg and [Fe/H] as the inline one") == 2
