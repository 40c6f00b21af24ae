"""Host side of the Triton kernels: launchers, autograd Functions and the per-cell layer functions.

One file per cell (``rnn.py``, ``gru.py``, ``lstm.py``) reads top to bottom: strategy choice,
forward and backward launchers, the ``torch.autograd.Function``, then the layer function that
:mod:`fastrnn.dispatch` calls. ``recurrence.py`` holds what every cell shares.
"""
