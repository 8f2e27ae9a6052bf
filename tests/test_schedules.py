"""Prune schedules as objects: explicit lists, a function of the epoch/step, and the gradual (cubic) ramp.

The schedule objects are pure (no Trainer): what is due at a point, whether a run reaches every
point, the checkpoint form. Then ``LOBSPruning(schedule=...)`` under a Trainer: prunes at each
point to its value, refuses an unreachable point before training, restores on resume.
"""

from __future__ import annotations

import sys

import pytest
import torch

from lightning_helpers import BothCallback, lit_mlp, make_trainer
from lightning_lobs import GradualSchedule, LOBSPruning, PruneSchedule, SparsitySchedule
from lightning_lobs.schedules import Due, ScheduleRun, schedule_from_args, steps_per_epoch

EPS = sys.float_info.epsilon

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*number of training batches.*"),
    pytest.mark.filterwarnings("ignore:.*isinstance\\(treespec, LeafSpec\\)` is deprecated.*"),
    pytest.mark.filterwarnings(
        "ignore:Be aware that when using `ckpt_path`.*"
    ),  # the ModelCheckpoint is not needed to resume
]


def zhu_gupta(s_i: float, s_f: float, t0: int, n: int, dt: int, t: int) -> float:
    """s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3, Zhu & Gupta 2017, eq. (1)."""
    return s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt)) ** 3


# --------------------------------------------------------------------------- the objects, no Trainer


def test_gradual_schedule_follows_the_cubic_ramp_and_ends_at_final():
    g = GradualSchedule(initial=0.2, final=0.8, start=2, end=8, every=2)
    assert g.points == (2, 4, 6, 8) and g.unit == "epoch"
    for t, s in zip(g.points, g.sparsities):
        # a few roundings of numbers <= 1: a few eps
        assert abs(s - zhu_gupta(0.2, 0.8, 2, 3, 2, t)) <= 8 * EPS, t
    assert g.sparsities[0] == 0.2 and g.sparsities[-1] == 0.8
    steps = [b - a for a, b in zip(g.sparsities, g.sparsities[1:])]
    assert steps[0] > steps[1] > steps[2] > 0  # fast first, slow near final


def test_gradual_example_of_the_readme():
    g = GradualSchedule(initial=0.0, final=0.9, start=0, end=8, every=2)
    assert g.points == (2, 4, 6, 8) and [round(s, 2) for s in g.sparsities] == [0.52, 0.79, 0.89, 0.90]


def test_gradual_schedule_leaves_out_a_point_with_nothing_to_prune():
    g = GradualSchedule(initial=0.0, final=0.9, start=0, end=300, every=100, unit="step")
    assert g.points == (100, 200, 300) and g.unit == "step"
    assert g.sparsity_at(300) == 0.9
    with pytest.raises(KeyError, match=r"step 0 is not a prune point"):
        g.sparsity_at(0)


