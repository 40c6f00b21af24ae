"""fastrnn: fused Triton GPU kernels for RNN, GRU and LSTM, as drop-in ``torch.nn`` layers."""

from fastrnn.backend import get_backend, set_backend, use_backend
from fastrnn.cells import GRUCell, LSTMCell, RNNCell
from fastrnn.gradient_flow import GradientFlow, plot_gradient_flow, record_gradient_flow
from fastrnn.indrnn import IndRNN
from fastrnn.layer_norm_rnn import LayerNormGRU, LayerNormLSTM
from fastrnn.layers import GRU, LSTM, RNN
from fastrnn.routing import explain
from fastrnn.topologies import ManyToMany, ManyToOne, OneToMany, OneToOne, Seq2Seq

__all__ = [
    "RNN", "GRU", "LSTM", "RNNCell", "GRUCell", "LSTMCell",
    "IndRNN", "LayerNormLSTM", "LayerNormGRU",
    "get_backend", "set_backend", "use_backend", "explain",
    "record_gradient_flow", "plot_gradient_flow", "GradientFlow",
    "ManyToMany", "ManyToOne", "OneToMany", "Seq2Seq", "OneToOne",
]
__version__ = "0.1.0"
