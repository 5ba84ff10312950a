"""The Python/C++ contract: the extension's tables (chain kinds, smooth activations, penalty heads with their
reads-x column) equal the Python tables, a mismatch is refused on import, and chain descriptors are typed: named
fields, each checked when the native program is built."""
import pytest
import torch
from torch import nn

import dbprop
from dbprop import backends, nodes, penalties

pytestmark = pytest.mark.skipif(not dbprop.native_available(), reason="needs the native extension")


def test_tables_agree():
    from dbprop import _C
    assert sorted(_C.chain_kinds()) == sorted(nodes.chain_kinds())
    assert sorted(_C.activation_names()) == sorted(nodes.SMOOTH_ACTIVATIONS)
    assert dict(_C.penalty_heads()) == penalties.native_heads()
    assert penalties.native_heads()["alignment"] and not penalties.native_heads()["squared_norm"]
    backends.check_native_tables()


def test_a_mismatch_is_refused(monkeypatch):
    monkeypatch.setitem(nodes.SMOOTH_ACTIVATIONS, "swish2", lambda z, p1, p2: z)
    with pytest.raises(ImportError, match="smooth activations.*rebuild"):
        backends.check_native_tables()
    monkeypatch.delitem(nodes.SMOOTH_ACTIVATIONS, "swish2")
    monkeypatch.setattr(penalties.Alignment, "reads_x", False)
    with pytest.raises(ImportError, match=r"penalty heads \(name, reads x\)"):
        backends.check_native_tables()


CHAIN = nn.Sequential(nn.Conv2d(2, 3, 3, 1, "same"), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(3, 4, 2, padding=1),
                      nn.LeakyReLU(0.1), nn.AvgPool2d(2, divisor_override=3), nn.Dropout(0.3), nn.Flatten(),
                      nn.Linear(4 * 2 * 2, 5), nn.Identity())


def test_every_python_chain_kind_builds_a_native_program():
    program = dbprop.compile_model(CHAIN)
    assert program.native_chain
    kinds = {op.descriptor()[0] for op in program.ops}
    CHAIN.eval()
    try:
        kinds |= {op.descriptor()[0] for op in dbprop.compile_model(CHAIN).ops}
    finally:
        CHAIN.train()
    assert kinds == set(nodes.chain_kinds())
    program.native()  # every descriptor validated by its struct


def _program(descriptors):
    from dbprop import _C
    w = torch.randn(3, 2, 3, 3)
    return _C.Program(descriptors, [w], [None])


CONV = dict(stride=[1, 1], padding=[1, 1], dilation=[1, 1], groups=[1], pad=[])


@pytest.mark.parametrize("descriptor, message", [
    (("conv", {**CONV, "strides": [1, 1]}), "unknown descriptor field 'strides'"),
    (("conv", {k: v for k, v in CONV.items() if k != "groups"}), "lacks the field 'groups'"),
    (("conv", {**CONV, "padding": [1]}), "field 'padding' needs 2 values, got 1"),
    (("conv", {**CONV, "stride": [1.5, 1]}), "must hold integers"),
    (("conv", {**CONV, "stride": [0, 1]}), "conv stride values must be >= 1"),
    (("conv", {**CONV, "pad": [1, 1, 1]}), "'pad' needs 0 or 4 values"),
    (("convolution", CONV), "unknown op kind 'convolution'"),
])
def test_bad_descriptors_are_refused_with_the_field_named(descriptor, message):
    with pytest.raises(RuntimeError, match=message):
        _program([descriptor])


def test_bad_values_of_other_kinds():
    conv = ("conv", CONV)
    with pytest.raises(RuntimeError, match="dropout: p must be in"):
        _program([conv, ("dropout", {"p": [1.5]})])
    with pytest.raises(RuntimeError, match="'ceil_mode' must be 0 or 1"):
        _program([conv, ("maxpool", dict(one_d=[0], kernel=[2, 2], stride=[2, 2], padding=[0, 0], dilation=[1, 1],
                                         ceil_mode=[2]))])
    with pytest.raises(RuntimeError, match="field 'slope' needs 1 value"):
        _program([conv, ("activation", {"slope": []})])
