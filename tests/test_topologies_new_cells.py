"""The topology modules with the cells beyond torch.nn: ``"indrnn"``, ``"lnlstm"``, ``"lngru"``."""

from __future__ import annotations

import pytest
import torch

import fastrnn
from tests.conftest import assert_close

NEW_CELLS = {"indrnn": fastrnn.IndRNN, "lnlstm": fastrnn.LayerNormLSTM, "lngru": fastrnn.LayerNormGRU}


@pytest.mark.parametrize("cell", NEW_CELLS)
def test_many_to_many_padded_row_equals_row_alone(cell):
    torch.manual_seed(0)
    model = fastrnn.ManyToMany(3, 8, 2, cell=cell, bidirectional=True, grad_clip=0.5).double()
    assert type(model.rnn) is NEW_CELLS[cell] and model.rnn.grad_clip == 0.5 and model.rnn.batch_first
    x = torch.randn(3, 6, 3, dtype=torch.float64)
    lengths = torch.tensor([6, 2, 4])
    y = model(x, lengths)
    for row, length in enumerate(lengths.tolist()):
        alone = model(x[row:row + 1, :length])
        assert_close(y[row:row + 1, :length], alone, atol=1e-12)
        assert (y[row, length:] == 0).all()


@pytest.mark.parametrize("cell", NEW_CELLS)
def test_free_running_generation_feeds_outputs_back(cell):
    """Generation step by step equals one teacher-forced pass over the inputs it fed itself."""
    torch.manual_seed(0)
    model = fastrnn.OneToMany(4, 8, 4, cell=cell, num_layers=2, output_activation="tanh").double().eval()
    x0 = torch.randn(2, 4, dtype=torch.float64)
    seq = model(x0, steps=5)
    inputs = torch.cat([x0[:, None], seq[:, :-1]], dim=1)
    output, _ = model.rnn(inputs)
    assert_close(seq, model.head(output), atol=1e-12)
    assert model(x0, steps=0).shape == (2, 0, 4)


def test_unknown_cell_lists_the_new_cells():
    with pytest.raises(ValueError, match="'indrnn', 'lnlstm', 'lngru'"):
        fastrnn.ManyToOne(3, 4, 5, cell="ln-lstm")
    with pytest.raises(ValueError, match="nonlinearity applies to cell='rnn' and 'indrnn' only"):
        fastrnn.ManyToOne(3, 4, 5, cell="lngru", nonlinearity="relu")
    assert fastrnn.ManyToOne(3, 4, 5, cell="indrnn", nonlinearity="relu").rnn.nonlinearity == "relu"


def test_explain_names_the_new_cells_paths():
    x = torch.randn(2, 5, 3)
    assert fastrnn.explain(fastrnn.IndRNN(3, 4), x).startswith("reference: IndRNN on cpu")
    with fastrnn.use_backend("triton"):  # the interpreter is on in the tests
        assert fastrnn.explain(fastrnn.IndRNN(3, 4), x).startswith("triton: IndRNN: the fused scan kernel")
    assert "hand-written backward" in fastrnn.explain(fastrnn.ManyToOne(3, 4, 2, cell="lnlstm"), x)
    assert "one step at a time" in fastrnn.explain(fastrnn.OneToMany(3, 4, 3, cell="lngru"), torch.randn(2, 3))
    assert "regularized_rnn" in fastrnn.explain(fastrnn.LSTM(3, 4, zoneout=0.1), x.transpose(0, 1))
    assert fastrnn.explain(fastrnn.GRU(3, 4, recurrent_dropout=0.2).eval(), x).startswith("native")
