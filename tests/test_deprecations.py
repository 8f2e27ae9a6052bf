"""Old import paths keep working for one version, each with a DeprecationWarning naming the new path."""

import importlib

import pytest

import lightning_lobs
from lightning_lobs import config


@pytest.mark.parametrize("name", ["PruneOptions", "CalibrationOptions", "PruneProgress", "SparsitySpec", "as_fraction"])
def test_options_module_names_moved_to_config_warn_and_are_the_same_objects(name):
    options = importlib.import_module("lightning_lobs.options")
    with pytest.warns(DeprecationWarning, match=rf"lightning_lobs\.config\.{name}"):
        value = getattr(options, name)
    assert value is getattr(config, name)


def test_options_module_unknown_name_is_an_attribute_error():
    options = importlib.import_module("lightning_lobs.options")
    with pytest.raises(AttributeError, match="no attribute 'nonsense'"):
        options.nonsense  # noqa: B018


def test_public_names_come_from_their_one_home():
    for name in ("PruneOptions", "CalibrationOptions", "SolverOptions", "GlobalAllocation", "PruneProgress"):
        assert getattr(lightning_lobs, name) is getattr(config, name)
        assert getattr(config, name).__module__ == "lightning_lobs.config"


HESSIAN_MOVED_TO_LAYERS = {
    "SUPPORTED_TYPES": "PRUNABLE_TYPES",
    "is_supported": "is_prunable",
    "weight_columns": "matrix_cols",
    "is_linear_like": "is_linear_like",
    "is_hf_conv1d": "is_hf_conv1d",
    "output_rows": "output_rows",
    "to_rows": "to_rows",
    "from_rows": "from_rows",
    "num_groups": "num_groups",
    "has_bias": "has_bias",
    "weight_matrix": "weight_matrix",
    "set_weight_matrix": "set_weight_matrix",
    "unfold_input": "unfold_input",
}


@pytest.mark.parametrize("old,new", sorted(HESSIAN_MOVED_TO_LAYERS.items()))
def test_hessian_layer_helpers_moved_to_layers_warn_and_are_the_same_objects(old, new):
    hessian = importlib.import_module("lightning_lobs.hessian")
    layers = importlib.import_module("lightning_lobs.layers")
    with pytest.warns(
        DeprecationWarning, match=rf"lightning_lobs\.hessian\.{old} moved to lightning_lobs\.layers\.{new}"
    ):
        value = getattr(hessian, old)
    assert value is getattr(layers, new)
    assert old not in vars(hessian)  # only reachable through the warning __getattr__


def test_hessian_unknown_name_is_an_attribute_error():
    hessian = importlib.import_module("lightning_lobs.hessian")
    with pytest.raises(AttributeError, match="no attribute 'nonsense'"):
        hessian.nonsense  # noqa: B018
