"""The v1 contract follows buf's STANDARD lint rules that matter to callers.

Checked on the compiled descriptors, so it sees exactly what generated stubs see.
"""

import re

import pytest
from google.protobuf import descriptor

from stockward.v1 import admin_pb2, bridge_pb2, inventory_pb2, types_pb2

FILES = (
    types_pb2.DESCRIPTOR,
    inventory_pb2.DESCRIPTOR,
    admin_pb2.DESCRIPTOR,
    bridge_pb2.DESCRIPTOR,
)
SNAKE = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")
PASCAL = re.compile(r"^[A-Z][A-Za-z0-9]*$")
UPPER_SNAKE = re.compile(r"^[A-Z][A-Z0-9]*(_[A-Z0-9]+)*$")


def _upper_snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).upper()


def _enums() -> list[descriptor.EnumDescriptor]:
    found: list[descriptor.EnumDescriptor] = []
    for file in FILES:
        found.extend(file.enum_types_by_name.values())
        for message in file.message_types_by_name.values():
            found.extend(message.enum_types)
    return found


def _messages() -> list[descriptor.Descriptor]:
    return [m for f in FILES for m in f.message_types_by_name.values()]


@pytest.mark.parametrize("file", FILES, ids=lambda f: f.name)
def test_package_is_versioned_and_matches_directory(
    file: descriptor.FileDescriptor,
) -> None:
    assert file.package == "stockward.v1"
    assert file.name.startswith("stockward/v1/")
    assert SNAKE.match(file.name.rsplit("/", 1)[1].removesuffix(".proto"))


@pytest.mark.parametrize("enum", _enums(), ids=lambda e: e.name)
def test_enum_values_are_prefixed_and_zero_is_unspecified(
    enum: descriptor.EnumDescriptor,
) -> None:
    prefix = _upper_snake(enum.name) + "_"
    assert enum.values[0].number == 0
    assert enum.values[0].name == prefix + "UNSPECIFIED"
    for value in enum.values:
        assert value.name.startswith(prefix), value.name
        assert UPPER_SNAKE.match(value.name), value.name


@pytest.mark.parametrize("message", _messages(), ids=lambda m: m.name)
def test_message_and_field_names_follow_conventions(
    message: descriptor.Descriptor,
) -> None:
    assert PASCAL.match(message.name)
    for field in message.fields:
        assert SNAKE.match(field.name), f"{message.name}.{field.name}"


@pytest.mark.parametrize("file", FILES[1:], ids=lambda f: f.name)
def test_each_rpc_has_its_own_request_and_response(
    file: descriptor.FileDescriptor,
) -> None:
    seen: set[str] = set()
    for service in file.services_by_name.values():
        assert service.name.endswith("Service")
        for method in service.methods:
            assert method.input_type.name == method.name + "Request"
            assert method.output_type.name == method.name + "Response"
            for name in (method.input_type.full_name, method.output_type.full_name):
                assert name not in seen, f"{name} is shared between RPCs"
                seen.add(name)
