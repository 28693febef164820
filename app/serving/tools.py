"""Tool calls: the schema a forced call is constrained to, and calls parsed from a model's output."""

from __future__ import annotations

import json
from typing import Any


def tool_call_schema(tools: list[dict[str, Any]], name: str | None) -> dict[str, Any]:
    """The JSON schema of one call: ``{"name": ..., "arguments": {...}}`` of the named tool, or of
    any of ``tools`` (a tool without parameters takes an object). The arguments hold the declared
    parameters only (:func:`closed`), as OpenAI's strict function calling."""
    options = []
    for tool in tools:
        fn = tool["function"]
        if name is not None and fn["name"] != name:
            continue
        options.append(
            {
                "type": "object",
                "properties": {
                    "name": {"const": fn["name"]},
                    "arguments": closed(fn.get("parameters") or {"type": "object"}),
                },
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    return options[0] if len(options) == 1 else {"anyOf": options}


def closed(schema: Any) -> Any:
    """``schema`` with ``additionalProperties: false`` on every object that lists its properties
    and says nothing of others (a model copying the schema into the arguments is otherwise valid)."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in ("properties", "$defs", "definitions", "patternProperties"):  # maps of name -> schema
        if isinstance(schema.get(key), dict):
            out[key] = {name: closed(sub) for name, sub in schema[key].items()}
    for key in ("items", "additionalProperties", "not"):  # one schema
        if isinstance(schema.get(key), dict):
            out[key] = closed(schema[key])
    for key in ("anyOf", "oneOf", "allOf", "prefixItems"):  # lists of schemas
        if isinstance(schema.get(key), list):
            out[key] = [closed(sub) for sub in schema[key]]
    if "properties" in schema and "additionalProperties" not in schema:
        out["additionalProperties"] = False
    return out


def parse_tool_calls(text: str, names: set[str]) -> list[tuple[str, str]] | None:
    """The (name, arguments as JSON text) calls in a model's output: ``<tool_call>{...}</tool_call>``
    blocks (the Hermes/Qwen convention) or the whole text as one call object (what constrained
    decoding produces); None when the text is not a call of one of ``names``."""
    blocks = []
    rest = text
    while "<tool_call>" in rest:
        _, _, after = rest.partition("<tool_call>")
        body, _, rest = after.partition("</tool_call>")
        blocks.append(body)
    calls = []
    for body in blocks or [text]:
        try:
            obj = json.loads(body.strip())
        except ValueError:
            return None
        if not isinstance(obj, dict) or obj.get("name") not in names:
            return None
        args = obj.get("arguments", obj.get("parameters", {}))
        calls.append((str(obj["name"]), args if isinstance(args, str) else json.dumps(args)))
    return calls or None
