"""``--set`` / config values for list-valued method arguments and out-of-range integers."""
import pytest

from stripeconv import cli
from stripeconv.pruning import DAIS, SWP


def test_layer_name_lists_are_lists_of_names():
    params = cli.method_params(SWP)
    got = cli.parse_set(["exclude=features.0", "layers=features.4, features.7"], params)
    assert got == {"exclude": ["features.0"], "layers": ["features.4", "features.7"]}
    got = cli.parse_set(['layers=["features.4"]', "exclude=[features.0, features.4]"], params)
    assert got == {"layers": ["features.4"], "exclude": ["features.0", "features.4"]}


def test_number_tuples():
    params = cli.method_params(DAIS)
    assert cli.parse_set(["alpha_betas=0.5,0.9"], params) == {"alpha_betas": (0.5, 0.9)}
    with pytest.raises(cli.CLIError, match="alpha_betas"):
        cli.parse_set(["alpha_betas=a,b"], params)


@pytest.mark.parametrize("value", ["inf", "-inf", "1e400"])
def test_infinite_integer_is_a_clear_error(value):
    with pytest.raises(cli.CLIError, match="group_size: expected a number"):
        cli.parse_set([f"group_size={value}"], cli.method_params(SWP))


def test_exclude_keeps_the_layer_unpruned(tmp_path, capsys):
    data = ["--dataset", "fashion-mnist-subset", "--limit-train", "128", "--limit-test", "64", "--device", "cpu",
            "--no-progress", "--quiet"]
    assert cli.main(["prune", "--model", "cnn-tiny", "--method", "L1Filter", "--target", "ratio=0.5",
                     "--set", "exclude=features.0", "--epochs", "0", "--out", str(tmp_path), *data]) == 0
    from stripeconv.artifacts import read_description
    layers = read_description(tmp_path / "pruned")["layers"]
    assert layers["features.0"]["out_channels"] == 8  # cnn-tiny's first conv, untouched
