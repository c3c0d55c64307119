"""Test-only callback module, listed FIRST in a test proxy's callbacks: LiteLLM's spend tracking
without a database.

The proxy's database client cannot run here (prisma's engines cannot be downloaded), so this module:
- sets ``proxy_server.prisma_client`` to a permissive stub at import, so the proxy registers its real
  cost tracker (``_ProxyDBLogger``) and checks budgets as it does with a database;
- seeds the virtual keys (and teams) of ``BOOKS_KEYS`` (JSON) into ``user_api_key_cache``, where
  auth finds them;
- replaces only ``DBSpendUpdateWriter.update_database`` (the final write) with a recorder that builds
  the real spend row with LiteLLM's ``get_logging_payload`` and appends it to ``BOOKS_ROWS`` (JSONL).
Auth, budget counters, cost calculation and headers stay LiteLLM's own.
"""

import json
import os

from litellm.integrations.custom_logger import CustomLogger
from litellm.proxy import proxy_server
from litellm.proxy._types import LiteLLM_TeamTableCachedObj, UserAPIKeyAuth
from litellm.proxy.db.db_spend_update_writer import DBSpendUpdateWriter
from litellm.proxy.spend_tracking.spend_tracking_utils import get_logging_payload
from litellm.proxy.utils import hash_token

ROWS = os.environ["BOOKS_ROWS"]
DAY = 86400  #: seeded keys outlive the test session (the cache expires entries after 60 s by default)


class _Permissive:
    """Any attribute, any call, any await: answers "nothing" without failing."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Permissive()

    def __call__(self, *args, **kwargs):
        return _Permissive()

    def __await__(self):
        return (yield from ())

    def __iter__(self):
        return iter(())


async def _record_row(self, token, user_id, end_user_id, team_id, org_id, kwargs, completion_response,
                      start_time, end_time, response_cost, project_id=None):
    row = get_logging_payload(kwargs=kwargs, response_obj=completion_response, start_time=start_time, end_time=end_time)
    row = {**row, "recorded_cost": response_cost, "recorded_token": token, "recorded_team_id": team_id}
    with open(ROWS, "a") as out:
        out.write(json.dumps(row, default=str) + "\n")
    return True


SPECS = {hash_token(spec["key"]): spec for spec in json.loads(os.environ.get("BOOKS_KEYS", "[]"))}


def _seed_keys(only: str | None = None) -> None:
    for hashed, spec in SPECS.items():
        if only is not None and hashed != only:
            continue
        team_id = spec.get("team_id")
        proxy_server.user_api_key_cache.set_cache(key=hashed, ttl=DAY, value=UserAPIKeyAuth(
            token=hashed, api_key=hashed, key_alias=spec.get("alias"), max_budget=spec.get("max_budget"), spend=0.0,
            team_id=team_id, team_max_budget=spec.get("team_max_budget"), team_spend=0.0 if team_id else None,
            user_id=spec.get("user_id"), models=[]))
        if team_id:
            proxy_server.user_api_key_cache.set_cache(key=f"team_id:{team_id}", ttl=DAY, value=LiteLLM_TeamTableCachedObj(
                team_id=team_id, max_budget=spec.get("team_max_budget"), spend=0.0, models=[]))


_cached = proxy_server.user_api_key_cache.async_get_cache


async def _get_or_reseed(key, *args, **kwargs):
    """A seeded key the cache let expire is seeded again (there is no database to reload it from)."""
    found = await _cached(key, *args, **kwargs)
    if found is None and key in SPECS:
        _seed_keys(only=key)
        found = await _cached(key, *args, **kwargs)
    return found


proxy_server.user_api_key_cache.async_get_cache = _get_or_reseed
proxy_server.prisma_client = _Permissive()
DBSpendUpdateWriter.update_database = _record_row
_seed_keys()

instance = CustomLogger()
