"""What the CPUs of the nodes a CPU engine may run on can do, read on those nodes.

vLLM's CPU build picks its kernels from the processor it runs on (bfloat16 where the CPU
computes it natively, int4 weights only on AVX-512), while an app or a batch job is built
elsewhere: on a driver, or in Serve's controller on the head node, often another kind of
machine than the workers. So the dtype and the refusals are decided from the features every
node that could take an engine has.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path

BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
"""Either one computes bfloat16 natively; without them a bf16 matrix product is emulated."""


def cpu_flags() -> frozenset[str]:
    """This machine's CPU features as the kernel lists them (none where it does not)."""
    cpuinfo = Path("/proc/cpuinfo")
    return frozenset(cpuinfo.read_text().split()) if cpuinfo.exists() else frozenset()


@dataclass(frozen=True)
class NodeCpus:
    """The CPU features common to some nodes (``nodes`` of them; 0: read where this runs)."""

    flags: frozenset[str]
    machines: frozenset[str]
    nodes: int = 0

    @property
    def has_bf16(self) -> bool:
        """bfloat16 computed natively (AVX512-BF16 or AMX); elsewhere vLLM serves float32."""
        return bool(self.flags & BF16_FLAGS)

    @property
    def has_int4_kernel(self) -> bool:
        """vLLM's CPU int4 kernel: on x86 it loads its AVX2 library on CPUs without AVX-512,
        and that library has none."""
        return all(m not in ("x86_64", "AMD64") for m in self.machines) or "avx512f" in self.flags

    @property
    def where(self) -> str:
        return (
            f"the {self.nodes} node(s) that can host it" if self.nodes else "the CPUs of this node"
        )


def local_cpus() -> NodeCpus:
    return NodeCpus(cpu_flags(), frozenset({platform.machine()}))


def common(probed: list[NodeCpus]) -> NodeCpus:
    """What every one of ``probed`` has: a feature one node lacks is one an engine may lack."""
    if not probed:
        return local_cpus()
    flags = frozenset.intersection(*(node.flags for node in probed))
    return NodeCpus(flags, frozenset().union(*(n.machines for n in probed)), len(probed))


def engine_node_cpus(bundle: dict[str, float]) -> NodeCpus:
    """The features common to the alive nodes whose resources can hold ``bundle`` (an
    engine's CPUs and custom resources), each read by a task on that node. Where no node can
    hold it yet (the autoscaler adds one when an engine asks), this node's."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    hosts = [
        node["NodeID"]
        for node in ray.nodes()
        if node["Alive"]
        and all(node["Resources"].get(name, 0) >= amount for name, amount in bundle.items())
    ]
    probe = ray.remote(num_cpus=0)(local_cpus)
    on_each = [
        probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(host, soft=False))
        for host in hosts
    ]
    return common(ray.get([task.remote() for task in on_each]))
