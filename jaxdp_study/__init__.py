"""jaxdp_study: the harness that reproduces "Neither Private Nor Fair" on top of the jaxdp library.

Sweeps of runs (grid expansion, run directories, launchers), the paper's settings, tables and figures, the
benchmark and the generator-effect check. ``import jaxdp`` never imports this package; this package imports
``jaxdp``. Importing it loads nothing: import the module you need (``jaxdp_study.report``, ...).
"""
