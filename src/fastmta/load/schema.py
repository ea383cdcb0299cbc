"""The JSON Schema of ``fastmta load --json`` (``fastmta load --schema`` prints it), and a checker.

The report (``LoadResult.as_dict``), field by field:

- ``schema``: ``"fastmta-load/1"``; a change that breaks readers bumps it.
- what ran: ``target``, ``mode`` (``closed`` | ``open``), ``workers``,
  ``connections`` (over all workers), ``messages_requested`` (null: no count,
  a duration), ``duration_s``, ``rate_target`` / ``ramp_s`` (open loop),
  ``workload`` (size spec, recipients, domains, depth, reuse, pipelining,
  BDAT, STARTTLS, body kind).
- outcomes: ``messages_attempted`` (handed to a connection and finished),
  ``messages_accepted`` (at least one recipient accepted),
  ``messages_failed``, ``messages_unsent`` (due or requested but never sent,
  e.g. every connection failed), ``recipients_accepted`` /
  ``recipients_refused``, ``connections_opened`` / ``connect_failures``.
- replies: ``replies`` (decisive reply code per recipient -> count),
  ``reply_classes`` (``2xx``/``4xx``/``5xx``), ``errors_by_code`` (failed
  messages by their decisive code; locally generated failures such as
  timeouts and lost connections are 451), ``errors`` (session-level failure
  texts -> count).
- figures: ``elapsed_s``, ``cpu_s`` (client CPU, all workers),
  ``messages_per_s`` (accepted / elapsed), ``cpu_us_per_message``,
  ``rate_achieved`` (open loop: messages completed per second between the
  end of the ramp and the end of the schedule; null in closed loop),
  ``rate_window_s``, ``timed_out``, ``complete`` (everything sent and
  accepted in time: the exit status is 0 exactly when this is true).
- ``latency_ms``: per phase (``queue``, ``connect``, ``greeting``, ``ehlo``,
  ``envelope``, ``end_of_data``, ``message``) count, min, mean, max, p50,
  p90, p99, p99_9 in milliseconds (HDR-style histograms, <1 % error,
  percentiles never below the true value).
- ``series``: ``interval_s`` and one point per interval from the start:
  ``t`` (interval start, s), ``sent``, ``completed``, ``accepted``,
  ``failed`` (counts in the interval), ``p50_ms``, ``p99_ms``, ``max_ms``
  (latency of the messages completed in the interval).

The checker implements the part of JSON Schema this schema uses (type,
properties, required, additionalProperties, items, enum, const, minimum), so
that the test suite and users can validate a report without the
``jsonschema`` package; where ``jsonschema`` is installed the tests use it too.
"""

from __future__ import annotations

from typing import Any

_COUNT: dict[str, Any] = {"type": "integer", "minimum": 0}
_SECONDS: dict[str, Any] = {"type": "number", "minimum": 0}
_COUNTS_BY_KEY: dict[str, Any] = {"type": "object", "additionalProperties": _COUNT}
_PHASES = ("queue", "connect", "greeting", "ehlo", "envelope", "end_of_data", "message")

_LATENCY: dict[str, Any] = {
    "type": "object",
    "description": "milliseconds; count is the number of samples",
    "properties": {
        "count": _COUNT,
        **{k: _SECONDS for k in ("min", "mean", "max", "p50", "p90", "p99", "p99_9")},
    },
    "required": ["count", "min", "mean", "max", "p50", "p90", "p99", "p99_9"],
    "additionalProperties": False,
}

_POINT: dict[str, Any] = {
    "type": "object",
    "properties": {
        "t": _SECONDS,
        "sent": _COUNT,
        "completed": _COUNT,
        "accepted": _COUNT,
        "failed": _COUNT,
        "p50_ms": _SECONDS,
        "p99_ms": _SECONDS,
        "max_ms": _SECONDS,
    },
    "required": ["t", "sent", "completed", "accepted", "failed", "p50_ms", "p99_ms", "max_ms"],
    "additionalProperties": False,
}

SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "https://fastmta.invalid/schemas/load-report-1.json",
    "title": "fastmta load report",
    "description": "The object `fastmta load --json` prints. See fastmta/load_schema.py for the meaning of each field.",
    "type": "object",
    "properties": {
        "schema": {"const": "fastmta-load/1"},
        "target": {"type": "string"},
        "mode": {"enum": ["closed", "open"]},
        "workers": {"type": "integer", "minimum": 1},
        "connections": _COUNT,
        "messages_requested": {"type": ["integer", "null"], "minimum": 0},
        "duration_s": {"type": ["number", "null"], "minimum": 0},
        "rate_target": {"type": ["number", "null"], "minimum": 0},
        "ramp_s": _SECONDS,
        "rate_achieved": {"type": ["number", "null"], "minimum": 0},
        "rate_window_s": _SECONDS,
        "messages_attempted": _COUNT,
        "messages_accepted": _COUNT,
        "messages_failed": _COUNT,
        "messages_unsent": _COUNT,
        "recipients_accepted": _COUNT,
        "recipients_refused": _COUNT,
        "connections_opened": _COUNT,
        "connect_failures": _COUNT,
        "replies": _COUNTS_BY_KEY,
        "reply_classes": _COUNTS_BY_KEY,
        "errors": _COUNTS_BY_KEY,
        "errors_by_code": _COUNTS_BY_KEY,
        "elapsed_s": _SECONDS,
        "cpu_s": _SECONDS,
        "messages_per_s": _SECONDS,
        "cpu_us_per_message": _SECONDS,
        "timed_out": {"type": "boolean"},
        "complete": {"type": "boolean"},
        "workload": {
            "type": "object",
            "properties": {
                "size": {"type": "string"},
                "recipients": {"type": "integer", "minimum": 1},
                "domains": {"type": "integer", "minimum": 1},
                "depth": {"type": "integer", "minimum": 1},
                "messages_per_connection": _COUNT,
                "pipelining": {"type": "boolean"},
                "bdat": {"type": "boolean"},
                "starttls": {"enum": ["never", "opportunistic", "required"]},
                "body": {"type": "string"},
            },
            "required": ["size", "recipients", "domains", "depth", "messages_per_connection", "pipelining",
                         "bdat", "starttls", "body"],
            "additionalProperties": False,
        },
        "latency_ms": {
            "type": "object",
            "properties": {phase: _LATENCY for phase in _PHASES},
            "required": list(_PHASES),
            "additionalProperties": False,
        },
        "series": {
            "type": "object",
            "properties": {"interval_s": {"type": "number", "minimum": 0}, "points": {"type": "array", "items": _POINT}},
            "required": ["interval_s", "points"],
            "additionalProperties": False,
        },
    },
    "additionalProperties": False,
}
SCHEMA["required"] = sorted(SCHEMA["properties"])


_TYPES: dict[str, Any] = {
    "object": dict,
    "array": list,
    "string": str,
    "boolean": bool,
    "null": type(None),
}


def _is_type(value: Any, name: str) -> bool:
    # JSON has no int/bool confusion; Python does (bool is an int): keep them apart.
    if name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, _TYPES[name])


def validate(instance: Any, schema: dict[str, Any] | None = None, path: str = "$") -> list[str]:
    """Every way *instance* breaks *schema* (default: the report schema), as 'path: problem' strings."""
    schema = SCHEMA if schema is None else schema
    problems: list[str] = []
    if "const" in schema and instance != schema["const"]:
        problems.append(f"{path}: expected {schema['const']!r}, got {instance!r}")
    if "enum" in schema and instance not in schema["enum"]:
        problems.append(f"{path}: {instance!r} is not one of {schema['enum']}")
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_is_type(instance, t) for t in types):
            return problems + [f"{path}: expected {' or '.join(types)}, got {type(instance).__name__}"]
    if "minimum" in schema and _is_type(instance, "number") and instance < schema["minimum"]:
        problems.append(f"{path}: {instance} is below the minimum {schema['minimum']}")
    if isinstance(instance, dict):
        props: dict[str, Any] = schema.get("properties", {})
        for key in schema.get("required", []):
            if key not in instance:
                problems.append(f"{path}: missing required property {key!r}")
        extra = schema.get("additionalProperties", True)
        for key, value in instance.items():
            if key in props:
                problems += validate(value, props[key], f"{path}.{key}")
            elif extra is False:
                problems.append(f"{path}: unexpected property {key!r}")
            elif isinstance(extra, dict):
                problems += validate(value, extra, f"{path}.{key}")
    if isinstance(instance, list) and "items" in schema:
        for i, item in enumerate(instance):
            problems += validate(item, schema["items"], f"{path}[{i}]")
    return problems
