"""Turning a plan (``launch/plan.py``) into Ray placement groups, and reading back where everything landed.

Every group of the plan becomes one placement group with the plan's bundles and strategy, created in the plan's
order, each bundle held by a label selector to the real node that stands for its plan node. An actor is scheduled
on its group's bundle, so the realised layout is the plan's: actors the plan puts on one node share a node, and the
node each bundle got is recorded for the run's summary (``placement``), where a rehearsal compares it with the plan.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from launch.plan import Plan

PLACEMENT_TIMEOUT_S = 120


class PlacementError(RuntimeError):
    """The cluster cannot host a group of the plan; the message names the group and what the cluster has."""


@dataclass
class Placed:
    """The plan's groups as live placement groups, and the node id each bundle landed on."""

    plan: Plan
    groups: dict[str, Any]
    bundle_nodes: dict[str, list[str]] = field(default_factory=dict)

    def strategy(self, role: str, index: int) -> Any:
        """The scheduling strategy that puts actor ``role-index`` on its bundle (None: anywhere)."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        p = self.plan.placement(role, index)
        if p.group is None:
            return None
        return PlacementGroupSchedulingStrategy(self.groups[p.group], placement_group_bundle_index=p.bundle_indices[0],
                                                placement_group_capture_child_tasks=True)

    def node_of(self, role: str, index: int) -> str | None:
        p = self.plan.placement(role, index)
        return self.bundle_nodes[p.group][p.bundle_indices[0]] if p.group is not None else None

    def layout(self) -> list[dict[str, Any]]:
        """Per planned actor: its plan node and GPUs, and the Ray node it really got."""
        return [{"actor": p.name, "plan_node": p.node, "gpus": list(p.gpus), "node_id": self.node_of(p.role, p.index)}
                for p in self.plan.placements]

    def remove(self) -> None:
        from ray.util.placement_group import remove_placement_group

        for pg in self.groups.values():
            try:
                remove_placement_group(pg)
            except Exception:  # already gone with the cluster
                pass


def realize(plan: Plan, echo=print) -> Placed:
    """Create the plan's placement groups and wait for each; raises :class:`PlacementError` naming one that hangs."""
    import ray
    from ray.util.placement_group import placement_group, placement_group_table

    placed = Placed(plan, {})
    pinned = _pin_to_nodes(plan)
    t0 = time.monotonic()
    for group in plan.groups:
        selectors = pinned.get(group.name)
        pg = placement_group(list(group.bundles), strategy=group.strategy, name=f"eva-{group.name}",
                             bundle_label_selector=selectors)
        placed.groups[group.name] = pg
        if not pg.wait(timeout_seconds=PLACEMENT_TIMEOUT_S):
            placed.remove()
            raise PlacementError(f"placement group {group.name!r} ({len(group.bundles)} x {dict(group.bundles[0])}, "
                                 f"{group.strategy}) could not be placed within {PLACEMENT_TIMEOUT_S}s; the cluster "
                                 f"has {ray.cluster_resources()}")
        table = placement_group_table(pg)["bundles_to_node_id"]
        placed.bundle_nodes[group.name] = [table[i] for i in range(len(group.bundles))]
    nodes = {n for ns in placed.bundle_nodes.values() for n in ns}
    echo(f"eva-ray: placed {len(plan.groups)} placement groups on {len(nodes)} node(s) in "
         f"{time.monotonic() - t0:.1f}s")
    return placed


def _pin_to_nodes(plan: Plan) -> dict[str, list[dict[str, str]]]:
    """Per group, a label selector per bundle that holds it to the real node of its plan node.

    Left to itself Ray may put a PACK group's bundles on other nodes than the plan counted on (a group is placed
    without knowing the groups after it). The plan's node k is the k-th alive node with GPUs, ordered by address
    and id, so the same cluster always gets the same layout. CPU-only plans name no nodes and pin nothing.
    """
    import ray
    from ray.util.placement_group import NODE_ID_LABEL_KEY

    wanted = {(p.group, b): p.node for p in plan.placements if p.group is not None for b in p.bundle_indices}
    if all(node is None for node in wanted.values()):
        return {}
    alive = sorted((n for n in ray.nodes() if n.get("Alive") and n["Resources"].get("GPU", 0) >= 1),
                   key=lambda n: (n["NodeManagerAddress"], n["NodeID"]))
    used = sorted({node for node in wanted.values() if node is not None})
    if len(alive) < len(used):
        raise PlacementError(f"the plan uses {len(used)} GPU node(s); the cluster has {len(alive)} alive")
    real = {k: alive[k]["NodeID"] for k in used}
    out: dict[str, list[dict[str, str]]] = {}
    for group in plan.groups:
        selectors = [{NODE_ID_LABEL_KEY: real[wanted[(group.name, b)]]}
                     if wanted.get((group.name, b)) is not None else {} for b in range(len(group.bundles))]
        if any(selectors):
            out[group.name] = selectors
    return out


def learner_address(placed: Placed) -> tuple[str, int]:
    """``(ip, free port)`` on learner rank 0's node: where the ranks' DeepSpeed group meets."""
    import ray

    @ray.remote(num_cpus=0)
    def free_address() -> tuple[str, int]:
        import socket

        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("", 0))
            return ray.util.get_node_ip_address(), s.getsockname()[1]

    return ray.get(free_address.options(scheduling_strategy=placed.strategy("learner", 0)).remote())
