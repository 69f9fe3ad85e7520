"""Dispatching jobs to a pool of long-lived Ray actors with retries and timeouts.

Not ray.util.ActorPool: it drops the job of an actor that dies. Here every job is tracked
until it has a result: a job whose actor dies, raises, or runs past the timeout is retried on
another actor (the failed actor is restarted by Ray, or killed and restarted on a timeout);
after `max_retries` retries it is reported as failed (None) and the run goes on.

On a cluster an actor can die with its node: its job goes to an actor on another node, and Ray
restarts the actor wherever resources allow (a node that joins later, when none are free now).
The pool keeps each actor's node so the driver can report the nodes lost and in use.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import ray

from .pool import Job

log = logging.getLogger(__name__)


@dataclass
class _InFlight:
    job_index: int
    actor_index: int
    started: float


class ActorPool:
    """`actor_models[i]`: the model actor i holds (default: all the same); a job goes only to an
    actor of its `Job.model`."""

    def __init__(self, make_actor: Callable[[int], Any], size: int, max_retries: int = 2,
                 timeout_seconds: float = 1800.0, poll_seconds: float = 0.5, actor_models: list[int] | None = None):
        self.make_actor = make_actor
        self.actors = [make_actor(i) for i in range(size)]
        self.actor_models = list(actor_models) if actor_models is not None else [0] * size
        if len(self.actor_models) != size:
            raise ValueError(f"actor_models: {len(self.actor_models)} entries for {size} actors")
        self.max_retries, self.timeout, self.poll = max_retries, timeout_seconds, poll_seconds
        self.failures: list[str] = []       # what went wrong, for logs and MLflow
        self.nodes: list = [None] * size      # each actor's Ray node id, as last reported
        self.nodes_seen: set = set()          # every node an actor of this pool has run on
        self._probes: dict = {}
        self._reprobe: list[tuple[float, int]] = []   # (when, actor): health checks to ask again
        self._next_node_check = 0.0

    def wait_ready(self, timeout: float = 900.0) -> list[int]:
        """Block until every actor has started (and loaded its model); returns their PIDs."""
        where = ray.get([a.location.remote() for a in self.actors], timeout=timeout)
        for i, w in enumerate(where):
            self._located(i, w)
        return [w["pid"] for w in where]

    def node_report(self) -> dict:
        """Nodes alive in the cluster, nodes this pool's actors run on, nodes they ran on that died."""
        alive = _alive_nodes()
        return {"nodes_alive": len(alive), "nodes_in_use": len({n for n in self.nodes if n in alive}),
                "nodes_lost": sorted(self.nodes_seen - alive)}

    def _located(self, actor_index: int, where: dict) -> None:
        self.nodes[actor_index] = where.get("node")
        if where.get("node"):
            self.nodes_seen.add(where["node"])

    def run(self, jobs: list[Job]) -> list:
        """Results in job order; None for a job that failed every attempt."""
        results: list = [None] * len(jobs)
        attempts = [0] * len(jobs)
        last_actor: dict[int, int] = {}
        # costliest first (longest-processing-time order): the generation ends with short jobs
        queue = sorted(range(len(jobs)), key=lambda j: -jobs[j].cost)
        # health checks of actors that died or were killed; they stay out of work until they answer
        probes = self._probes
        idle = [i for i in range(len(self.actors)) if i not in probes.values()]
        in_flight: dict[ray.ObjectRef, _InFlight] = {}
        unplaceable = sorted({job.model for job in jobs} - set(self.actor_models))
        if unplaceable:
            raise ValueError(f"jobs for model(s) {unplaceable}, but no actor holds them")
        while queue or in_flight:
            self._check_nodes(jobs, in_flight, idle, probes, attempts, last_actor, queue)
            for j in list(queue):   # in queue order, each job to an idle actor of its model
                mine = [a for a in idle if self.actor_models[a] == jobs[j].model]
                if not mine:
                    continue
                queue.remove(j)
                # retry on another actor than the one that failed it, when there is a choice
                choice = next((a for a in mine if a != last_actor.get(j)), mine[0])
                idle.remove(choice)
                ref = getattr(self.actors[choice], jobs[j].method).remote(*jobs[j].args)
                in_flight[ref] = _InFlight(j, choice, time.monotonic())
            now = time.monotonic()
            for due, actor_index in [r for r in self._reprobe if r[0] <= now]:
                self._reprobe.remove((due, actor_index))
                self._probe(actor_index, probes)
            ready, _ = ray.wait(list(in_flight) + list(probes), num_returns=1, timeout=self.poll)
            for ref in ready:
                if ref in probes:
                    self._probe_done(ref, probes, idle)
                    continue
                flight = in_flight.pop(ref)
                try:
                    results[flight.job_index] = ray.get(ref)
                    idle.append(flight.actor_index)
                except Exception as e:  # actor died, task raised, object lost: retry elsewhere
                    self._failed(jobs, flight, attempts, last_actor, queue, f"{type(e).__name__}: {_short(e)}")
                    if _actor_is_down(e):
                        self._probe(flight.actor_index, probes)  # back to work once Ray has restarted it
                    else:
                        idle.append(flight.actor_index)
            now = time.monotonic()
            for ref, flight in list(in_flight.items()):
                if now - flight.started > self.timeout:
                    in_flight.pop(ref)
                    ray.kill(self.actors[flight.actor_index], no_restart=False)  # Ray restarts it
                    self._failed(jobs, flight, attempts, last_actor, queue, f"timed out after {self.timeout:.0f}s")
                    self._probe(flight.actor_index, probes)
            if queue and not in_flight and not probes and not self._reprobe and \
                    not any(self.actor_models[a] == jobs[j].model for a in idle for j in queue):  # pragma: no cover
                raise RuntimeError("no actor left to run the remaining jobs")
        return results

    def _check_nodes(self, jobs, in_flight, idle, probes, attempts, last_actor, queue) -> None:
        """Actors on a node that died, noticed once a second: their jobs go elsewhere (a job sent to
        an actor Ray cannot restart yet would wait for a node to join), and they are health-probed
        until Ray has restarted them on a live node."""
        now = time.monotonic()
        if now < self._next_node_check or not any(self.nodes):
            return
        self._next_node_check = now + 1.0
        alive = _alive_nodes()
        for i, node in enumerate(self.nodes):
            if node is None or node in alive or i in probes.values():
                continue
            log.warning("actor %d: its node %s is gone", i, _short_id(node))
            self.failures.append(f"actor {i} (node {_short_id(node)}): the node was lost")
            for ref, flight in list(in_flight.items()):
                if flight.actor_index == i:   # a late result of this job, if any, is never read
                    in_flight.pop(ref)
                    self._failed(jobs, flight, attempts, last_actor, queue, "its node was lost")
            if i in idle:
                idle.remove(i)
            self._reprobe = [r for r in self._reprobe if r[1] != i]
            self._probe(i, probes)

    def _probe(self, actor_index: int, probes: dict) -> None:
        probes[self.actors[actor_index].location.remote()] = actor_index

    def _probe_done(self, ref, probes: dict, idle: list) -> None:
        actor_index = probes.pop(ref)
        try:
            self._located(actor_index, ray.get(ref))
            idle.append(actor_index)
            log.info("actor %d is back (node %s)", actor_index, _short_id(self.nodes[actor_index]))
        except ray.exceptions.ActorDiedError:
            log.warning("actor %d is gone for good; starting a replacement", actor_index)
            self.actors[actor_index] = self.make_actor(actor_index)
            self._probe(actor_index, probes)
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
            # still restarting: ask again after a poll interval, without holding up other results
            log.debug("actor %d not back yet: %s", actor_index, type(e).__name__)
            self._reprobe.append((time.monotonic() + self.poll, actor_index))

    def _failed(self, jobs, flight, attempts, last_actor, queue, reason: str) -> None:
        j = flight.job_index
        attempts[j] += 1
        last_actor[j] = flight.actor_index
        node = _short_id(self.nodes[flight.actor_index])
        message = f"{jobs[j].label or jobs[j].method} on actor {flight.actor_index} (node {node}): {reason}"
        self.failures.append(message)
        if attempts[j] <= self.max_retries:
            log.warning("%s; retrying (%d/%d)", message, attempts[j], self.max_retries)
            queue.insert(0, j)
        else:
            log.error("%s; giving up after %d retries", message, self.max_retries)

    def shutdown(self) -> None:
        for a in self.actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # already gone
                pass


def _actor_is_down(e: Exception) -> bool:
    """The actor itself failed (died, restarting, unreachable), as opposed to the task raising."""
    return isinstance(e, (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError))


def _alive_nodes() -> set[str]:
    return {n["NodeID"] for n in ray.nodes() if n.get("Alive")}


def _short_id(node) -> str:
    return node[:8] if node else "?"


def _short(e: Exception, limit: int = 300) -> str:
    text = str(e).strip().splitlines()
    return (text[-1] if text else "")[:limit]
