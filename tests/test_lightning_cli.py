"""``LOBSPruning`` under ``LightningCLI`` of every installed namespace: configured from the command line and
YAML, ``--print_config`` writes a config that runs again, ``method``/``allocation`` show their choices."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml

from lightning_helpers import lit_mlp_class, zeros
from lightning_lobs import LOBSPruning
from script_loader import load_example

pytest.importorskip("jsonargparse")

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*number of training batches.*"),
    pytest.mark.filterwarnings("ignore:.*isinstance\\(treespec, LeafSpec\\)` is deprecated.*"),
    pytest.mark.filterwarnings("ignore:.*LightningCLI's args parameter.*"),
    pytest.mark.filterwarnings("ignore:.*tensorboardX.*"),
]

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.logger=false"]


def cli(ns, args):
    """``LightningCLI(LitMLP, args=...)`` of namespace ``ns``."""
    module = importlib.import_module(f"{ns.__name__}.cli")
    return module.LightningCLI(lit_mlp_class(ns.__name__), args=args, save_config_callback=None)


def lobs_of(trainer) -> LOBSPruning:
    (cb,) = [c for c in trainer.callbacks if isinstance(c, LOBSPruning)]
    return cb


def test_print_config_round_trips_and_the_saved_config_runs(ns, tmp_path, capsys):
    args = [
        "fit",
        "--trainer.callbacks+=lightning_lobs.LOBSPruning",
        '--trainer.callbacks.sparsity=[0.5, {"net.0": 0.8, "net.*": 0.6}]',
        "--trainer.callbacks.prune_epoch=[1, 2]",
        "--trainer.callbacks.method=exact",
        "--trainer.callbacks.allocation=uniform",
        "--trainer.callbacks.calibration_batches=2",
        "--trainer.callbacks.log_table=false",
        "--trainer.callbacks.state_key=mlp",
        "--trainer.callbacks.solver.damp=0.02",
        "--trainer.callbacks.calibration.hessian_dtype=torch.float32",
        "--trainer.max_epochs=3",
        "--trainer.limit_train_batches=2",
        "--trainer.accelerator=cpu",
        *QUIET,
        "--print_config",
    ]
    with pytest.raises(SystemExit) as exc:
        cli(ns, args)
    assert exc.value.code in (0, None)
    text = capsys.readouterr().out
    assert "Unable to serialize" not in text
    config = yaml.safe_load(text)
    (entry,) = [c for c in config["trainer"]["callbacks"] if c["class_path"] == "lightning_lobs.LOBSPruning"]
    init = entry["init_args"]
    assert init["sparsity"] == [0.5, {"net.0": 0.8, "net.*": 0.6}]
    assert init["prune_epoch"] == [1, 2]
    assert init["method"] == "exact" and init["allocation"] == "uniform" and init["state_key"] == "mlp"
    assert init["solver"]["damp"] == 0.02

    path = tmp_path / "config.yaml"
    path.write_text(text)
    run = cli(ns, ["fit", "--config", str(path)])
    cb = lobs_of(run.trainer)
    assert cb.pruned_epochs == [1, 2]
    assert cb.options[1].sparsity == {"net.0": 0.8, "net.*": 0.6}
    assert cb.options[0].solver.damp == 0.02 and cb.options[0].calibration.hessian_dtype.is_floating_point
    model = run.model
    assert zeros(model, "net.0") >= round(0.8 * 24 * 32)


def test_help_shows_the_choices_of_method_and_allocation(ns, capsys):
    with pytest.raises(SystemExit):
        cli(
            ns,
            [
                "fit",
                "--trainer.callbacks+=lightning_lobs.LOBSPruning",
                "--trainer.callbacks.help",
                "lightning_lobs.LOBSPruning",
            ],
        )
    text = capsys.readouterr().out
    assert "{auto,exact,lobs,fast,admm}" in text
    assert "Literal['global', 'uniform']" in text  # a union with GlobalAllocation: shown as its type


def test_the_cli_runs_method_admm(ns):
    args = [
        "fit",
        "--trainer.callbacks+=lightning_lobs.LOBSPruning",
        "--trainer.callbacks.sparsity=0.6",
        "--trainer.callbacks.prune_epoch=1",
        "--trainer.callbacks.method=admm",
        "--trainer.callbacks.calibration_batches=2",
        "--trainer.callbacks.log_table=false",
        "--trainer.max_epochs=2",
        "--trainer.limit_train_batches=2",
        "--trainer.accelerator=cpu",
        *QUIET,
    ]
    run = cli(ns, args)
    cb = lobs_of(run.trainer)
    assert cb.method == "admm" and cb.pruned_epochs == [1]
    assert {r.method for r in cb.last_report.layers.values()} == {"admm"}


def test_bad_choice_is_refused_by_the_cli(ns, capsys):
    with pytest.raises(SystemExit):
        cli(
            ns, ["fit", "--trainer.callbacks+=lightning_lobs.LOBSPruning", "--trainer.callbacks.method=fastest", *QUIET]
        )
    err = capsys.readouterr().err
    assert "fastest" in err and "admm" in err  # the refusal lists the choices, the new method among them


@pytest.mark.examples
def test_example_config_runs(tmp_path, monkeypatch):
    example = load_example("lobs_cli")
    monkeypatch.chdir(tmp_path)
    run = example.main(
        [
            "fit",
            "--config",
            str(EXAMPLES / "lobs_cli.yaml"),
            "--trainer.max_epochs=5",
            "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=1",
            "--data.n_train=512",
            "--model.hidden=[32, 16]",
            *QUIET,
        ]
    )
    cb = lobs_of(run.trainer)
    assert cb.pruned_epochs == [2, 4]
    assert cb.last_report.sparsity == pytest.approx(0.8, abs=0.01)


@pytest.mark.examples
def test_the_override_command_in_the_example_docstring_runs(tmp_path, monkeypatch):
    """The docstring's ``--trainer.callbacks.init_args...`` command, read from the docstring itself, with a shorter run."""
    import shlex

    example = load_example("lobs_cli")
    text = example.__doc__.replace("\\\n", " ")
    (line,) = [ln for ln in text.splitlines() if "init_args" in ln and ln.strip().startswith("python")]
    args = shlex.split(line)[2:]
    args = [str(EXAMPLES / "lobs_cli.yaml") if a == "examples/lobs_cli.yaml" else a for a in args]
    monkeypatch.chdir(tmp_path)
    run = example.main(
        [
            *args,
            "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=1",
            "--data.n_train=512",
            "--model.hidden=[32, 16]",
            "--trainer.callbacks.init_args.calibration_batches=2",
            *QUIET,
        ]
    )
    cb = lobs_of(run.trainer)
    assert cb.prune_epochs == [2, 4, 6] and cb.pruned_epochs == [2, 4, 6]
    assert cb.last_report.sparsity == pytest.approx(0.9, abs=0.01)


