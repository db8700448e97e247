"""Operator's command line for a running bridge: its status and its dead letters.

    python -m erp_bridge.cli status
    python -m erp_bridge.cli dead-letters list --status dead,retrying --limit 50
    python -m erp_bridge.cli dead-letters retry 12 13 --actor ana --reason "sku created"
    python -m erp_bridge.cli dead-letters discard 14 --actor ana --reason "test order"

It talks to the bridge's admin service (erp_bridge/admin.py) and checks nothing the
service checks itself, so the service's reasons are the only ones an operator meets.
Exit codes: 0 done; 1 the call failed (status code and ErrorInfo reason on stderr);
2 the command line was wrong.
"""

import argparse
import json
import os
import sys
import textwrap
import time
from collections.abc import Sequence
from typing import Any, TypeAlias

import grpc
from google.protobuf import descriptor, timestamp_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from server import logs
from stockward.v1 import bridge_pb2, bridge_pb2_grpc

# What the command prints, through a logger that writes it bare to the terminal.
say = logs.console(__name__)

TARGET_ENV = "STOCKWARD_BRIDGE_ADMIN"
# BridgeConfig.admin_listen's default, so a bridge started plainly is found plainly.
TARGET_DEFAULT = "127.0.0.1:50061"
# The whole command gets this long, however many pages it reads: the service answers
# from one Postgres statement per call, so ten seconds means the bridge is in trouble.
TIMEOUT_S_DEFAULT = 10.0
# Dead letters listed when --limit is not given: a screenful or two.
LIST_LIMIT_DEFAULT = 100
# Dead letters asked for per call while following pages. The service allows 1,000; a
# few hundred keeps each answer below gRPC's 4 MB receive limit as long as the ERP's
# messages stay under about 15 KB each.
LIST_PAGE_SIZE = 250

WireStatus: TypeAlias = bridge_pb2.DeadLetterStatus.ValueType

# Lines of prose in the status output wrap here; tables run as wide as they need.
TEXT_WIDTH_CHARS = 88

EXIT_OK = 0
EXIT_RPC_FAILED = 1
# argparse exits with this itself on a wrong command line; named here for readers.
EXIT_USAGE = 2

_STATUS_NAMES = {
    "dead": bridge_pb2.DEAD_LETTER_STATUS_DEAD,
    "retrying": bridge_pb2.DEAD_LETTER_STATUS_RETRYING,
    "resolved": bridge_pb2.DEAD_LETTER_STATUS_RESOLVED,
    "discarded": bridge_pb2.DEAD_LETTER_STATUS_DISCARDED,
}


class Deadline:
    """One time budget for the whole command, handed to each call in turn."""

    def __init__(self, budget_s: float) -> None:
        self._end_s = time.monotonic() + budget_s

    def remaining_s(self) -> float:
        # A spent budget still goes out as a tiny timeout, so gRPC reports
        # DEADLINE_EXCEEDED the usual way.
        return max(0.001, self._end_s - time.monotonic())


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m erp_bridge.cli",
        description="Status and dead letters of a running ERP bridge.",
    )
    parser.add_argument(
        "--target",
        default=os.environ.get(TARGET_ENV, TARGET_DEFAULT),
        help=f"the bridge's admin address, host:port (${TARGET_ENV}, "
        f"else {TARGET_DEFAULT})",
    )
    parser.add_argument(
        "--timeout-s",
        type=_positive_float,
        default=TIMEOUT_S_DEFAULT,
        help=f"budget for the whole command (default {TIMEOUT_S_DEFAULT:g})",
    )
    parser.add_argument(
        "--json", action="store_true", help="print JSON instead of tables"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("status", help="streams, counters, breaker, lag")

    letters = commands.add_parser("dead-letters", help="lines the ERP refused")
    actions = letters.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="list dead letters, oldest first")
    listing.add_argument(
        "--status",
        type=_statuses,
        default=[],
        help="comma separated: dead, retrying, resolved, discarded "
        "(default dead,retrying)",
    )
    listing.add_argument(
        "--limit",
        type=_positive_int,
        default=LIST_LIMIT_DEFAULT,
        help=f"list at most this many (default {LIST_LIMIT_DEFAULT})",
    )
    for action in ("retry", "discard"):
        moving = actions.add_parser(action, help=f"{action} dead letters by id")
        moving.add_argument("ids", nargs="+", type=int, metavar="ID")
        moving.add_argument("--actor", required=True, help="who asks, for the log")
        moving.add_argument("--reason", required=True, help="why, for the log")
    return parser.parse_args(argv)


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def _statuses(text: str) -> list[WireStatus]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in _STATUS_NAMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown status in {text!r}; expected some of " + ", ".join(_STATUS_NAMES)
        )
    return [_STATUS_NAMES[name] for name in names]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    deadline = Deadline(args.timeout_s)

    try:
        with grpc.insecure_channel(args.target) as channel:
            stub = bridge_pb2_grpc.BridgeAdminServiceStub(channel)
            result = run(stub, args, deadline)
    except grpc.RpcError as error:
        say.error("%s", describe_error(error))
        return EXIT_RPC_FAILED

    if args.json:
        say.info("%s", json.dumps(result, indent=2))
    else:
        say.info("%s", render(args, result))
    return EXIT_OK


