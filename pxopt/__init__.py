"""pxopt: Bayesian optimisation of LRP rules as a pruning criterion.

The public API is small on purpose: `pxopt.lrp.explain` computes relevances,
`pxopt.search` runs a study; everything else is reachable from the CLI `pxopt`.
"""

__version__ = "0.1.0"
