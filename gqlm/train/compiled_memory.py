"""The train step's per-device memory as XLA compiles it: for --dry_run, before anything is allocated.

`jit(step).lower(abstract state, abstract batch).compile().memory_analysis()` sizes the SPMD
program one device runs: its arguments (the state and batch shards), outputs, temporaries
(activations, gradients, collectives' buffers) and the outputs that alias donated arguments.
Compiled for the devices at hand: on a CPU host standing in for a GPU or TPU pod (fake devices
of the same mesh shape) the layout is the same but the backend's fusion and scheduling differ,
so the figure is an estimate for the target device.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax


class CompiledMemory(NamedTuple):
    arguments: int
    outputs: int
    temporaries: int
    aliased: int  # outputs written into donated arguments' buffers
    code: int

    @property
    def peak(self) -> int:
        """Live bytes at the step's high-water mark, at most: arguments, temporaries and the
        outputs that do not reuse a donated buffer."""
        return self.arguments + self.outputs - self.aliased + self.temporaries


def compiled_memory(jitted_step: Callable, *abstract_args: Any) -> CompiledMemory | None:
    """Per-device bytes of `jitted_step` compiled for `abstract_args` (ShapeDtypeStructs with
    shardings); None where the backend reports no analysis."""
    analysis = jitted_step.lower(*abstract_args).compile().memory_analysis()
    if analysis is None:
        return None
    return CompiledMemory(analysis.argument_size_in_bytes, analysis.output_size_in_bytes,
                          analysis.temp_size_in_bytes, analysis.alias_size_in_bytes,
                          analysis.generated_code_size_in_bytes)


def describe(memory: CompiledMemory | None, platform: str) -> str:
    if memory is None:
        return f"compiled train step: no memory analysis from XLA:{platform}"
    mib = lambda n: f"{n / 2**20:,.1f} MiB"  # noqa: E731
    return (f"compiled train step per device (XLA:{platform}): peak {mib(memory.peak)} = arguments "
            f"{mib(memory.arguments)} + temporaries {mib(memory.temporaries)} + outputs "
            f"{mib(memory.outputs - memory.aliased)} not aliased to donated arguments")
