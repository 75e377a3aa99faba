"""State hand-over from a plugin's old version to a new instance (``preserve_state``).

Theory of operation
-------------------
A rollout (or a reload's swap) starts a new instance with ``Instance.handover_from`` set
to the version whose state it takes. Its worker gets ``spec["handover"]``, and once its
plugin object exists, just before ``import_state`` and ``start()``, it sends a STATE
frame: ready for the state. ``hand_over`` then

1. lifts the instance's start CPU cap (``rollout.start_cpu``): the fork and the imports,
   the costly part of a start, are behind it; what is left should run at full speed,
   because every call the old version answers from now on is missing from the state;
2. calls ``osk.export_state`` on the instance it replaces (``handover_donor``, which the
   rollout paired with it; any ready instance of the source version if that one is not
   ready): the version is pinned in the call's meta and the instance preferred;
3. answers with a STATE frame whose body is the exported reply as it came (no unpacking
   and packing again), or an empty body for no state (the export failed or timed out;
   the new instance starts empty and the log says why);
4. publishes ``rollout:handed-over`` (source version, bytes, how long the export took,
   or why there was none).

Why this late and not in the spec at spawn time: the state is then only as old as the
new instance's ``import_state`` + ``start()``, not as old as its whole start (a fork,
imports, seconds under a start CPU cap). The calls answered in between are the only
ones lost.

A STATE frame from a worker that has no hand-over due is answered with no state, so a
worker never waits for one in vain. A hand-over whose instance ended or began another
life meanwhile is dropped.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from osk_daemon.errors import OskError
from osk_daemon.ipc.codec import Header, Kind, pack

if TYPE_CHECKING:
    from osk_daemon.supervisor.instance import Instance
    from osk_daemon.supervisor.runtime import Supervisor

__all__ = ["EXPORT_TIMEOUT", "hand_over"]

log = logging.getLogger("osk.rollout")

EXPORT_TIMEOUT = 10.0  # seconds, at most, the old version has to export its state
START_LEFT = 1.0  # seconds of its start_timeout left to the new instance after the export


async def hand_over(sup: Supervisor, inst: Instance) -> None:
    """Answer ``inst``'s STATE frame with the state of a ready ``handover_from`` instance
    (or the one its donor exported as it retired, ``handover_stash``). The export gets
    what is left of the new instance's ``start_timeout`` less ``START_LEFT`` (at most
    ``EXPORT_TIMEOUT``): a slow old version costs the new one its state, not its start."""
    generation, source = inst.generation, inst.handover_from
    inst.handover_from = None  # later lives of this instance start from their own state
    if source is None:
        log.debug("%s asked for a hand-over it has none of", inst.leaf)
        sup.broker.send_to(inst.key, Header(Kind.STATE))
        return
    sup.processes.lift_start_cap(inst)
    began = time.monotonic()
    if inst.handover_stash is not None:
        body, why, inst.handover_stash = inst.handover_stash, "", None
    else:
        left = inst.config.start_timeout - (began - inst.spawned_at) - START_LEFT
        budget = min(EXPORT_TIMEOUT, max(0.5, left))
        body, why = await export_state(sup, inst.plugin, source, inst.handover_donor, budget)
    if inst.generation != generation or inst.life.pid is None:
        inst.handover_from = inst.handover_from or source  # its next life asks again
        return  # it ended (or lives again) meanwhile: nobody waits for this state
    if not sup.broker.send_to(inst.key, Header(Kind.STATE), body):
        why = "the new instance is not connected"
    if why:
        log.warning("%s: no state handed over from %s: %s", inst.leaf, source, why)
    sup.events.publish(
        "rollout:handed-over",
        pluginName=inst.plugin,
        instance=inst.index,
        donor=inst.handover_donor,
        version=str(inst.config.version),
        source=source,
        bytes=len(body) if not why else 0,
        export_ms=round((time.monotonic() - began) * 1000, 3),
        **({"detail": why} if why else {}),
    )


async def export_state(
    sup: Supervisor,
    plugin: str,
    version: str,
    donor: int | None,
    timeout: float = EXPORT_TIMEOUT,
) -> tuple[bytes, str]:
    """``osk.export_state`` of instance ``donor`` if it is ready, else of a ready instance
    of ``version``: (the packed state, "") or (b"", why there is none)."""
    meta: dict[str, object] = {"version": version}
    if donor is not None:
        meta["instance"] = donor
    try:
        body = await sup.broker.call(plugin, "osk.export_state", pack(None), timeout, meta)
    except OskError as exc:
        return b"", str(exc)
    return body, ""
