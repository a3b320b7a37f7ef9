"""The API is the RFD's, and the committed generated modules are the proto's."""

import re
import subprocess
import sys

import pytest
from server_harness import REPO, RFD

PROTO = REPO / "proto" / "taskman" / "api" / "task_manager.proto"
GENERATED = ("task_manager_pb2.py", "task_manager_pb2.pyi", "task_manager_pb2_grpc.py")

pytestmark = pytest.mark.timeout(120)


def parse_proto(text: str) -> dict:
    """The shape of a proto file: package, services with their rpcs, enums
    with their values, messages with their fields (label, type, name, number)."""
    text = re.sub(r"//[^\n]*", "", text)
    shape = {"package": re.search(r"\bpackage\s+([\w.]+)\s*;", text).group(1),
             "services": {}, "enums": {}, "messages": {}}
    for name, body in re.findall(r"\bservice\s+(\w+)\s*\{(.*?)\n\s*\}", text, flags=re.S):
        shape["services"][name] = sorted(re.findall(
            r"\brpc\s+(\w+)\s*\(\s*(stream\s+)?([\w.]+)\s*\)\s*returns\s*\(\s*(stream\s+)?"
            r"([\w.]+)\s*\)", body))
    for name, body in re.findall(r"\benum\s+(\w+)\s*\{(.*?)\}", text, flags=re.S):
        shape["enums"][name] = sorted((value, int(number)) for value, number
                                      in re.findall(r"(\w+)\s*=\s*(\d+)\s*;", body))
    for name, body in re.findall(r"\bmessage\s+(\w+)\s*\{(.*?)\}", text, flags=re.S):
        shape["messages"][name] = sorted(
            (label.strip(), kind, field, int(number)) for label, kind, field, number
            in re.findall(r"(optional\s+|repeated\s+)?([\w.]+)\s+(\w+)\s*=\s*(\d+)\s*;", body))
    return shape


def rfd_proto() -> str:
    if not RFD.exists():
        pytest.skip(f"the RFD is not at {RFD}")
    match = re.search(r"```(package task_manager;.*?)```", RFD.read_text(), flags=re.S)
    if not match:
        pytest.skip("the RFD has no proto block")
    return match.group(1)


def test_the_proto_parser_sees_everything():
    shape = parse_proto(PROTO.read_text())
    assert len(shape["services"]["TaskManager"]) == 6
    assert len(shape["enums"]["JobStatus"]) == 5
    assert len(shape["messages"]["TaskStatusResponse"]) == 14
    assert shape["messages"]["StopTaskResponse"] == []


def assert_extends(ours, rfd):
    """Everything the RFD has is there unchanged; additions are new RPCs,
    messages and fields with numbers the RFD does not use (wire compatible)."""
    assert ours["package"] == rfd["package"]
    assert set(ours["services"]) == set(rfd["services"])
    for name, methods in rfd["services"].items():
        assert set(methods) <= set(ours["services"][name]), name
    for name, values in rfd["enums"].items():
        assert ours["enums"][name] == values, name  # new enums only, the RFD's untouched
    for name, fields in rfd["messages"].items():
        assert set(fields) <= set(ours["messages"][name]), name
        taken = {field[-1] for field in fields}
        added = set(ours["messages"][name]) - set(fields)
        assert not {field[-1] for field in added} & taken, name


def test_proto_extends_the_rfd_compatibly():
    ours = parse_proto(PROTO.read_text())
    assert_extends(ours, parse_proto(rfd_proto()))
    assert ("ListTasks", "", "ListTasksRequest", "", "ListTasksResponse") in \
        ours["services"]["TaskManager"]


def test_compiled_descriptor_matches_the_rfd():
    """The modules actually installed, field by field, against the RFD's text."""
    from google.protobuf.descriptor import FieldDescriptor

    from taskman.api import task_manager_pb2

    rfd = parse_proto(rfd_proto())
    descriptor = task_manager_pb2.DESCRIPTOR
    compiled = {"package": descriptor.package, "services": {}, "enums": {}, "messages": {}}
    for service in descriptor.services_by_name.values():
        compiled["services"][service.name] = sorted(
            (method.name, "", method.input_type.name,
             "stream " if method.server_streaming else "", method.output_type.name)
            for method in service.methods)
    for enum in descriptor.enum_types_by_name.values():
        compiled["enums"][enum.name] = sorted((value.name, value.number) for value in enum.values)
    for name, message in descriptor.message_types_by_name.items():
        fields = []
        for field in message.fields:
            if field.is_repeated:
                label = "repeated"
            elif field.has_presence and field.message_type is None:
                label = "optional"
            else:
                label = ""
            if field.message_type is not None:
                kind = field.message_type.full_name
            elif field.enum_type is not None:
                kind = field.enum_type.name
            else:
                kind = {FieldDescriptor.TYPE_STRING: "string", FieldDescriptor.TYPE_INT32: "int32",
                        FieldDescriptor.TYPE_UINT32: "uint32", FieldDescriptor.TYPE_UINT64: "uint64",
                        FieldDescriptor.TYPE_BYTES: "bytes", FieldDescriptor.TYPE_BOOL: "bool"}[field.type]
            fields.append((label, kind, field.name, field.number))
        compiled["messages"][name] = sorted(fields)
    assert_extends(compiled, rfd)


def test_generated_modules_are_fresh(tmp_path):
    """Regenerate with the pinned grpcio-tools; the committed modules must match."""
    pytest.importorskip("grpc_tools")
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{REPO / 'proto'}",
                    f"--python_out={tmp_path}", f"--pyi_out={tmp_path}",
                    f"--grpc_python_out={tmp_path}", str(PROTO)],
                   check=True, capture_output=True, timeout=60)
    for name in GENERATED:
        fresh = (tmp_path / "taskman" / "api" / name).read_text()
        committed = (REPO / "taskman" / "api" / name).read_text()
        assert fresh == committed, (f"taskman/api/{name} is stale: regenerate it (README, "
                                    "'To regenerate')")

