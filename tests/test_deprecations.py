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
