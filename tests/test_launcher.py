"""``pargo_jax.launcher``: a user's mistake in a flag or a config is one line on stderr naming it and
the fix, exit status 2; a bug keeps its traceback. In this process, on a fresh ``FlagValues`` with the
experiments' real config flag (each command's own CLI test runs it as a subprocess)."""

from __future__ import annotations

import argparse

import pytest
from absl import flags
from ml_collections import config_flags

from pargo_jax import configs, launcher


def _parse(capsys, *args: str) -> tuple[int, list[str]]:
    """Parses ``args`` as ``python -m pargo_jax.main`` would; its exit status and stderr lines."""
    argv = ["main", *args]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "Experiment.", flag_values=fv, sys_argv=argv)
    flags.DEFINE_string("workdir", None, "Run directory.", flag_values=fv)
    with pytest.raises(SystemExit) as exit_:
        launcher.parse_flags(argv, fv)
    return exit_.value.code, capsys.readouterr().err.splitlines()


def test_a_mistyped_config_field_is_one_line(capsys):
    assert _parse(capsys, "--config=experiments/pretrain.py", "--config.optim.lrr=1") == (
        2,
        ["error: --config.optim.lrr: no field 'lrr' in config.optim; did you mean 'lr'?"],
    )
    assert _parse(capsys, "--config=experiments/pretrain.py", "--config.optimm.lr=1") == (
        2,
        ["error: --config.optimm.lr: no field 'optimm' in config; did you mean 'optim'?"],
    )


def test_an_unknown_preset_is_one_line(capsys):
    code, err = _parse(capsys, "--config=experiments/pretrain.py:foo")
    assert (code, len(err)) == (2, 1)
    assert err[0] == (
        "error: --config=experiments/pretrain.py:foo: unknown preset 'foo'; "
        "choose one of demo, paper, siglip_qwen2, mg_llava, mg_llava_demo, xformer, blip2, xformer_demo, "
        "blip2_demo"
    )


def test_flag_mistakes_and_a_missing_file_are_one_line(capsys):
    assert _parse(capsys, "--workdr=w") == (
        2,
        ["error: Unknown command line flag 'workdr'. Did you mean: workdir ?"],
    )
    code, err = _parse(capsys, "--config=experiments/nope.py")
    assert (code, err) == (2, ["error: --config: [Errno 2] No such file or directory: 'experiments/nope.py'"])


def test_good_flags_parse_and_return_the_arguments_left():
    values = launcher.parse(
        lambda fv: flags.DEFINE_integer("steps", 1, "Steps.", flag_values=fv), ["--steps=3", "x"]
    )
    assert values.steps == 3


def test_a_config_error_in_main_is_one_line_and_a_bug_keeps_its_traceback(capsys):
    def main(argv: list[str]) -> None:
        configs.check_keys(["lrr"], ["lr", "b1"], "config.optim")

    with pytest.raises(SystemExit) as exit_:
        launcher.reporting_config_errors(main)(["main"])
    err = capsys.readouterr().err.splitlines()
    assert exit_.value.code == 2
    assert err == [
        "error: Unknown key(s) 'lrr' (did you mean 'lr'?) in config.optim; valid keys are ['b1', 'lr']."
    ]

    def buggy(argv: list[str]) -> None:
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        launcher.reporting_config_errors(buggy)(["main"])


def test_config_errors_stay_the_errors_callers_catch(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.llm path"):
        configs.require_path(str(tmp_path / "nowhere"), "model.llm")
    with pytest.raises(configs.ConfigError):
        configs.require_path(None, "input.tokenizer")
    assert issubclass(configs.ConfigError, ValueError)
    assert configs.missing_field({"optim": {"lr": 1.0}}, "optim.lr") is None


def test_argparse_mistakes_are_one_line(capsys):
    p = launcher.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    with pytest.raises(SystemExit) as exit_:
        p.parse_args(["--quik"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: unrecognized arguments: --quik (--help lists the flags)"
    ]
    assert isinstance(p, argparse.ArgumentParser) and p.parse_args(["--quick"]).quick
