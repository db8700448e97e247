"""Health checks and server reflection, as load balancers and grpcurl see them."""

import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.conftest import ServerFactory


@pytest.mark.parametrize(
    "service",
    ["", "stockward.v1.InventoryService", "stockward.v1.StockAdminService"],
    ids=["server", "inventory", "admin"],
)
async def test_health_says_serving_once_started(
    start_server: ServerFactory, service: str
) -> None:
    server = await start_server()
    health = health_pb2_grpc.HealthStub(server.channel)

    response = await health.Check(health_pb2.HealthCheckRequest(service=service))

    assert response.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_lists_every_service(start_server: ServerFactory) -> None:
    server = await start_server()
    reflection = reflection_pb2_grpc.ServerReflectionStub(server.channel)

    call = reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    responses = [response async for response in call]

    names = {
        service.name
        for response in responses
        for service in response.list_services_response.service
    }
    assert names == {
        "stockward.v1.InventoryService",
        "stockward.v1.StockAdminService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }


async def test_reflection_serves_the_inventory_contract(
    start_server: ServerFactory,
) -> None:
    server = await start_server()
    reflection = reflection_pb2_grpc.ServerReflectionStub(server.channel)

    call = reflection.ServerReflectionInfo(
        iter(
            [
                reflection_pb2.ServerReflectionRequest(
                    file_containing_symbol="stockward.v1.InventoryService"
                )
            ]
        )
    )
    responses = [response async for response in call]

    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in responses[0].file_descriptor_response.file_descriptor_proto
    ]
    inventory = next(item for item in files if item.name.endswith("inventory.proto"))
    assert inventory.package == "stockward.v1"
    methods = {method.name for method in inventory.service[0].method}
    assert {"Reserve", "Confirm", "ExecuteBatch", "GetAvailability"} <= methods
