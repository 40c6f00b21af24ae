"""Host side of the Triton kernels: launchers, registered operators and the per-cell layer functions.

One file per cell (``rnn.py``, ``gru.py``, ``lstm.py``) reads top to bottom: strategy choice,
forward and backward launchers, the recurrence as a registered operator
(``torch.library.custom_op`` with a fake implementation and an autograd formula, so
``torch.compile`` sees one node per layer and the launchers run inside it), then the layer
function that :mod:`fastrnn.dispatch` calls. ``recurrence.py`` holds what every cell shares.
"""
