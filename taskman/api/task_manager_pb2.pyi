import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JobStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATUS_UNKNOWN: _ClassVar[JobStatus]
    JOB_STATUS_STARTED: _ClassVar[JobStatus]
    JOB_STATUS_SIGNALED: _ClassVar[JobStatus]
    JOB_STATUS_EXITED_OK: _ClassVar[JobStatus]
    JOB_STATUS_EXITED_ERROR: _ClassVar[JobStatus]

class OutputSelector(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTPUT_SELECTOR_ALL: _ClassVar[OutputSelector]
    OUTPUT_SELECTOR_STDOUT: _ClassVar[OutputSelector]
    OUTPUT_SELECTOR_STDERR: _ClassVar[OutputSelector]

class OutputStream(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTPUT_STREAM_COMBINED: _ClassVar[OutputStream]
    OUTPUT_STREAM_STDOUT: _ClassVar[OutputStream]
    OUTPUT_STREAM_STDERR: _ClassVar[OutputStream]
JOB_STATUS_UNKNOWN: JobStatus
JOB_STATUS_STARTED: JobStatus
JOB_STATUS_SIGNALED: JobStatus
JOB_STATUS_EXITED_OK: JobStatus
JOB_STATUS_EXITED_ERROR: JobStatus
OUTPUT_SELECTOR_ALL: OutputSelector
OUTPUT_SELECTOR_STDOUT: OutputSelector
OUTPUT_SELECTOR_STDERR: OutputSelector
OUTPUT_STREAM_COMBINED: OutputStream
OUTPUT_STREAM_STDOUT: OutputStream
OUTPUT_STREAM_STDERR: OutputStream

class StartTaskRequest(_message.Message):
    __slots__ = ("command", "args", "separate_streams", "node_labels")
    class NodeLabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    SEPARATE_STREAMS_FIELD_NUMBER: _ClassVar[int]
    NODE_LABELS_FIELD_NUMBER: _ClassVar[int]
    command: str
    args: _containers.RepeatedScalarFieldContainer[str]
    separate_streams: bool
    node_labels: _containers.ScalarMap[str, str]
    def __init__(self, command: _Optional[str] = ..., args: _Optional[_Iterable[str]] = ..., separate_streams: _Optional[bool] = ..., node_labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class StartTaskResponse(_message.Message):
    __slots__ = ("task_id",)
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    def __init__(self, task_id: _Optional[str] = ...) -> None: ...

class StopTaskRequest(_message.Message):
    __slots__ = ("task_id",)
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    def __init__(self, task_id: _Optional[str] = ...) -> None: ...

class StopTaskResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TaskStatusRequest(_message.Message):
    __slots__ = ("task_id",)
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    def __init__(self, task_id: _Optional[str] = ...) -> None: ...

class TaskStatusResponse(_message.Message):
    __slots__ = ("task_id", "exit_code", "process_id", "status", "termination_signal", "termination_source", "start_time", "end_time", "owner", "command", "args", "output_bytes", "output_dropped_bytes", "output_note")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    PROCESS_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    TERMINATION_SIGNAL_FIELD_NUMBER: _ClassVar[int]
    TERMINATION_SOURCE_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_BYTES_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_DROPPED_BYTES_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_NOTE_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    exit_code: int
    process_id: int
    status: JobStatus
    termination_signal: str
    termination_source: str
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    owner: str
    command: str
    args: _containers.RepeatedScalarFieldContainer[str]
    output_bytes: int
    output_dropped_bytes: int
    output_note: str
    def __init__(self, task_id: _Optional[str] = ..., exit_code: _Optional[int] = ..., process_id: _Optional[int] = ..., status: _Optional[_Union[JobStatus, str]] = ..., termination_signal: _Optional[str] = ..., termination_source: _Optional[str] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., owner: _Optional[str] = ..., command: _Optional[str] = ..., args: _Optional[_Iterable[str]] = ..., output_bytes: _Optional[int] = ..., output_dropped_bytes: _Optional[int] = ..., output_note: _Optional[str] = ...) -> None: ...

class StreamTaskOutputRequest(_message.Message):
    __slots__ = ("task_id", "offset", "selector", "tail_bytes", "tail_lines", "since", "no_follow")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    TAIL_BYTES_FIELD_NUMBER: _ClassVar[int]
    TAIL_LINES_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    NO_FOLLOW_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    offset: int
    selector: OutputSelector
    tail_bytes: int
    tail_lines: int
    since: _timestamp_pb2.Timestamp
    no_follow: bool
    def __init__(self, task_id: _Optional[str] = ..., offset: _Optional[int] = ..., selector: _Optional[_Union[OutputSelector, str]] = ..., tail_bytes: _Optional[int] = ..., tail_lines: _Optional[int] = ..., since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., no_follow: _Optional[bool] = ...) -> None: ...

class ListTasksRequest(_message.Message):
    __slots__ = ("statuses", "owner", "limit", "page_token")
    STATUSES_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    statuses: _containers.RepeatedScalarFieldContainer[JobStatus]
    owner: str
    limit: int
    page_token: str
    def __init__(self, statuses: _Optional[_Iterable[_Union[JobStatus, str]]] = ..., owner: _Optional[str] = ..., limit: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListTasksResponse(_message.Message):
    __slots__ = ("tasks", "next_page_token")
    TASKS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    tasks: _containers.RepeatedCompositeFieldContainer[TaskStatusResponse]
    next_page_token: str
    def __init__(self, tasks: _Optional[_Iterable[_Union[TaskStatusResponse, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetUsageRequest(_message.Message):
    __slots__ = ("user", "all_users")
    USER_FIELD_NUMBER: _ClassVar[int]
    ALL_USERS_FIELD_NUMBER: _ClassVar[int]
    user: str
    all_users: bool
    def __init__(self, user: _Optional[str] = ..., all_users: _Optional[bool] = ...) -> None: ...

class QuotaUsage(_message.Message):
    __slots__ = ("name", "used", "limit", "option")
    NAME_FIELD_NUMBER: _ClassVar[int]
    USED_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    OPTION_FIELD_NUMBER: _ClassVar[int]
    name: str
    used: int
    limit: int
    option: str
    def __init__(self, name: _Optional[str] = ..., used: _Optional[int] = ..., limit: _Optional[int] = ..., option: _Optional[str] = ...) -> None: ...

class UserUsage(_message.Message):
    __slots__ = ("user", "quotas")
    USER_FIELD_NUMBER: _ClassVar[int]
    QUOTAS_FIELD_NUMBER: _ClassVar[int]
    user: str
    quotas: _containers.RepeatedCompositeFieldContainer[QuotaUsage]
    def __init__(self, user: _Optional[str] = ..., quotas: _Optional[_Iterable[_Union[QuotaUsage, _Mapping]]] = ...) -> None: ...

class GetUsageResponse(_message.Message):
    __slots__ = ("users",)
    USERS_FIELD_NUMBER: _ClassVar[int]
    users: _containers.RepeatedCompositeFieldContainer[UserUsage]
    def __init__(self, users: _Optional[_Iterable[_Union[UserUsage, _Mapping]]] = ...) -> None: ...

class StreamTaskOutputResponse(_message.Message):
    __slots__ = ("output", "offset", "stream", "time")
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    output: bytes
    offset: int
    stream: OutputStream
    time: _timestamp_pb2.Timestamp
    def __init__(self, output: _Optional[bytes] = ..., offset: _Optional[int] = ..., stream: _Optional[_Union[OutputStream, str]] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
