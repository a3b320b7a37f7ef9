"""Library objects as the API's messages, and requests as library arguments.

Protobuf only, no grpc: the servicer (``taskman.service``) calls these, and
they are testable without a server.
"""

import collections
import datetime

from taskman.api import task_manager_pb2
from taskman.errors import InvalidArgument
from taskman.output import Chunk, Selector
from taskman.task import Task


def status_response(task: Task, args_chars: int = 0) -> task_manager_pb2.TaskStatusResponse:
    """Fill a TaskStatusResponse; the exit code and end time only once ended.

    ``args_chars`` > 0 cuts the arguments to about that many characters (for
    listings, whose messages must stay far below gRPC's 4 MiB limit).
    """
    response = task_manager_pb2.TaskStatusResponse(
        task_id=task.id, process_id=task.pid, status=int(task.status),
        termination_signal=task.signal, termination_source=task.source.value,
        owner=task.owner, command=task.command, args=_cut(task.args, args_chars),
        output_bytes=task.output_size, output_dropped_bytes=task.output_dropped,
        output_note=task.output_note)
    if task.start_time is not None:
        _set_time(response.start_time, task.start_time)
    if not task.running:
        if task.exit_code is not None:
            response.exit_code = task.exit_code
        if task.end_time is not None:
            _set_time(response.end_time, task.end_time)
    return response


# Finished tasks' GetTaskStatus replies, by task id, with the record each was
# made from: a finished task's record no longer changes and clients poll it.
# A reply is reused only for a record equal in every field, so it is never stale;
# only small ones are kept (long argument lists are not worth the memory).
REPLIES_KEPT = 1024
REPLY_BYTES_KEPT = 4096
_replies: "collections.OrderedDict[str, tuple]" = collections.OrderedDict()


def status_reply(task: Task) -> task_manager_pb2.TaskStatusResponse:
    """``status_response(task)`` for GetTaskStatus: a finished task's reply
    made once. ``task`` is the caller's own snapshot (kept as the key), and
    the reply is shared: send it, never change it."""
    if task.running:
        return status_response(task)
    kept = _replies.get(task.id)
    if kept is not None and kept[0] == task:
        return kept[1]
    reply = status_response(task)
    if reply.ByteSize() <= REPLY_BYTES_KEPT:
        if len(_replies) >= REPLIES_KEPT:
            _replies.popitem(last=False)
        _replies[task.id] = (task, reply)
    return reply


_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
_NAIVE_EPOCH = datetime.datetime(1970, 1, 1)


def _set_time(timestamp, when: datetime.datetime) -> None:
    """``timestamp.FromDatetime(when)`` (naive means UTC) in datetime's own C
    arithmetic: protobuf's goes through a time tuple and calendar.timegm in
    Python, on every status reply."""
    since = when - (_EPOCH if when.tzinfo is not None else _NAIVE_EPOCH)
    timestamp.seconds = since.days * 86400 + since.seconds
    timestamp.nanos = since.microseconds * 1000


def _cut(args: list, chars: int) -> list:
    """The arguments cut to about ``chars`` characters, the last cut one ending
    in "..." (``taskman.task.cut_args`` leaves such an argument out instead)."""
    if not chars or sum(map(len, args)) <= chars:
        return args
    kept = []
    for argument in args:
        if len(argument) >= chars:
            kept.append(argument[:chars] + "...")
            break
        kept.append(argument)
        chars -= len(argument)
    return kept


def output_response(chunk: Chunk) -> task_manager_pb2.StreamTaskOutputResponse:
    """A StreamTaskOutputResponse: the RFD's ``output`` plus offset, stream and time."""
    response = task_manager_pb2.StreamTaskOutputResponse(
        output=chunk.data, offset=chunk.offset, stream=int(chunk.stream))
    response.time.seconds, response.time.nanos = divmod(chunk.time_ns, 1_000_000_000)
    return response


def stream_view(request) -> dict:
    """manager.chunks's view arguments from a StreamTaskOutputRequest;
    InvalidArgument for a selector this server does not know."""
    if request.selector not in Selector._value2member_map_:
        raise InvalidArgument(f"unknown output selector {request.selector}")
    since = None
    if request.HasField("since"):
        since = request.since.ToDatetime(tzinfo=datetime.timezone.utc)
    return {"offset": request.offset, "selector": Selector(request.selector),
            "tail_bytes": request.tail_bytes, "tail_lines": request.tail_lines,
            "since": since, "follow": not request.no_follow}


def usage_response(users) -> task_manager_pb2.GetUsageResponse:
    """A GetUsageResponse from (user, [taskman.quotas.Usage]) pairs."""
    return task_manager_pb2.GetUsageResponse(users=[
        task_manager_pb2.UserUsage(user=user, quotas=[
            task_manager_pb2.QuotaUsage(name=line.name, used=line.used, limit=line.limit,
                                        option=line.option) for line in lines])
        for user, lines in users])
