"""The driver's side of the weight channel: connect the learner to the rollout group once, then sync over it.

The driver sends control calls only. Setting up asks every rollout worker how many channel ranks it needs (a vLLM
engine with tensor parallelism t needs t), has the learner open the channel, and has everyone join at once. A sync
is one call per actor: ``push_weights`` on the learner and ``receive_weights`` on every worker, started together;
the weights themselves go from the learner straight to the engines over the channel.

When a rollout worker dies and Ray restarts it, :func:`reconnect` builds a new channel with everyone in it (a new
process cannot join a gloo group that already exists).

When a sync fails, every actor's outcome is collected before anything is raised, so the error names the actor that
failed first-hand (a worker that died) rather than the learner that merely lost its peer.
"""

from __future__ import annotations

from typing import Any

from actors.weight_channel import WeightSyncError
from eva_ray.weights import fingerprints_match
from launch.handles import ActorHandle, gather, is_actor_death, settle

# Beyond the channel's own timeout, how long the driver waits for the actors to report before calling one hung.
_GRACE_S = 30.0


def _raise_on_failure(names: list[str], outcomes: list[tuple[bool, Any]], what: str) -> list[Any]:
    failed = [(name, exc) for name, (ok, exc) in zip(names, outcomes) if not ok]
    if not failed:
        return [value for _, value in outcomes]
    # Deaths first: a dead worker is the cause, the learner's broken broadcast only the symptom.
    failed.sort(key=lambda item: not is_actor_death(item[1]))
    first_name, first = failed[0]
    cause = "died" if is_actor_death(first) else "failed"
    others = "; ".join(f"{name}: {type(exc).__name__}: {_short(exc)}" for name, exc in failed[1:])
    error = WeightSyncError(f"{what}: {first_name} {cause} ({type(first).__name__}: {_short(first)})"
                            + (f"; then {others}" if others else ""))
    error.eva_actor = first_name  # type: ignore[attr-defined]  # read by the driver's restart handling
    error.eva_died = is_actor_death(first)  # type: ignore[attr-defined]
    raise error from first


def _short(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit] + " ..."


def connect(learner: ActorHandle, workers: list[ActorHandle], host: str, *, bucket_bytes: int, timeout_s: float,
            backend: str) -> dict[str, Any]:
    """Open the channel on the learner at ``host`` and join every worker to it; returns the channel's spec."""
    ranks = gather([w.call("channel_ranks") for w in workers])
    spec = gather([learner.call("open_weight_channel", host, 1 + sum(ranks), bucket_bytes=bucket_bytes,
                                timeout_s=timeout_s, backend=backend)])[0]
    offsets = [1 + sum(ranks[:i]) for i in range(len(workers))]
    futures = [learner.call("join_weight_channel")]
    futures += [w.call("join_weight_channel", spec, offset) for w, offset in zip(workers, offsets)]
    names = [learner.name] + [w.name for w in workers]
    _raise_on_failure(names, settle(futures, timeout=timeout_s + _GRACE_S), "joining the weight channel")
    return spec


def reconnect(learner: ActorHandle, workers: list[ActorHandle], host: str, *, bucket_bytes: int,
              timeout_s: float, backend: str) -> dict[str, Any]:
    """Build the channel again after a worker restarted: a new process cannot join the old group.

    Every surviving worker leaves its old channel, the learner opens a new one (closing its own), and all join it.
    """
    names = [w.name for w in workers]
    _raise_on_failure(names, settle([w.call("leave_weight_channel") for w in workers], timeout=timeout_s + _GRACE_S),
                      "leaving the old weight channel")
    return connect(learner, workers, host, bucket_bytes=bucket_bytes, timeout_s=timeout_s, backend=backend)


def sync(learner: ActorHandle, workers: list[ActorHandle], version: int | None, timeout_s: float) -> dict[str, float]:
    """Push the learner's weights to every worker; returns the learner's sync stats. Raises naming the failed actor.

    ``version`` is the one the driver expects the learner to send; None accepts whatever it holds (a recovery
    while a train step is in flight, whose result the driver has not seen yet). Every worker must report the
    version the learner sent either way."""
    futures = [learner.call("push_weights")] + [w.call("receive_weights") for w in workers]
    names = [learner.name] + [w.name for w in workers]
    stats, *versions = _raise_on_failure(names, settle(futures, timeout=timeout_s + _GRACE_S),
                                         f"weight sync of version {version}")
    wrong = {name: v for name, v in zip(names[1:], versions)
             if v != stats["version"] or (version is not None and v != version)}
    if wrong:
        raise WeightSyncError(f"weight sync: the learner sent version {stats['version']} (expected {version}) but "
                              f"workers report {wrong}")
    return stats


def verify(learner: ActorHandle, workers: list[ActorHandle], manifest: list[list]) -> None:
    """Check that every worker now holds exactly the learner's weights (fingerprints), or raise naming who does not.

    ``manifest`` is the channel's (``connect`` returns it in its spec). HF workers only: a vLLM engine keeps the
    weights fused and repacked, so its copy is checked by what it generates instead (the tests compare greedy
    outputs).
    """
    # Started together; gathered apart, since a learner group answers with a future of its own kind.
    mine = learner.call("weights_fingerprint")
    theirs = [w.call("weights_fingerprint", manifest) for w in workers]
    want, got = gather([mine])[0], gather(theirs)
    wrong = [w.name for w, fp in zip(workers, got) if not fingerprints_match(want, fp)]
    if wrong:
        raise WeightSyncError(f"after the sync, {', '.join(wrong)} hold(s) weights that differ from the learner's")