def test_sparsity_function_is_evaluated_at_every_point_when_built():
    seen = []

    def fn(epoch):
        seen.append(epoch)
        return {"net.0": 0.3 + 0.1 * epoch, "net.4": 0.5}

    s = SparsitySchedule(fn, points=range(1, 6, 2))
    assert seen == [1, 3, 5] and s.points == (1, 3, 5)
    assert s.sparsity_at(3) == {"net.0": pytest.approx(0.6, abs=4 * EPS), "net.4": 0.5}
    # a per-layer callable is a value the function may return too
    per_layer = lambda name, module: 0.5  # noqa: E731
    assert SparsitySchedule(lambda e: per_layer, [0]).sparsities == (per_layer,)


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: SparsitySchedule(lambda e: 0.75 - 0.25 * e, [0, 2]), r"fn\(2\) = 0.25 is lower than fn\(0\) = 0.75"),
        (
            lambda: SparsitySchedule(lambda e: {"a": 0.5} if e < 3 else {"a": 0.2}, [1, 3]),
            r"layer 'a' cannot reach fn\(3\) = 0.2: fn\(1\) already prunes it to 0.5",
        ),
        (
            lambda: SparsitySchedule(lambda e: 0.3 * e, [1, 2, 4]),
            r"fn\(4\) \(the sparsity at epoch 4\) must be in \[0, 1\).*got 1.2",
        ),
        (lambda: SparsitySchedule(lambda e: [0.1, 0.2][e], [0, 2]), r"sparsity function raised at epoch 2: IndexError"),
        (lambda: SparsitySchedule(lambda e: "0.5", [0]), r"fn\(0\) \(the sparsity at epoch 0\) must be a number"),
        (lambda: SparsitySchedule(lambda e: 0.5, [2, 2]), r"strictly increasing, got \[2, 2\]"),
        (lambda: SparsitySchedule(lambda e: 0.5, []), r"no points"),
        (lambda: SparsitySchedule(lambda e: 0.5, 3), r"points must be a list or range of epochs"),
        (lambda: SparsitySchedule(0.5, [1]), r"fn must be a function of the epoch"),
        (lambda: SparsitySchedule(lambda e: 0.5, [1], unit="batch"), r"unit must be 'epoch' or 'step'"),
        (
            lambda: GradualSchedule(0.0, 0.9, start=0, end=10, every=3),
            r"end - start = 10 is not a multiple of every=3.*end=9 or end=12",
        ),
        (lambda: GradualSchedule(0.5, 0.5, end=4), r"initial \(0.5\) must be below final \(0.5\)"),
        (lambda: GradualSchedule(0.0, 1.0, end=4), r"final must be in \[0, 1\)"),
        (lambda: GradualSchedule(0.0, 0.9, start=4, end=4), r"end \(4\) must be after start \(4\)"),
        (lambda: GradualSchedule(0.0, 0.9, end=4, every=0), r"every must be a whole number of epochs >= 1"),
        (lambda: GradualSchedule(0.0, 0.9, start=-1, end=4), r"start must be an epoch number >= 0"),
    ],
)
def test_bad_schedules_are_refused_when_built(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_due_epochs_only_at_their_start_steps_once_reached():
    epochs = PruneSchedule([1, 3], [0.5, 0.7])
    assert (
        epochs.due(1) == [1]
        and epochs.due(2) == []
        and epochs.due(3, done=[1]) == [3]
        and epochs.due(3, done=[1, 3]) == []
    )
    steps = SparsitySchedule(lambda s: 0.5, [4, 6, 9], unit="step")
    assert steps.due(3) == [] and steps.due(4) == [4] and steps.due(7, done=[4]) == [6]
    assert steps.due(10, done=[4]) == [6, 9]  # passed over: the last one subsumes the others
    assert steps.pending(done=[4, 6]) == [9]


def test_reachability_against_max_epochs_and_max_steps():
    g = GradualSchedule(0.0, 0.8, start=0, end=6, every=2)  # epochs 2, 4, 6
    g.check_reachable(max_epochs=7)
    g.check_reachable(max_epochs=-1, max_steps=None)  # no limit
    with pytest.raises(
        ValueError,
        match=r"the schedule's epoch 6 is beyond the last epoch of training \(max_epochs=6, epochs are 0\.\.5\); lower the schedule's last epoch",
    ):
        g.check_reachable(max_epochs=6)
    g.check_reachable(done=[2, 4, 6], max_epochs=6)  # every point already pruned
    with pytest.raises(
        ValueError,
        match=r"epoch 4 is never reached: max_steps=20 ends training after 20 optimizer steps, "
        r"and with 5 steps per epoch epoch 4 starts after 20\. Raise max_steps above 30 or lower",
    ):
        g.check_reachable(max_epochs=7, max_steps=20, steps_per_epoch=5)
    with pytest.raises(
        ValueError, match=r"epoch 2 is never reached: .* epoch 2 starts after 10\. Raise max_steps above 30 "
    ):
        g.check_reachable(max_steps=10, steps_per_epoch=5)  # the fix names the last point out of reach
    g.check_reachable(max_epochs=7, max_steps=31, steps_per_epoch=5)
    steps = GradualSchedule(0.0, 0.8, start=0, end=30, every=10, unit="step")
    with pytest.raises(
        ValueError, match=r"the schedule's step 30 is never reached: max_steps=30 ends training after step 29;"
    ):
        steps.check_reachable(max_steps=30)
    with pytest.raises(ValueError, match=r"step 30 is never reached: max_epochs=3 with 10 steps per epoch"):
        steps.check_reachable(max_epochs=3, steps_per_epoch=10)
    steps.check_reachable(max_epochs=4, steps_per_epoch=10)


def test_a_limit_of_zero_is_a_limit_not_no_limit():
    """Only None and negative limits mean "no limit": max_epochs=0 or max_steps=0 trains nothing, so a
    schedule's first point is never reached and is refused before training."""
    epochs = PruneSchedule([0], 0.5)
    with pytest.raises(ValueError, match=r"epoch 0 is beyond the last epoch of training \(max_epochs=0"):
        epochs.check_reachable(max_epochs=0)
    with pytest.raises(ValueError, match=r"epoch 0 is never reached: max_steps=0"):
        epochs.check_reachable(max_steps=0, steps_per_epoch=5)
    steps = PruneSchedule([0], 0.5, unit="step")
    with pytest.raises(ValueError, match=r"step 0 is never reached: max_steps=0"):
        steps.check_reachable(max_steps=0)
    with pytest.raises(ValueError, match=r"step 0 is never reached: max_epochs=0"):
        steps.check_reachable(max_epochs=0, steps_per_epoch=5)
    epochs.check_reachable(max_epochs=1, max_steps=1, steps_per_epoch=5)
    steps.check_reachable(max_epochs=1, max_steps=1, steps_per_epoch=5)


def test_checkpoint_form_is_the_table_and_resume_checks_the_points_run():
    g = GradualSchedule(0.0, 0.9, start=0, end=3)
    table = g.state_dict()
    assert [d["epoch"] for d in table] == [1, 2, 3] and [d["sparsity"] for d in table] == list(g.sparsities)
    same = PruneSchedule([1, 2, 3], list(g.sparsities))  # the same schedule as lists: the same state
    assert same.state_dict() == table
    same.check_resume(table, {"epoch": [1, 2]})
    with pytest.raises(
        ValueError, match=r"resuming with a different prune schedule: the checkpoint was pruned at epoch 1"
    ):
        GradualSchedule(0.0, 0.8, start=0, end=3).check_resume(table, {"epoch": [1]})


def test_a_run_says_which_prune_is_due_and_what_it_subsumes():
    run = ScheduleRun(PruneSchedule([4, 6, 9], [0.3, 0.5, 0.7], unit="step"))
    assert run.due(3) is None and run.due(4) == Due(index=0, point=4, passed=())
    later = run.with_done(4)
    assert run.done == () and later.done == (4,)  # a new run: the old one is what a failed prune rolls back to
    assert later.due(10) == Due(index=2, point=9, passed=(6,))  # a resume past 6 and 9: 9's step, 6 subsumed
    assert later.with_done(6, 9).due(10) is None and later.with_done(6, 9).pending() == []
    epochs = ScheduleRun(PruneSchedule([1, 3], [0.5, 0.7]), done=(1,))
    assert epochs.due(2) is None and epochs.due(3) == Due(index=1, point=3) and epochs.pending() == [3]


def test_a_run_checks_only_its_pending_points_against_the_limits():
    run = ScheduleRun(PruneSchedule([0, 5], [0.3, 0.5]))
    with pytest.raises(ValueError, match=r"prune_epoch 5 is beyond the last epoch of training \(max_epochs=3"):
        run.check_reachable(max_epochs=3)
    with pytest.raises(ValueError, match=r"prune_epoch 5 is never reached: max_steps=40 .* with 8 steps per epoch"):
        run.check_reachable(max_epochs=9, max_steps=40, steps_per_epoch=8)
    ScheduleRun(run.schedule, done=(0, 5)).check_reachable(max_epochs=3, max_steps=1, steps_per_epoch=8)


def test_a_runs_checkpoint_form_round_trips_and_refuses_a_changed_schedule():
    run = ScheduleRun(PruneSchedule([1, 2], [0.5, 0.8])).with_done(1)
    state = run.to_state()
    assert state == {"pruned_epochs": [1], "schedule": [{"epoch": 1, "sparsity": 0.5}, {"epoch": 2, "sparsity": 0.8}]}
    assert list(state) == ["pruned_epochs", "schedule"]  # the order the callback's checkpoints have always had
    fresh = ScheduleRun(PruneSchedule([1, 2], [0.5, 0.8]))
    assert fresh.from_state(state).done == (1,) and fresh.done == ()
    assert fresh.from_state({"pruned_epochs": [1, 2]}).done == (1, 2)  # written before schedules were saved
    steps = ScheduleRun(PruneSchedule([3], 0.5, unit="step")).with_done(3).to_state()
    assert steps == {"pruned_steps": [3], "schedule": [{"step": 3, "sparsity": 0.5}]}
    with pytest.raises(
        ValueError, match=r"resuming with a different prune schedule: the checkpoint was pruned at epoch 1 with \[0.5\]"
    ):
        ScheduleRun(PruneSchedule([1, 2], [0.6, 0.8])).from_state(state)


def test_an_explicit_sparsity_beside_a_schedule_is_refused_naming_both_even_the_default_value():
    """``LOBSPruning(sparsity=0.9, schedule=...)`` used to be taken for the default and the 0.9 dropped silently."""
    g = GradualSchedule(initial=0.0, final=0.8, start=0, end=4, every=2)
    for sparsity in (0.9, 0.5, [0.5, 0.8], {"net.*": 0.9}):
        with pytest.raises(
            ValueError, match=r"give schedule or sparsity, not both: the schedule sets the prune points"
        ):
            LOBSPruning(sparsity=sparsity, schedule=g)
    assert LOBSPruning(schedule=g).schedule is g
    assert LOBSPruning(sparsity=None, schedule=g).schedule is g  # what LightningCLI passes when sparsity is unset
    default = LOBSPruning()
    assert default.schedule.sparsities == (0.9,) and default.schedule.points == (0,)


def test_schedule_from_the_callbacks_arguments():
    built = schedule_from_args([0.5, 0.8], [1, 2], None, None, uniform=False)
    assert built.points == (1, 2) and built.unit == "epoch" and built.sparsities == (0.5, 0.8)
    assert schedule_from_args(0.5, None, [3, 9], None, uniform=False).points == (3, 9)
    default = schedule_from_args(None, None, None, None, uniform=False)  # nothing given: 0.9 at epoch 0
    assert default.points == (0,) and default.sparsities == (0.9,)
    g = GradualSchedule(end=4)
    assert schedule_from_args(None, None, None, g, uniform=False) is g
    for explicit in (0.9, 0.5):  # 0.9 too: it was once taken for the default and dropped silently
        with pytest.raises(ValueError, match=r"give schedule or sparsity, not both"):
            schedule_from_args(explicit, None, None, g, uniform=False)
    mixed = ([0.7, {"net.0": 0.6}], [1, 2], None, None)
    schedule_from_args(*mixed, uniform=False)  # a global allocation: net.0's share of 0.7 is unknown
    with pytest.raises(ValueError, match=r"layer 'net.0' cannot reach sparsity\[1\] = 0.6"):
        schedule_from_args(*mixed, uniform=True)


@pytest.mark.parametrize(
    "batches, accumulate, want",
    [(8, 1, 8), (8, 3, 3), (9, 3, 3), (1, 4, 1), (5, 0, 5), (float("inf"), 1, None), (0, 1, None)],
)
def test_steps_per_epoch_counts_the_last_partial_window(batches, accumulate, want):
    assert steps_per_epoch(batches, accumulate) == want


# --------------------------------------------------------------------------- LOBSPruning(schedule=...)


def test_callback_takes_the_schedules_points_and_sparsities():
    g = GradualSchedule(0.0, 0.8, start=0, end=4, every=2, unit="step")
    cb = LOBSPruning(schedule=g)
    assert cb.schedule is g and cb.prune_steps == [2, 4] and cb.prune_epochs == []
    assert [o.sparsity for o in cb.options] == list(g.sparsities)
    assert "prune_step" in cb.state_key  # derived from the points and values, as for lists
    assert LOBSPruning(sparsity=list(g.sparsities), prune_step=[2, 4]).state_key == cb.state_key


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(prune_epoch=[1, 2]), r"give schedule or prune_epoch, not both"),
        (dict(sparsity=0.5, prune_step=3), r"give schedule or sparsity / prune_step, not both"),
    ],
)
def test_schedule_with_points_or_sparsity_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LOBSPruning(schedule=GradualSchedule(end=4), **kwargs)


