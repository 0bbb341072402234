"""Tool calling for Gemma, which has no tool tokens: tool definitions go into the system prompt with an
instruction to answer a call as a JSON object `{"name": ..., "arguments": {...}}`; a reply that is such an
object (or a list of them, possibly inside a ```json fence) becomes `tool_calls`.
"""

from __future__ import annotations

import json
import re

from ..errors import BadOptionError

INSTRUCTION = (
    "You have access to the following functions. To call one, reply with only a JSON object of the form "
    '{"name": "<function name>", "arguments": {<argument name>: <value>, ...}} and nothing else. '
    "To call several, reply with a JSON list of such objects. If no function fits, answer normally.\n\n"
    "Functions:\n")


def check_tools(tools) -> list[dict]:
    """Ollama/OpenAI tool definitions -> their `function` objects; BadOptionError for a malformed one."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise BadOptionError("tools must be a list of {\"type\": \"function\", \"function\": {...}}")
    out = []
    for tool in tools:
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise BadOptionError(f"each tool needs a function with a name, got {tool!r:.120}")
        if tool.get("type", "function") != "function":
            raise BadOptionError(f"unsupported tool type {tool.get('type')!r}: only \"function\"")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise BadOptionError(f"the parameters of tool {fn['name']!r} must be a JSON schema object")
        out.append({k: fn[k] for k in ("name", "description", "parameters") if k in fn})
    return out


def render_messages(messages: list[dict], functions: list[dict]) -> list[dict]:
    """Messages for the chat template: the tool instruction joins the system prompt; an assistant's earlier
    tool calls become the JSON it would have written; tool results are labelled with the tool's name."""
    out = []
    for m in messages:
        m = dict(m)
        calls = m.pop("tool_calls", None)
        if calls and m.get("role") == "assistant":
            body = [{"name": c["function"]["name"], "arguments": _arguments(c["function"].get("arguments"))}
                    for c in calls if isinstance(c, dict) and isinstance(c.get("function"), dict)]
            text = json.dumps(body[0] if len(body) == 1 else body)
            m["content"] = (m.get("content") or "") + text
        if m.get("role") == "tool":
            name = m.pop("tool_name", None) or m.pop("name", None)
            m.pop("tool_call_id", None)
            if name:
                m["content"] = f"Result of {name}: {m.get('content') or ''}"
        out.append(m)
    if functions:
        block = INSTRUCTION + "\n".join(json.dumps(f) for f in functions)
        if out and out[0].get("role") == "system":
            out[0] = {**out[0], "content": f"{out[0].get('content') or ''}\n\n{block}"}
        else:
            out.insert(0, {"role": "system", "content": block})
    return out


def _arguments(value):
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value if value is not None else {}


_FENCE = re.compile(r"^```(?:json|tool_code|tool_call)?\s*(.*?)\s*```$", re.S)


def parse_tool_calls(text: str, functions: list[dict]) -> list[dict] | None:
    """The calls in a reply, as [{"name", "arguments": dict}], or None if the reply is not a tool call.
    Only names of offered functions count."""
    body = text.strip()
    fence = _FENCE.match(body)
    if fence:
        body = fence.group(1)
    if not body.startswith(("{", "[")):
        return None
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    items = doc if isinstance(doc, list) else [doc]
    names = {f["name"] for f in functions}
    calls = []
    for item in items:
        if not isinstance(item, dict):
            return None
        if isinstance(item.get("function"), dict):  # {"function": {"name", "arguments"}} also seen
            item = item["function"]
        name = item.get("name")
        args = item.get("arguments", item.get("parameters", {}))
        args = _arguments(args)
        if name not in names or not isinstance(args, dict):
            return None
        calls.append({"name": name, "arguments": args})
    return calls or None


def maybe_tool_call(prefix: str) -> bool:
    """Whether the reply so far could still turn out to be a tool call (so it must not be streamed yet)."""
    head = prefix.lstrip()
    return not head or head.startswith(("{", "[", "`"))


def call_schema(functions: list[dict], name: str | None = None) -> dict:
    """A JSON schema whose instances are exactly the tool calls allowed: for constrained decoding when a
    client requires a call (OpenAI's tool_choice)."""
    options = [f for f in functions if name is None or f["name"] == name]
    if not options:
        raise BadOptionError(f"tool_choice names {name!r}, which is not among the tools")
    schemas = [{"type": "object", "properties": {"name": {"const": f["name"]},
                                                 "arguments": f.get("parameters") or {"type": "object"}},
                "required": ["name", "arguments"]} for f in options]
    return schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
