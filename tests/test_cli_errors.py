"""Every ``cgml`` error is one line on stderr, ``cgml <command>: error: <message>``, exit
status 2, no traceback (``--debug`` re-raises). Runs ``openmm_cgml.cli.main`` in process."""
from __future__ import annotations

import shutil

import pytest

from openmm_cgml import cli
from openmm_cgml.cli import main as cgml


def run(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()
    code = cgml([str(a) for a in argv])
    return code, capsys.readouterr().err


def assert_error(code: int, err: str, command: str, *fragments: str, status: int = 2,
                 kind: str | None = "error") -> str:
    """Exit ``status``; stderr is exactly one line naming the command and the problem
    (``cgml <command>: <kind>: ...``; any ``cgml <command>: ...`` with ``kind=None``)."""
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith(f"cgml {command}: {kind}: " if kind else f"cgml {command}: "), line
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    assert code == status
    return line


# ----------------------------------------------------------------------- train: config
def test_unknown_config_name(capsys):
    code, err = run(capsys, "train", "no-such-config")
    assert_error(code, err, "train", "no config file 'no-such-config'", "chain-tiny")


@pytest.mark.parametrize("override, message", [
    ("seq_len=three", "config key seq_len: expected an integer, got 'three'"),
    ("seq_len=true", "config key seq_len: expected an integer, got True"),
    ("seq_len=1", "config key seq_len: must be >= 2, got 1"),
    ("cg_level=ten", "config key cg_level: expected a number, got 'ten'"),
    ("steps=null", "config key steps: expected an integer, got null"),
    ("val_fraction=1.5", "config key val_fraction: must be in [0, 1), got 1.5"),
    ("model=3", "config key model: expected a mapping, got 3"),
    ("model.rounds=2.5", "config key model.rounds: expected an integer, got 2.5"),
    ("model.cutoff=-1", "config key model.cutoff: must be a positive finite number, got -1.0"),
    ("model.backbone=transformer", "backbone must be 'gns' or 'et', got 'transformer'"),
    ("model.seq_len=x", "config key model.seq_len: expected an integer, got 'x'"),
    ("optimizer.lr=fast", "config key optimizer.lr: expected a number, got 'fast'"),
    ("optimizer.name=adagrad", "config key optimizer.name: must be adam, adamw or sgd, got 'adagrad'"),
    ("schedule.warmup=10", "config key schedule: unknown keys ['warmup']"),
    ("lr=0.1", "unknown training config keys: ['lr']"),
    ("model.rounds.deep=1", "config key model.rounds is not a mapping"),
    ("rollout.steps=1", "config key rollout.steps: must be >= 2, got 1"),
    ("rollout.every=3", "config key rollout: unknown keys ['every']"),
    ("augment_rotations=sometimes", "config key augment_rotations: expected"),
])
def test_bad_config_value(capsys, override, message):
    code, err = run(capsys, "train", "chain-tiny", "--set", override)
    line = assert_error(code, err, "train", message)
    if "key" in message and "not a mapping" not in message:
        assert "chain-tiny.yaml" in line  # the config file is named too


def test_valid_number_text_and_int_for_float_are_accepted():
    from openmm_cgml.training import load_config

    config = load_config("chain-tiny", {"optimizer.lr": "1e-3", "cg_level": 4, "model.cutoff": 2})
    assert config.optimizer["lr"] == 1e-3 and isinstance(config.cg_level, float)
    assert config.model_config().cutoff == 2.0 and isinstance(config.model_config().cutoff, float)


def test_set_without_value(capsys):
    code, err = run(capsys, "train", "chain-tiny", "--set", "seq_len")
    assert_error(code, err, "train", "--set expects KEY=VALUE, got 'seq_len'")


@pytest.mark.parametrize("name, text, message", [
    ("broken.yaml", "seq_len: [3\n", "not valid YAML"),
    ("list.yaml", "- 1\n- 2\n", "must be a mapping"),
    ("broken.toml", "seq_len = \n", "not valid TOML"),
    ("typed.yaml", 'seq_len: "three"\n', "config key seq_len: expected an integer, got 'three'"),
])
def test_bad_config_file_names_the_file(capsys, tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    code, err = run(capsys, "train", path)
    assert_error(code, err, "train", str(path), message)


# ------------------------------------------------------------------------- train: data
def test_system_filter_that_matches_nothing(capsys, chain_data_dir):
    code, err = run(capsys, "train", "chain-tiny", "--data-dir", chain_data_dir, "--set", "system=electrolyte")
    assert_error(code, err, "train", "'electrolyte' matches no complete training trajectory",
                 str(chain_data_dir), "kinds ['chain']")


def test_missing_data_dir(capsys, tmp_path):
    code, err = run(capsys, "train", "chain-tiny", "--data-dir", tmp_path / "nowhere", "--out", tmp_path / "run",
                    "--no-progress")
    assert_error(code, err, "train", str(tmp_path / "nowhere"), "does not exist")
    assert not (tmp_path / "run").exists()


def test_data_dir_that_is_not_a_data_set(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    code, err = run(capsys, "train", "chain-tiny", "--data-dir", tmp_path / "empty", "--out", tmp_path / "run",
                    "--no-progress")
    assert_error(code, err, "train", str(tmp_path / "empty"), "dataset.json")


def test_existing_run_needs_resume(capsys, exported_tiny_model, chain_data_dir):
    run_dir = exported_tiny_model.parent  # the fixture's training run
    assert (run_dir / "checkpoints" / "last.pt").exists()
    code, err = run(capsys, "train", "chain-tiny", "--data-dir", chain_data_dir, "--out", run_dir, "--no-progress")
    assert_error(code, err, "train", str(run_dir), "already holds a run", "--resume")


def test_resume_without_checkpoint(capsys, chain_data_dir, tmp_path):
    code, err = run(capsys, "train", "chain-tiny", "--data-dir", chain_data_dir, "--out", tmp_path / "run",
                    "--resume", "--no-progress")
    assert_error(code, err, "train", "--resume: no checkpoint", str(tmp_path / "run"))


# ------------------------------------------------------------------------------ export
def test_export_of_a_missing_checkpoint(capsys, tmp_path):
    code, err = run(capsys, "export", tmp_path / "none.pt", "-o", tmp_path / "out")
    # export.py reports its own errors as "cgml export: cannot export ...": any one line will do
    assert_error(code, err, "export", str(tmp_path / "none.pt"), kind=None)
    assert not (tmp_path / "out").exists()


def test_export_of_a_garbage_file_is_one_line(capsys, tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint" * 10)
    code, err = run(capsys, "export", garbage, "-o", tmp_path / "out")
    assert_error(code, err, "export", str(garbage), kind=None)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- evaluate
def _evaluate(capsys, model, data, out, *extra):
    return run(capsys, "evaluate", "--model", model, "--data", data, "--out", out, "--no-progress", "--no-sl",
               "--no-md-timing", *extra)


@pytest.mark.parametrize("factor", ["0", "-2", "nan", "inf"])
def test_evaluate_refuses_a_non_positive_rollout_factor(capsys, exported_tiny_model, chain_data_dir, tmp_path,
                                                         factor):
    out = tmp_path / "report"
    code, err = _evaluate(capsys, exported_tiny_model, chain_data_dir, out, "--rollout-factor", factor)
    assert_error(code, err, "evaluate", "rollout factor must be a positive number")
    assert not out.exists()  # no report claiming 0 collisions


def test_evaluate_refuses_a_negative_seed(capsys, exported_tiny_model, chain_data_dir, tmp_path):
    code, err = _evaluate(capsys, exported_tiny_model, chain_data_dir, tmp_path / "r", "--seed", "-1")
    assert_error(code, err, "evaluate", "seed must be an integer in [0, 2147483647], got -1")


@pytest.mark.parametrize("replicas, message", [("0", "replicas must be an integer >= 1, got 0"),
                                               ("100000", "100000 replicas need 100000 distinct start windows")])
def test_evaluate_refuses_bad_replica_counts(capsys, exported_tiny_model, chain_data_dir, tmp_path, replicas,
                                             message):
    code, err = _evaluate(capsys, exported_tiny_model, chain_data_dir, tmp_path / "r", "--replicas", replicas)
    assert_error(code, err, "evaluate", message)
    assert not (tmp_path / "r").exists()  # refused before any rollout


@pytest.mark.parametrize("option, value, message", [
    ("--langevin-levels", "99", "Langevin levels must be in [1, "),
    ("--langevin-levels", "0", "Langevin levels must be in [1, "),
    ("--langevin-steps", "-1", "Langevin steps must be an integer >= 0, got -1"),
])
def test_evaluate_refuses_bad_refinement_settings(capsys, exported_tiny_model, chain_data_dir, tmp_path, option,
                                                  value, message):
    code, err = _evaluate(capsys, exported_tiny_model, chain_data_dir, tmp_path / "r", option, value)
    assert_error(code, err, "evaluate", message)
    assert not (tmp_path / "r").exists()


def test_evaluate_missing_model_dir(capsys, chain_data_dir, tmp_path):
    code, err = _evaluate(capsys, tmp_path / "nomodel", chain_data_dir, tmp_path / "r")
    assert_error(code, err, "evaluate", f"model directory {tmp_path / 'nomodel'} does not exist")


def test_evaluate_directory_that_is_not_a_model(capsys, chain_data_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    code, err = _evaluate(capsys, tmp_path / "empty", chain_data_dir, tmp_path / "r")
    assert_error(code, err, "evaluate", str(tmp_path / "empty" / "simulator.json"), "not found")


def test_evaluate_corrupt_model_names_the_directory(capsys, exported_tiny_model, chain_data_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(exported_tiny_model, model)
    (model / "embedding.pt").write_bytes(b"PK\x03\x04 truncated zip")
    code, err = _evaluate(capsys, model, chain_data_dir, tmp_path / "r")
    assert_error(code, err, "evaluate", f"{model}: cannot load the exported model")


def test_evaluate_missing_data_dir(capsys, exported_tiny_model, tmp_path):
    code, err = _evaluate(capsys, exported_tiny_model, tmp_path / "nodata", tmp_path / "r")
    assert_error(code, err, "evaluate", f"data directory {tmp_path / 'nodata'} does not exist")


def test_evaluate_duplicate_and_empty_model_labels(capsys, exported_tiny_model, chain_data_dir, tmp_path):
    code, err = run(capsys, "evaluate", "--model", f"a={exported_tiny_model}", "--model", f"a={exported_tiny_model}",
                    "--data", chain_data_dir, "--out", tmp_path / "r")
    assert_error(code, err, "evaluate", "label 'a' given twice")
    code, err = run(capsys, "evaluate", "--model", "a=", "--data", chain_data_dir, "--out", tmp_path / "r")
    assert_error(code, err, "evaluate", "--model 'a=': no model directory")


# -------------------------------------------------------------------------------- demo
@pytest.mark.parametrize("option, value, message", [
    ("--rollout-factor", "0", "rollout factor must be a positive number"),
    ("--rollout-factor", "-1", "rollout factor must be a positive number"),
    ("--train-steps", "0", "train steps must be an integer >= 1, got 0"),
    ("--seed", "-3", "seed must be an integer in [0, 2147483647], got -3"),
    ("--replicas", "0", "replicas must be an integer >= 1, got 0"),
])
def test_demo_refuses_bad_options_before_any_work(capsys, tmp_path, option, value, message):
    out = tmp_path / "demo"
    code, err = run(capsys, "demo", "--out", out, "--no-progress", option, value)
    assert_error(code, err, "demo", message)
    assert not out.exists()


# ----------------------------------------------------------------------- other errors
def test_keyboard_interrupt_exits_130(capsys, monkeypatch, tmp_path):
    from openmm_cgml import evaluate

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate, "run_evaluation", interrupted)
    code, err = run(capsys, "evaluate", "--model", tmp_path, "--data", tmp_path, "--out", tmp_path / "r")
    assert code == 130
    assert err.strip() == "cgml evaluate: interrupted"
    with pytest.raises(KeyboardInterrupt):
        cgml(["--debug", "evaluate", "--model", str(tmp_path), "--data", str(tmp_path), "--out", str(tmp_path)])


def test_openmm_exception_is_a_user_error(capsys, monkeypatch, tmp_path):
    import openmm

    from openmm_cgml import evaluate

    def fails(*args, **kwargs):
        raise openmm.OpenMMException("CGMLIntegrator: step 7 produced non-finite positions\nmore detail")

    monkeypatch.setattr(evaluate, "run_evaluation", fails)
    code, err = run(capsys, "evaluate", "--model", tmp_path, "--data", tmp_path, "--out", tmp_path / "r")
    line = assert_error(code, err, "evaluate", "step 7 produced non-finite positions")
    assert "more detail" not in line  # first line of a multi-line message


def test_unexpected_exception_is_an_internal_error(capsys, monkeypatch, tmp_path):
    from openmm_cgml import evaluate

    def bug(*args, **kwargs):
        raise TypeError("unsupported operand")

    monkeypatch.setattr(evaluate, "run_evaluation", bug)
    code, err = run(capsys, "evaluate", "--model", tmp_path, "--data", tmp_path, "--out", tmp_path / "r")
    assert_error(code, err, "evaluate", "TypeError: unsupported operand", "--debug", status=1, kind="internal error")


def test_under_torchrun_the_rank_is_named(capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    code, err = run(capsys, "train", "chain-tiny", "--set", "seq_len=three")
    assert code == 2 and "Traceback" not in err
    assert err.strip().startswith("cgml train [rank 1]: error: ") and "config key seq_len" in err


@pytest.mark.parametrize("argv", [["--debug", "train", "no-such-config"], ["train", "no-such-config", "--debug"]])
def test_debug_shows_the_traceback(argv):
    with pytest.raises(FileNotFoundError, match="no config file 'no-such-config'"):
        cgml(argv)


def test_debug_from_the_environment(monkeypatch):
    monkeypatch.setenv("CGML_DEBUG", "1")
    with pytest.raises(ValueError, match="config key seq_len"):
        cgml(["train", "chain-tiny", "--set", "seq_len=three"])


def test_debug_flag_prints_a_traceback_when_run_as_a_program(tmp_path):
    """The real entry point: one line without --debug, a traceback with it."""
    import subprocess
    import sys

    base = [sys.executable, "-m", "openmm_cgml.cli", "train", "chain-tiny", "--set", "seq_len=three"]
    plain = subprocess.run(base, capture_output=True, text=True, cwd=tmp_path)
    assert plain.returncode == 2 and plain.stderr.count("\n") == 1 and "Traceback" not in plain.stderr
    debug = subprocess.run(base + ["--debug"], capture_output=True, text=True, cwd=tmp_path)
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr
    assert "ConfigError: " in debug.stderr and "config key seq_len" in debug.stderr


def test_help_documents_the_exit_statuses(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cgml(["--help"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "exit status 2" in out and "--debug" in out and "130" in out
    assert cli.EXIT_ERROR == 2 and cli.EXIT_INTERRUPTED == 130


@pytest.mark.parametrize("option, value, message", [
    ("--n-train", "-1", "argument --n-train: must be >= 0, got -1"),
    ("--threads", "0", "argument --threads: must be >= 1, got 0"),
    ("--n-frames", "many", "argument --n-frames: expected an integer, got 'many'"),
])
def test_generate_refuses_bad_counts(capsys, tmp_path, option, value, message):
    with pytest.raises(SystemExit) as exit_info:  # argparse's own usage error
        cgml(["generate", "chain", "--out", str(tmp_path / "data"), option, value])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "data").exists()
