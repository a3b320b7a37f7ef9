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
    assert len(shape["services"]["TaskManager"]) == 4
    assert len(shape["enums"]["JobStatus"]) == 5
    assert len(shape["messages"]["TaskStatusResponse"]) == 8
    assert shape["messages"]["StopTaskResponse"] == []


def test_proto_matches_the_rfd():
    assert parse_proto(PROTO.read_text()) == parse_proto(rfd_proto())


def test_compiled_descriptor_matches_the_rfd():
    """The modules actually installed, field by field, against the RFD's text."""
    from google.protobuf.descriptor import FieldDescriptor

    from taskman.api import task_manager_pb2

    rfd = parse_proto(rfd_proto())
    descriptor = task_manager_pb2.DESCRIPTOR
    assert descriptor.package == rfd["package"]
    service = descriptor.services_by_name["TaskManager"]
    assert sorted((method.name, "", method.input_type.name,
                   "stream " if method.server_streaming else "", method.output_type.name)
                  for method in service.methods) == rfd["services"]["TaskManager"]
    assert set(descriptor.services_by_name) == set(rfd["services"])
    assert sorted((value.name, value.number)
                  for value in descriptor.enum_types_by_name["JobStatus"].values) == \
        rfd["enums"]["JobStatus"]
    assert set(descriptor.message_types_by_name) == set(rfd["messages"])
    for name, fields in rfd["messages"].items():
        message = descriptor.message_types_by_name[name]
        compiled = []
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
                        FieldDescriptor.TYPE_BYTES: "bytes"}[field.type]
            compiled.append((label, kind, field.name, field.number))
        assert sorted(compiled) == fields, name


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
