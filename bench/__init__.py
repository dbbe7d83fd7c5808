"""kvserve's benchmark suite (see BENCHMARKS.md): ours beside a peer, same run, same machine.

``common`` holds result records and measured ceilings, ``workloads`` the workloads,
``report`` the ``docs/benchmarks.md`` generator, ``cpu`` the CPU entry point
(``python -m bench.cpu``). The GPU suite (``python -m bench.gpu``): ``synthetic`` (the
weightless model directory, sizes, floors), ``gpu_env`` (engines, ceilings, memory
plan), ``gpu_workloads`` (W1-W3), ``gpu_prefill_capacity`` (W4, W5), ``report_gpu``.
"""