def test_gradual_schedule_from_the_command_line_round_trips_and_prunes(ns, tmp_path, capsys):
    args = [
        "fit",
        "--trainer.callbacks+=lightning_lobs.LOBSPruning",
        "--trainer.callbacks.schedule=lightning_lobs.GradualSchedule",
        "--trainer.callbacks.schedule.final=0.6",
        "--trainer.callbacks.schedule.end=2",
        "--trainer.callbacks.allocation=uniform",
        "--trainer.callbacks.calibration_batches=2",
        "--trainer.callbacks.log_table=false",
        "--trainer.max_epochs=3",
        "--trainer.limit_train_batches=2",
        "--trainer.accelerator=cpu",
        *QUIET,
    ]
    with pytest.raises(SystemExit) as exc:
        cli(ns, [*args, "--print_config"])
    assert exc.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)
    (entry,) = [c for c in config["trainer"]["callbacks"] if c["class_path"] == "lightning_lobs.LOBSPruning"]
    schedule = entry["init_args"]["schedule"]
    assert schedule["class_path"] == "lightning_lobs.GradualSchedule"
    assert schedule["init_args"]["final"] == 0.6 and schedule["init_args"]["end"] == 2

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    cb = lobs_of(cli(ns, ["fit", "--config", str(path)]).trainer)
    assert cb.pruned_epochs == [1, 2] and cb.sparsities[-1] == 0.6
