"""A small helpdesk MCP server for agentledger's [[tools.mcp]].

Built with the reference Python SDK of the Model Context Protocol (FastMCP).
It offers two tools:

* ``open_ticket`` opens a ticket: it acts, so calling it twice would open two
  tickets. It honours the idempotency key agentledger sends with each call
  (``_meta["io.agentledger/idempotency-key"]``): a call with a key it has seen
  answers the ticket opened the first time instead of opening another.
* ``glossary`` looks Korean and English helpdesk terms up: it only reads, so
  it is safe to call again and always answers the same (idempotent and
  deterministic).

Tickets are kept one per line (JSON) in the file ``--tickets`` names.

    python server.py --tickets tickets.jsonl              # over stdio
    python server.py --tickets tickets.jsonl --http 8931  # streamable HTTP at /mcp
"""

import argparse
import json
import os
import threading

from mcp.server.fastmcp import Context, FastMCP

IDEMPOTENCY_KEY = "io.agentledger/idempotency-key"

GLOSSARY = {
    "로그인": "login",
    "비밀번호": "password",
    "결제": "payment",
    "환불": "refund",
    "배송": "delivery",
    "login": "로그인",
    "password": "비밀번호",
    "payment": "결제",
    "refund": "환불",
    "delivery": "배송",
}

mcp = FastMCP("helpdesk")
tickets_path = "tickets.jsonl"
lock = threading.Lock()


def idempotency_key(ctx: Context) -> str | None:
    meta = ctx.request_context.meta
    extra = (meta.model_extra or {}) if meta is not None else {}
    key = extra.get(IDEMPOTENCY_KEY)
    return key if isinstance(key, str) else None


def read_tickets() -> list[dict]:
    if not os.path.exists(tickets_path):
        return []
    with open(tickets_path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@mcp.tool()
def open_ticket(text: str, instruction: str, ctx: Context) -> str:
    """Opens a helpdesk ticket for the text and answers its number."""
    key = idempotency_key(ctx)
    with lock:
        tickets = read_tickets()
        for ticket in tickets:
            if key is not None and ticket["key"] == key:
                return f"ticket #{ticket['number']} (opened before)"
        number = len(tickets) + 1
        with open(tickets_path, "a", encoding="utf-8") as f:
            record = {"number": number, "key": key, "text": text, "instruction": instruction}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return f"ticket #{number}"


@mcp.tool()
def glossary(text: str) -> str:
    """Translates the helpdesk terms of the text, Korean to English and back."""
    found = [f"{term} = {GLOSSARY[term]}" for term in GLOSSARY if term in text.lower()]
    return "; ".join(found) if found else "no known terms"


def main() -> None:
    global tickets_path
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tickets", default=tickets_path, help="where tickets are kept")
    parser.add_argument("--http", type=int, metavar="PORT", help="serve over HTTP at /mcp")
    args = parser.parse_args()
    tickets_path = args.tickets
    if args.http:
        mcp.settings.port = args.http
        mcp.run(transport="streamable-http")
    else:
        mcp.run()


if __name__ == "__main__":
    main()
