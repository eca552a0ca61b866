"""Issue 28: the L0 warnings say why a BatchTopK θ of 0 falls short, and print as one saekit
line (not wrapped in torch's _contextlib.py frame)."""

from __future__ import annotations

from saekit.cli import main
from saekit.eval.calibrate import off_target


def test_theta_zero_below_target_says_why():
    message = off_target("a", 27.0, 32.0, threshold=0.0)
    assert (
        message is not None
        and "θ = 0: fewer than k·N = 32·N pre-activations are positive" in message
    )
    assert "θ = 0" not in off_target("a", 27.0, 32.0, threshold=0.5)
    assert "θ = 0" not in off_target("a", 27.0, 32.0)


def test_the_run_warning_is_one_saekit_line(tmp_path, capsys):
    argv = ["train", "--out", str(tmp_path / "r"), "--steps", "4", "--batch-size", "512"]
    argv += ["--no-progress", "--set", "saes.0.sae.activation=jumprelu"]
    argv += ["--set", "saes.0.penalty={kind: l0, target_l0: 200, coefficient: 0.1}"]
    argv += ["--set", "eval_tokens=2048"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if "inference L0" in x]
    assert len(lines) == 1 and lines[0].startswith("saekit: warning: SAE"), err
    assert "_contextlib" not in err and "warnings.warn" not in err
