"""An agentledger worker in Python: it serves the GATEKEEPER role with its
own policy and runs one external tool, `sentiment`, over the GraphQL API.

It waits on the `agentTasks` subscription (WebSocket, graphql-transport-ws),
claims work with `claimAgentTask` / `claimToolCall` over HTTP, and answers
with `submitAgentDecision` / `completeToolCall`. Every decision it submits
is recorded on the ledger with this worker as the actor.

    AGENTLEDGER_API_KEY=al_… python worker.py --url http://127.0.0.1:8080
"""

import argparse
import asyncio
import logging
import os
import re
import signal

from gql import Client, gql
from gql.transport.aiohttp import AIOHTTPTransport
from gql.transport.exceptions import TransportQueryError
from gql.transport.websockets import WebsocketsTransport

VERSION = "1.0.0"
TOOL = "sentiment"

SIGNALS = gql(
    """
    subscription($tools: [String!]) {
      agentTasks(role: GATEKEEPER, tools: $tools) { role tool }
    }
    """
)
CLAIM_TASK = gql(
    """
    mutation($worker: String!) {
      claimAgentTask(role: GATEKEEPER, workerId: $worker, leaseSeconds: 30) {
        id workflowId attempt context
      }
    }
    """
)
SUBMIT = gql(
    """
    mutation($task: ID!, $decision: JSON!, $worker: String!, $version: String!) {
      submitAgentDecision(taskId: $task, decision: $decision, workerId: $worker,
                          workerVersion: $version,
                          policy: {name: "gatekeeper-python", version: "1"}) {
        id state
      }
    }
    """
)
CLAIM_CALL = gql(
    """
    mutation($worker: String!, $tools: [String!]!) {
      claimToolCall(tools: $tools, workerId: $worker, leaseSeconds: 30) {
        id workflowId subtaskId tool input attempt deadline
      }
    }
    """
)
COMPLETE = gql(
    """
    mutation($call: ID!, $output: String, $error: String, $worker: String) {
      completeToolCall(callId: $call, output: $output, error: $error, workerId: $worker)
    }
    """
)

# The gate's own rules: nothing that handles passwords or moves money.
FORBIDDEN = re.compile(r"password|비밀번호|transfer money|송금", re.IGNORECASE)
URGENT = re.compile(r"urgent|asap|긴급", re.IGNORECASE)

POSITIVE = {"good", "great", "love", "excellent", "happy", "좋아요", "좋다", "최고", "만족"}
NEGATIVE = {"bad", "awful", "hate", "terrible", "broken", "싫어요", "나쁘다", "최악", "불만"}


def gate(context):
    """The verdict on an analysis: a decision of the GATEKEEPER schema."""
    request = context.get("request") or ""
    subtasks = (context.get("analysis") or {}).get("subtasks") or []
    if FORBIDDEN.search(request):
        return {
            "verdict": "REJECT",
            "priority": "NORMAL",
            "risk": 0.95,
            "reasons": ["the request handles credentials or money"],
            "rationale": "this gate never lets credentials or money through",
        }
    untooled = [s["id"] for s in subtasks if not s.get("tool")]
    if untooled:
        revise = (context.get("revisionsLeft") or 0) > 0
        return {
            "verdict": "REVISE" if revise else "ESCALATE",
            "priority": "NORMAL",
            "risk": 0.4,
            "reasons": [f"no tool for {', '.join(untooled)}"],
            "rationale": "every step needs a tool",
        }
    return {
        "verdict": "APPROVE",
        "priority": "HIGH" if URGENT.search(request) else "NORMAL",
        "risk": 0.1,
        "reasons": [f"{len(subtasks)} step(s), each with a tool"],
        "rationale": "a plain plan over registered tools",
    }


def sentiment(text):
    """The `sentiment` tool: counts positive and negative words."""
    words = re.findall(r"\w+", text.lower())
    pos = sum(1 for w in words if w in POSITIVE)
    neg = sum(1 for w in words if w in NEGATIVE)
    label = "positive" if pos > neg else "negative" if neg > pos else "neutral"
    return f"sentiment: {label} (+{pos} / -{neg})"


class Worker:
    def __init__(self, http, worker_id):
        self.http = http
        self.worker_id = worker_id

    async def drain_tasks(self):
        """Claims and decides gatekeeper tasks until none is left."""
        while True:
            claimed = await self.http.execute(CLAIM_TASK, variable_values={"worker": self.worker_id})
            task = claimed["claimAgentTask"]
            if task is None:
                return
            decision = gate(task["context"])
            try:
                await self.http.execute(
                    SUBMIT,
                    variable_values={
                        "task": task["id"],
                        "decision": decision,
                        "worker": self.worker_id,
                        "version": VERSION,
                    },
                )
                logging.info("%s: %s", task["workflowId"], decision["verdict"])
            except TransportQueryError as e:
                # CONFLICT: the lease ran out and another worker decided.
                logging.warning("%s: not recorded: %s", task["id"], e.errors)

    async def drain_calls(self):
        """Claims and runs `sentiment` calls until none is left."""
        while True:
            claimed = await self.http.execute(
                CLAIM_CALL, variable_values={"worker": self.worker_id, "tools": [TOOL]}
            )
            call = claimed["claimToolCall"]
            if call is None:
                return
            try:
                answer = {"output": sentiment(call["input"])}
            except Exception as e:  # a tool error: the executor retries it
                answer = {"error": str(e) or type(e).__name__}
            try:
                await self.http.execute(
                    COMPLETE,
                    variable_values={"call": call["id"], "worker": self.worker_id, **answer},
                )
            except TransportQueryError as e:
                logging.warning("%s: answer refused: %s", call["id"], e.errors)


async def run(args, key):
    headers = {"Authorization": f"Bearer {key}"}
    base = args.url.rstrip("/")
    http = Client(transport=AIOHTTPTransport(url=f"{base}/graphql", headers=headers))
    ws_url = re.sub(r"^http", "ws", base) + "/graphql/ws"
    ws = Client(
        transport=WebsocketsTransport(
            url=ws_url,
            init_payload=headers,
            subprotocols=[WebsocketsTransport.GRAPHQLWS_SUBPROTOCOL],
        )
    )
    async with http as http_session, ws as ws_session:
        worker = Worker(http_session, args.worker_id)
        logging.info("serving GATEKEEPER and the %s tool as %s", TOOL, args.worker_id)
        # The subscription signals once at once, then whenever work may wait.
        async for signal_ in ws_session.subscribe(SIGNALS, variable_values={"tools": [TOOL]}):
            which = signal_["agentTasks"]
            try:
                if which["tool"]:
                    await worker.drain_calls()
                else:
                    await worker.drain_tasks()
            except TransportQueryError as e:
                # E.g. UNAVAILABLE while the database restarts: the next
                # signal (at most 5 s away) tries again.
                logging.warning("claim failed: %s", e.errors)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=os.environ.get("AGENTLEDGER_URL", "http://127.0.0.1:8080"))
    parser.add_argument("--worker-id", default=os.environ.get("WORKER_ID", "py-gatekeeper-1"))
    args = parser.parse_args()
    key = os.environ.get("AGENTLEDGER_API_KEY")
    if not key:
        parser.error("set AGENTLEDGER_API_KEY to an API key of role agent")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    # gql logs every request and answer at INFO.
    logging.getLogger("gql").setLevel(logging.WARNING)
    loop = asyncio.new_event_loop()
    task = loop.create_task(run(args, key))
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    try:
        loop.run_until_complete(task)
    except asyncio.CancelledError:
        logging.info("stopped")


if __name__ == "__main__":
    main()
