"""Claiming queued chat jobs: one Lua call that takes jobs, announces them and reads routing health.

A job reaches a worker two ways (docs/architecture.md, "Pickup"): popped off the ready list
with its payload (the fast path: the claim then runs while the job is parsed and classified),
or found by the slow scan of arq's sorted set (the safety net: the claim reads the payload).
Either way the claim below is what makes a job this worker's: SET NX on arq's in-progress key,
so a job runs at most once whoever else saw it.
"""

from collections.abc import Sequence
from dataclasses import dataclass

from arq.constants import in_progress_key_prefix, job_key_prefix
from arq.utils import timestamp_ms
from redis.asyncio import Redis

from router.catalog import Deployment
from router.health import HealthSnapshot, now_ms, snapshot_from, snapshot_keys
from workers.protocol import accepted_payload, cancelled_job_key, reply_channel

# KEYS[1] the queue, then the shared-health hashes of every deployment
# (router.health.snapshot_keys). ARGV: in-progress key prefix, due-by (ms), in-progress TTL
# (ms), job key prefix, cancelled-job key prefix, reply channel prefix, the accepted event's
# " accepted <payload>" tail, '1' to read payloads ('0': a popped job has its own), then job
# ids. For each job that is queued, due and not in progress elsewhere: take it (SET NX, so two
# workers never both run it), take it off the queue, read its payload (or, for '0', whether its
# payload key still exists: '' if it does), and unless its caller already left, announce it on
# the reply channel its id names (`<process>.<uuid>`, workers/protocol.new_job_id). When it
# took any, it also reads the health hashes, which the jobs route by. Returns
# {{HGETALL reply per health key}, {id, score, payload or '' or false, cancelled 0|1, announced 0|1, ...}}.
CLAIM_LUA = """
local out = {}
for i = 9, #ARGV do
  local id = ARGV[i]
  local score = redis.call('ZSCORE', KEYS[1], id)
  if score and tonumber(score) <= tonumber(ARGV[2])
     and redis.call('SET', ARGV[1] .. id, '1', 'PX', ARGV[3], 'NX') then
    redis.call('ZREM', KEYS[1], id)
    local payload
    if ARGV[8] == '1' then
      payload = redis.call('GET', ARGV[4] .. id)
    else
      payload = redis.call('EXISTS', ARGV[4] .. id) == 1 and ''
    end
    local cancelled = redis.call('EXISTS', ARGV[5] .. id)
    local announced = 0
    local process = string.match(id, '^(%w+)%.')
    if payload and cancelled == 0 and process then
      redis.call('PUBLISH', ARGV[6] .. process, id .. ARGV[7])
      announced = 1
    end
    out[#out + 1] = id
    out[#out + 1] = score
    out[#out + 1] = payload
    out[#out + 1] = cancelled
    out[#out + 1] = announced
  end
end
local health = {}
if #out > 0 then
  for i = 2, #KEYS do health[#health + 1] = redis.call('HGETALL', KEYS[i]) end
end
return {health, out}
"""

# A popped job is due whatever its score says: the score is the API's clock, not ours.
_ANY_TIME_MS = 2**53


@dataclass(frozen=True)
class JobClaim:
    """What the claim said about one job this worker saw."""

    job_id: str
    claimed: bool  # False: another worker has it, the API withdrew it, or it is not queued any more
    payload: bytes | None = None  # read by the claim (scanned jobs); None if it had expired
    expired: bool = False  # its payload key is gone: its caller gave up long ago
    cancelled: bool = False  # its caller left before pickup
    announced: bool = False  # `accepted` went to its caller with the claim
    health: HealthSnapshot | None = None  # every deployment's health (small catalogs), read with it

    @property
    def runnable(self) -> bool:
        """Claimed, and its caller still waits for it."""
        return self.claimed and not self.expired and not self.cancelled


class Claimer:
    """Runs the claim script for one worker."""

    def __init__(self, redis: Redis, queue_name: str, worker_id: str, in_progress_ttl_ms: int,
                 routable: Sequence[Deployment]) -> None:
        self._script = redis.register_script(CLAIM_LUA)
        self._queue_name = queue_name
        self._ttl_ms = in_progress_ttl_ms
        self._accepted_tail = b" accepted " + accepted_payload(worker_id)
        # The health of these deployments comes back with every claim (one round trip fewer
        # before the upstream call); empty for a catalog too large to read whole for every job.
        self._routable = list(routable)
        self._health_keys = snapshot_keys(self._routable)

    async def claim(self, job_ids: Sequence[bytes | str], *, due_by_ms: int | None = None,
                    read_payloads: bool = True) -> list[JobClaim]:
        """Claim these jobs (those due by `due_by_ms`, default now); one JobClaim per job taken."""
        hashes, flat = await self._script(keys=[self._queue_name, *self._health_keys], args=[
            in_progress_key_prefix, timestamp_ms() if due_by_ms is None else due_by_ms, self._ttl_ms,
            job_key_prefix, cancelled_job_key(""), reply_channel(""), self._accepted_tail,
            "1" if read_payloads else "0", *job_ids])
        read_at_ms = now_ms()
        replies = [_pairs(h) for h in hashes]
        claims = []
        for i in range(0, len(flat), 5):
            job_id, _score, payload, cancelled, announced = flat[i:i + 5]
            # A snapshot per job: a job records what it learns (a refused key) in its own copy.
            health = snapshot_from(self._routable, replies, read_at_ms) if self._routable else None
            claims.append(JobClaim(job_id=job_id.decode(), claimed=True, payload=payload or None,
                                   expired=payload is None, cancelled=bool(cancelled), announced=bool(announced),
                                   health=health))
        return claims

    async def claim_popped(self, job_ids: Sequence[str]) -> dict[str, JobClaim]:
        """Claim jobs popped off the ready list (their payloads came with them); one JobClaim per id."""
        claims = {c.job_id: c for c in await self.claim(job_ids, due_by_ms=_ANY_TIME_MS, read_payloads=False)}
        return {job_id: claims.get(job_id) or JobClaim(job_id=job_id, claimed=False) for job_id in job_ids}


def _pairs(flat: list[bytes]) -> dict[bytes, bytes]:
    """An HGETALL reply as Lua returns it (a flat list) → the mapping redis-py would have made."""
    return dict(zip(flat[::2], flat[1::2], strict=True))
