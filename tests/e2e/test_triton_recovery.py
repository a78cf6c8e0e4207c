"""Killing tritonserver: calls fail fast with UNAVAILABLE, and succeed again once
the launcher has restarted it, without restarting the inference service."""

from __future__ import annotations

import os
import signal
import time

import grpc

from llmesh.client import describe_error, local_channel, sampling
from llmesh.pb.inference.v1 import inference_pb2 as pb
from llmesh.pb.inference.v1 import inference_pb2_grpc as pb_grpc
from tests.support.mesh import Mesh


def test_triton_down_is_unavailable_then_recovers(mesh: Mesh) -> None:
    # Without the channel's own retries (which would wait for Triton and hide the status).
    stub = pb_grpc.InferenceStub(local_channel(mesh.address, mesh.cfg.home, retries=False))
    inference_pid = mesh.pid("inference")
    req = pb.GenerateRequest(prompt="hello", sampling=sampling(max_tokens=4))
    assert stub.Generate(req, timeout=30).usage.completion_tokens > 0
    os.kill(mesh.pid("tritonserver"), signal.SIGKILL)

    codes = []
    deadline = time.monotonic() + 15  # a SIGKILLed process with a large heap can take a while to be torn down
    while time.monotonic() < deadline:
        try:
            stub.Generate(req, timeout=30)
        except grpc.RpcError as e:
            codes.append(e.code())
            failure = describe_error(e)
            if e.code() == grpc.StatusCode.UNAVAILABLE:
                assert failure.retry_after_s is not None
                break
        time.sleep(0.1)
    assert grpc.StatusCode.UNAVAILABLE in codes and grpc.StatusCode.INTERNAL not in codes

    deadline = time.monotonic() + 240
    while True:
        try:
            assert stub.Generate(req, timeout=30).usage.completion_tokens > 0
            break
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.UNAVAILABLE, describe_error(e)
            assert time.monotonic() < deadline, "triton did not come back"
            time.sleep(0.5)
    triton = next(p for p in mesh.state()["processes"] if p["name"] == "tritonserver")
    assert triton["restarts"] >= 1
    assert mesh.pid("inference") == inference_pid  # the service recovered by itself
