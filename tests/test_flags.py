import pytest

from stream_worker.core.flags import ResultFlags, flag_summary, result_flags, set_bits

F = ResultFlags
GOOD = dict(teff=4500.0, logg=2.5, fe_h=-0.3)


def flags(**changes):
    return result_flags(**{**GOOD, **changes})


def test_good_star_has_no_flags():
    assert flags() == 0
    assert flag_summary(0) == {"flag_warn": False, "flag_bad": False}


@pytest.mark.parametrize(
    "teff, expected",
    [(1699.99, F.UNRELIABLE_TEFF | F.UNRELIABLE_FE_H), (1700.0, F.UNRELIABLE_FE_H),
     (3199.99, F.UNRELIABLE_FE_H), (3200.0, 0), (100_000.0, 0), (100_000.01, F.UNRELIABLE_TEFF)],
)
def test_teff_boundaries(teff, expected):
    assert flags(teff=teff) == expected


@pytest.mark.parametrize(
    "logg, expected",
    [(-1.01, F.UNRELIABLE_LOGG), (-1.0, 0), (5.0, 0), (5.01, F.UNRELIABLE_FE_H),
     (6.0, F.UNRELIABLE_FE_H), (6.01, F.UNRELIABLE_LOGG | F.UNRELIABLE_FE_H)],
)
def test_logg_boundaries(logg, expected):
    assert flags(logg=logg) == expected


@pytest.mark.parametrize("fe_h, expected", [(-4.01, F.UNRELIABLE_FE_H), (-4.0, 0), (2.0, 0), (2.01, F.UNRELIABLE_FE_H)])
def test_fe_h_boundaries(fe_h, expected):
    assert flags(fe_h=fe_h) == expected


def test_bit_values_and_derived_booleans():
    assert [int(f) for f in F] == [1, 2, 4, 8]
    assert flag_summary(int(F.UNRELIABLE_FE_H)) == {"flag_warn": True, "flag_bad": True}
    assert flag_summary(int(F.UNRELIABLE_TEFF)) == {"flag_warn": False, "flag_bad": True}
    assert flag_summary(int(F.RUNTIME_EXCEPTION)) == {"flag_warn": False, "flag_bad": True}
    assert set_bits(int(F.RUNTIME_EXCEPTION | F.UNRELIABLE_LOGG)) == ["flag_runtime_exception", "flag_unreliable_logg"]


def test_nan_parameters_are_flagged_everywhere():
    nan = float("nan")
    assert result_flags(nan, nan, nan) == F.UNRELIABLE_TEFF | F.UNRELIABLE_LOGG | F.UNRELIABLE_FE_H
