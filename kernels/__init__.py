"""fastrnn's Triton kernels: ``@triton.jit`` code only, one file per cell.

Installed as ``fastrnn.kernels`` (setuptools ``package-dir`` maps this folder). The host side
(launchers, autograd Functions, strategy choice) lives in ``fastrnn/ops/``.
"""