def test_schedule_in_the_wrong_argument_is_refused():
    with pytest.raises(ValueError, match=r"is a schedule: pass it as LOBSPruning\(schedule=...\)"):
        LOBSPruning(sparsity=GradualSchedule(end=4))
    with pytest.raises(ValueError, match=r"schedule must be a PruneSchedule.*got <function"):
        LOBSPruning(schedule=lambda epoch: 0.5)


def test_uniform_allocation_checks_a_schedules_mappings_against_its_floats():
    spec = SparsitySchedule(lambda e: 0.6 if e == 0 else {"net.0": 0.4}, [0, 1])
    LOBSPruning(schedule=spec)  # a global allocation: net.0's share of 0.6 is unknown here
    with pytest.raises(ValueError, match=r"layer 'net.0' cannot reach fn\(1\) = 0.4: fn\(0\) already prunes it to 0.6"):
        LOBSPruning(schedule=spec, allocation="uniform")


def lobs(**kwargs) -> LOBSPruning:
    return LOBSPruning(calibration_batches=2, log_table=False, allocation="uniform", prune_head=True, **kwargs)


def assert_masks_hold_all(cb: LOBSPruning, model) -> None:
    assert len(cb.masks) == 3
    for name, mask in cb.masks.masks.items():
        w = model.get_submodule(name).weight.detach()
        assert torch.all(w[~mask] == 0), name


