"""Test-only callback module: appends every standard logging payload LiteLLM builds (success and
failure) to ``PAYLOAD_LOG`` (JSONL), so a test sees what every logging integration would see."""

import json
import os

from litellm.integrations.custom_logger import CustomLogger

LOG = os.environ["PAYLOAD_LOG"]


class PayloadLog(CustomLogger):
    def _write(self, kwargs, status):
        payload = kwargs.get("standard_logging_object") or {}
        entry = {"status": status, "litellm_trace_id": kwargs.get("litellm_trace_id"), "payload": payload}
        with open(LOG, "a") as out:
            out.write(json.dumps(entry, default=str) + "\n")

    async def async_log_success_event(self, kwargs, response_obj, start_time, end_time):
        self._write(kwargs, "success")

    async def async_log_failure_event(self, kwargs, response_obj, start_time, end_time):
        self._write(kwargs, "failure")


instance = PayloadLog()
