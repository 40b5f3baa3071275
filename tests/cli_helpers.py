"""What the command-line tests share: small, fast data options and the check of a usage error."""
from stripeconv import cli

DATA = ["--dataset", "fashion-mnist-subset", "--limit-train", "32", "--limit-test", "16", "--batch-size", "16",
        "--device", "cpu", "--no-progress", "--quiet"]
TINY = ["--model", "cnn-tiny", *DATA]


def usage_error(argv, capsys, expect: str) -> str:
    """cli.main(argv) fails with status 2 and an error line that contains ``expect``, without a traceback."""
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse's own usage errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert expect in err and "Traceback" not in err, err
    return err