def run(stub: Any, args: argparse.Namespace, deadline: Deadline) -> dict[str, Any]:
    """Make the command's calls; the answer as plain data, for JSON or a table."""
    if args.command == "status":
        status = stub.GetBridgeStatus(
            bridge_pb2.GetBridgeStatusRequest(), timeout=deadline.remaining_s()
        )
        return plain(status)
    if args.action == "list":
        return list_dead_letters(stub, args.status, args.limit, deadline)

    request_type, method = {
        "retry": (bridge_pb2.RetryDeadLettersRequest, stub.RetryDeadLetters),
        "discard": (bridge_pb2.DiscardDeadLettersRequest, stub.DiscardDeadLetters),
    }[args.action]
    request = request_type(ids=args.ids, actor=args.actor, reason=args.reason)
    return plain(method(request, timeout=deadline.remaining_s()))


def list_dead_letters(
    stub: Any, statuses: list[WireStatus], limit: int, deadline: Deadline
) -> dict[str, Any]:
    """Follow pages until `limit` letters or the last page. `more` says whether the
    service had letters beyond the limit (or possibly had: a full last page)."""
    letters: list[dict[str, Any]] = []
    token = ""
    while True:
        page_size = min(LIST_PAGE_SIZE, limit - len(letters))
        request = bridge_pb2.ListDeadLettersRequest(
            statuses=statuses, page_size=page_size, page_token=token
        )
        page = stub.ListDeadLetters(request, timeout=deadline.remaining_s())
        letters.extend(plain(x) for x in page.dead_letters)
        token = page.next_page_token
        if not token or len(letters) >= limit:
            break
    return {"dead_letters": letters, "more": bool(token)}


def describe_error(error: grpc.RpcError) -> str:
    """`error: CODE REASON: message`, the reason from the status's ErrorInfo."""
    code = error.code().name
    message = error.details() or ""
    reason = ""
    status = rpc_status.from_call(error)
    for detail in status.details if status is not None else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            reason = info.reason
    return f"error: {' '.join(filter(None, (code, reason)))}: {message}"


# Plain data from messages: every field, default or not, so JSON readers see a stable
# shape; int64 stays a number (protobuf's own JSON makes it a string); enums by their
# short lower-case name; timestamps as RFC 3339 text.


def plain(message: Message) -> dict[str, Any]:
    fields = message.DESCRIPTOR.fields
    return {f.name: _plain_field(f, getattr(message, f.name)) for f in fields}


# protobuf's stubs give a field descriptor two types (pure Python and upb), hence Any.


def _plain_field(field: Any, value: Any) -> Any:
    if field.is_repeated:
        return [_plain_value(field, v) for v in value]
    return _plain_value(field, value)


def _plain_value(field: Any, value: Any) -> Any:
    if isinstance(value, timestamp_pb2.Timestamp):
        return value.ToJsonString()
    if isinstance(value, Message):
        return plain(value)
    if field.enum_type is not None:
        return enum_name(field.enum_type, value)
    return value


