"""speechbench: SUPERB-style benchmarking of frozen self-supervised speech representations.

The repository's top-level folders are the sub-packages: ``speechbench.benchmark`` (orchestration and the CLI),
``speechbench.upstreams`` (frozen models), ``speechbench.downstreams`` (tasks, heads, data),
``speechbench.leaderboard`` (tables from result files) and ``speechbench.recipes`` (YAML). ``speechbench.common``
holds the torch-free basics they all share.
"""

__version__ = "0.1.0"
