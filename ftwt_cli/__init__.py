"""ftwt: FTWT dynamic pruning (Elkerdawy et al., CVPR 2022) as a command-line tool."""

__version__ = "0.1.0"