def layer_sparsity(model, name: str) -> float:
    w = model.get_submodule(name).weight
    return float((w == 0).sum()) / w.numel()


def test_gradual_schedule_prunes_at_each_point_to_its_value_and_resumes(ns, tmp_path):
    model = lit_mlp(ns, n=128)  # 2 steps per epoch
    g = GradualSchedule(initial=0.0, final=0.75, start=0, end=3)  # epochs 1, 2, 3
    cb = lobs(schedule=g)
    reached = []

    class Watch(BothCallback):
        def on_train_epoch_end(self, trainer, pl_module):
            reached.append(layer_sparsity(pl_module, "net.2"))

    ckpt = ns.callbacks.ModelCheckpoint(dirpath=str(tmp_path), filename="{epoch}", save_top_k=-1)
    make_trainer(ns, 4, [cb, Watch(), ckpt], tmp_path, enable_checkpointing=True).fit(model)
    assert cb.pruned_epochs == [1, 2, 3] and len(cb.reports) == 3
    cols = model.net[2].weight.shape[1]
    assert len(reached) == 4
    for got, want in zip(reached, (0.0, *g.sparsities)):
        assert abs(got - want) <= 1.0 / cols, (reached, g.sparsities)  # whole weights per row
    assert_masks_hold_all(cb, model)

    resumed = lit_mlp(ns, n=128, seed=5)  # its weights come from the checkpoint of epoch 2: pruned at 1 and 2
    cb2 = lobs(schedule=GradualSchedule(initial=0.0, final=0.75, start=0, end=3))
    make_trainer(ns, 4, [cb2]).fit(resumed, ckpt_path=str(tmp_path / "epoch=2.ckpt"))
    assert cb2.pruned_epochs == [1, 2, 3] and len(cb2.reports) == 1  # 1 and 2 restored, not pruned again
    assert abs(layer_sparsity(resumed, "net.2") - 0.75) <= 1.0 / cols
    assert_masks_hold_all(cb2, resumed)
    with pytest.raises(
        ValueError, match=r"resuming with a different prune schedule: the checkpoint was pruned at epoch 1, epoch 2"
    ):
        make_trainer(ns, 4, [lobs(schedule=GradualSchedule(0.0, 0.8, start=0, end=3))]).fit(
            lit_mlp(ns, n=128), ckpt_path=str(tmp_path / "epoch=2.ckpt")
        )


