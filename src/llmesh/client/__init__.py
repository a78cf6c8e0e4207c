"""The Python client SDK of the mesh, used by the CLI, the demo, the benchmarks and tests.

Through the gateway, as any client (signed, rate-limited, audited)::

    from llmesh.client import ApiKey, gateway_channel
    from llmesh.pb.inference.v1 import inference_pb2 as pb, inference_pb2_grpc as pb_grpc

    key = ApiKey("key_...", "secret shown once by `llmesh keys create`")
    stub = pb_grpc.InferenceStub(gateway_channel("127.0.0.1:50051", key))
    print(stub.Generate(pb.GenerateRequest(prompt="你好"), timeout=30).text)

``gateway_aio_channel`` is the same for asyncio. On the mesh's host, operators' tools may
call a service directly with ``local_channel`` / ``local_aio_channel`` (the host's
internal identity). Modules: ``gateway`` (signing channels), ``tokens`` (API key → JWT,
refreshed), ``keys`` (ApiKey from a file or the environment), ``local``, ``errors``
(``describe_error``), ``sampling``, ``trainer`` (upload / watch helpers).
"""

from llmesh.client.errors import RpcFailure, describe_error, is_unreachable
from llmesh.client.gateway import AioSigning, SigningInterceptor, gateway_aio_channel, gateway_channel
from llmesh.client.interceptors import AioMetadata, MetadataInterceptor
from llmesh.client.keys import ApiKey, ApiKeyError, api_key_from_env, read_api_key_file
from llmesh.client.local import OPERATOR, local_aio_channel, local_channel
from llmesh.client.sampling import sampling
from llmesh.client.tokens import AsyncTokenSource, TokenSource, aio_issue_token_fetcher, issue_token_fetcher

__all__ = [
    "OPERATOR",
    "AioMetadata",
    "AioSigning",
    "ApiKey",
    "ApiKeyError",
    "AsyncTokenSource",
    "MetadataInterceptor",
    "RpcFailure",
    "SigningInterceptor",
    "TokenSource",
    "aio_issue_token_fetcher",
    "api_key_from_env",
    "describe_error",
    "gateway_aio_channel",
    "gateway_channel",
    "is_unreachable",
    "issue_token_fetcher",
    "local_aio_channel",
    "local_channel",
    "read_api_key_file",
    "sampling",
]
