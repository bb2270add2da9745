import pytest

from krasisd.engine.options import SamplingOptions


@pytest.mark.parametrize(
    "field,value",
    [("temperature", -0.1), ("top_k", -1), ("top_p", 0.0), ("top_p", 1.5), ("min_p", 1.0),
     ("repeat_penalty", 0.0), ("num_ctx", 0), ("num_predict", -2)],
)
def test_bad_options_raise_value_error(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingOptions(**{field: value})


def test_defaults_are_valid():
    opts = SamplingOptions()
    assert opts.temperature > 0 and opts.num_predict == -1