def test_unreachable_schedule_is_refused_before_training(ns):
    model = lit_mlp(ns, n=128)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"the schedule's epoch 4 is beyond the last epoch of training \(max_epochs=4"):
        make_trainer(ns, 4, [lobs(schedule=GradualSchedule(0.0, 0.8, start=0, end=4, every=2))]).fit(model)
    steps = SparsitySchedule(lambda s: 0.5, [1, 4], unit="step")
    with pytest.raises(
        ValueError, match=r"the schedule's step 4 is never reached: max_epochs=2 with 2 steps per epoch"
    ):
        make_trainer(ns, 2, [lobs(schedule=steps)]).fit(model)
    assert model.steps == 0 and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_step_schedule_prunes_before_each_step(ns):
    model = lit_mlp(ns, n=128)
    cb = lobs(schedule=SparsitySchedule(lambda step: 0.2 * step, [1, 3], unit="step"))
    seen = []

    class StepWatch(BothCallback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append((trainer.global_step, layer_sparsity(pl_module, "net.0")))

    make_trainer(ns, 2, [cb, StepWatch()]).fit(model)
    assert cb.pruned_steps == [1, 3]
    assert [step for step, _ in seen] == [0, 1, 2, 3]
    for (_step, got), want in zip(seen, (0.0, 0.2, 0.2, 0.6)):
        assert abs(got - want) <= 1.0 / 32, seen  # net.0 is 24x32: whole weights per row


def test_callback_with_a_function_schedule_pickles():
    """ddp_spawn pickles the callbacks: a lambda schedule must not stop it (its values are kept, not the function)."""
    import pickle

    cb = pickle.loads(pickle.dumps(LOBSPruning(schedule=SparsitySchedule(lambda e: 0.25 * e, [1, 2]))))
    assert cb.prune_epochs == [1, 2] and cb.sparsities == [0.25, 0.5] and cb.schedule.sparsities == (0.25, 0.5)
