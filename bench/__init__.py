"""kvserve's benchmark suite (see BENCHMARKS.md): ours beside a peer, same run, same machine.

``common`` holds result records and measured ceilings, ``workloads`` the workloads,
``report`` the ``docs/benchmarks.md`` generator, ``cpu`` the CPU entry point
(``python -m bench.cpu``).
"""
