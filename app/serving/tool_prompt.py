"""Tools on a base whose chat template cannot render them: the server renders them itself.

The conversation gets a system message (before its own system text, if any) that lists the tools as
JSON and says how to call one: reply with only ``{"name": ..., "arguments": {...}}``. Earlier
assistant calls are rendered as those objects (one per line), and tool results as user messages
naming the function they answer. The grammar then decides what the model may write: a forced call
(``required`` or a named tool) is one such object of the allowed tools (:func:`tool_call_schema`);
``auto`` allows either such an object or plain text that does not begin with ``{``
(:meth:`app.engine.grammar.Grammars.call_or_text`). The output is parsed back into OpenAI
``tool_calls`` by :func:`app.serving.tools.parse_tool_calls`.
"""

from __future__ import annotations

import json
from typing import Any

CALL_FORMAT = '{"name": "<function name>", "arguments": {<its arguments>}}'


def tools_system_text(tools: list[dict[str, Any]], forced: bool) -> str:
    """The system text that offers ``tools`` (OpenAI tool definitions) to the model."""
    lines = [
        "You can call functions. To call one, reply with only this JSON object, nothing before or "
        f"after it: {CALL_FORMAT}",
        "You must call one of the functions."
        if forced
        else "If no function helps, or a function's result is already given, reply in plain text.",
        "The functions:",
    ]
    for tool in tools:
        fn = tool["function"]
        entry = {
            "name": fn["name"],
            "description": fn.get("description", ""),
            "parameters": fn.get("parameters"),
        }
        lines.append(json.dumps({k: v for k, v in entry.items() if v}, ensure_ascii=False))
    return "\n".join(lines)


def render_tools(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, forced: bool
) -> list[dict[str, Any]]:
    """``messages`` as a template without tool support can render them (see the module docstring)."""
    names: dict[str, str] = {}  # tool call id -> function name
    out: list[dict[str, Any]] = []
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = []
            for call in m["tool_calls"]:
                fn = call["function"]
                names[str(call.get("id"))] = fn["name"]
                calls.append(
                    json.dumps({"name": fn["name"], "arguments": fn["arguments"]}, ensure_ascii=False)
                )
            text = "\n".join(([m["content"]] if m.get("content") else []) + calls)
            out.append({"role": "assistant", "content": text})
        elif m["role"] == "tool":
            name = names.get(str(m.get("tool_call_id")), "the function")
            result = f"{name} returned: {m.get('content', '')}"
            out.append({"role": "user", "content": f"{result}\nUse this result to answer."})
        else:
            out.append({"role": m["role"], "content": m.get("content") or ""})
    if tools:
        offer = tools_system_text(tools, forced)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{offer}\n\n{out[0]['content']}"}
        else:
            out.insert(0, {"role": "system", "content": offer})
    return out