def enum_name(enum_type: descriptor.EnumDescriptor, number: int) -> str:
    """BRIDGE_STREAM_STATE_IDLE -> "idle"; an unknown number as itself."""
    prefix = enum_type.values_by_number[0].name.removesuffix("UNSPECIFIED")
    value = enum_type.values_by_number.get(number)
    if value is None:
        return str(number)
    return value.name.removeprefix(prefix).lower()


# Tables for people.


def render(args: argparse.Namespace, result: dict[str, Any]) -> str:
    if args.command == "status":
        return render_status(result)
    if args.action == "list":
        return render_dead_letters(result)
    moved_key = "retried_ids" if args.action == "retry" else "discarded_ids"
    moved, not_dead = result[moved_key], result["not_dead_ids"]
    verb = "retried" if args.action == "retry" else "discarded"
    lines = [f"{verb} ids: {_ids(moved)}"]
    if not_dead:
        lines.append(f"not dead ids (unknown, or not in status dead): {_ids(not_dead)}")
    return "\n".join(lines)


def render_status(status: dict[str, Any]) -> str:
    counts = status["dead_letters"]
    counters = status["counters"]
    head = [
        f"bridge {status['name']}  feed {status['feed']}  endpoint "
        f"{status['endpoint'] or '-'}  breaker {status['breaker']}",
        f"delivery lag p50 {status['delivery_lag_p50_seconds']:.3f} s  p99 "
        f"{status['delivery_lag_p99_seconds']:.3f} s  divergences "
        f"{status['divergences']}",
        f"sending {status['batches_per_second']:.1f} batches/s  "
        f"{status['lines_per_second']:.1f} lines/s",
        "dead letters  " + "  ".join(f"{k} {v}" for k, v in counts.items()),
        textwrap.fill(
            "counters  "
            + "  ".join(
                f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
                for k, v in counters.items()
            ),
            width=TEXT_WIDTH_CHARS,
            subsequent_indent="  ",
            break_on_hyphens=False,
        ),
        "",
    ]
    rows = [
        [
            s["shard"],
            s["state"],
            f"{s['acked_seq']}.{s['acked_line']}",
            s["head_seq"],
            s["lag_records"],
            f"{s['lag_seconds']:.3f}",
            s["acked_batch_id"] or "-",
            s["last_error"] or "-",
        ]
        for s in status["streams"]
    ]
    headers = [
        "shard",
        "state",
        "acked",
        "head_seq",
        "lag_records",
        "lag_s",
        "acked_batch_id",
        "last_error",
    ]
    return "\n".join(head) + table(headers, rows)


def render_dead_letters(result: dict[str, Any]) -> str:
    headers = [
        "id",
        "status",
        "shard",
        "attempts",
        "sku",
        "location",
        "on_hand_delta",
        "held_delta",
        "reason",
        "last_failed_at",
        "message",
    ]
    rows = [
        [
            x["id"],
            x["status"],
            x["shard"],
            x["attempts"],
            x["line"]["sku"],
            x["line"]["location"],
            x["line"]["on_hand_delta"],
            x["line"]["held_delta"],
            x["reason"],
            x["last_failed_at"],
            x["message"],
        ]
        for x in result["dead_letters"]
    ]
    footer = f"{len(rows)} dead letters"
    if result["more"]:
        footer += "; more may follow, raise --limit to see them"
    return table(headers, rows) + "\n" + footer


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Columns padded to their widest cell; numbers to the right."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    numeric = [
        bool(rows) and all(isinstance(r[i], int) for r in rows)
        for i in range(len(headers))
    ]
    lines = []
    for row in [list(headers), *cells]:
        padded = [
            c.rjust(w) if right else c.ljust(w)
            for c, w, right in zip(row, widths, numeric, strict=True)
        ]
        lines.append("  ".join(padded).rstrip())
    return "\n".join(lines)


def _ids(ids: Sequence[int]) -> str:
    return " ".join(str(i) for i in ids) or "none"


if __name__ == "__main__":
    sys.exit(main())
