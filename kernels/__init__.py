"""Compute kernels (imported as ``panther.kernels``).

Each op family has a folder with ``reference.py`` (plain PyTorch, runs anywhere, the
definition of the function) beside ``triton.py`` (the GPU kernels). Nothing here imports from
the rest of panther: the ops in ``panther.ops`` choose between the two.
"""
