import grpc
from google.rpc import error_details_pb2, status_pb2
from tritonclient.utils import InferenceServerException

from llmesh.runtime import errors
from llmesh.runtime.interceptors import status_for
from llmesh.services.inference.llm_backend import GenerationInput, ModelError, map_error, model_error
from llmesh.services.inference.sampling import Sampling


def _details(trailers: tuple[tuple[str, str | bytes], ...]) -> status_pb2.Status:
    raw = dict(trailers)["grpc-status-details-bin"]
    assert isinstance(raw, bytes)  # a -bin key always carries bytes
    return status_pb2.Status.FromString(raw)


def test_invalid_argument_carries_bad_request_field() -> None:
    code, msg, trailers = status_for(errors.InvalidArgument("sampling.top_p", "must be in (0, 1]"), "rid")
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "sampling.top_p" in msg
    st = _details(trailers)
    br = error_details_pb2.BadRequest()
    assert any(d.Unpack(br) for d in st.details if d.Is(br.DESCRIPTOR))
    assert br.field_violations[0].field == "sampling.top_p"
    assert dict(trailers)["x-request-id"] == "rid"


def test_unavailable_carries_retry_info() -> None:
    code, _, trailers = status_for(errors.Unavailable("down", retry_after_s=2.5), "rid")
    assert code == grpc.StatusCode.UNAVAILABLE
    ri = error_details_pb2.RetryInfo()
    assert any(d.Unpack(ri) for d in _details(trailers).details if d.Is(ri.DESCRIPTOR))
    assert ri.retry_delay.ToTimedelta().total_seconds() == 2.5


def test_unexpected_exception_is_internal_without_leaking() -> None:
    code, msg, _ = status_for(KeyError("secret"), "rid")
    assert code == grpc.StatusCode.INTERNAL and "secret" not in msg and "rid" in msg


def test_model_error_outputs_map_to_domain_errors() -> None:
    inp = GenerationInput(sampling=Sampling(), prompt="x", adapter="faq")
    e = model_error(ModelError("NOT_FOUND", "adapter", "adapter 'faq' not found"), inp)
    assert isinstance(e, errors.NotFound) and e.kind == "adapter" and e.name == "faq"
    why = "prompt tokens (7) + max_tokens (2000) exceeds the context of 1024"
    e = model_error(ModelError("INVALID_ARGUMENT", "max_tokens", why), inp)
    assert isinstance(e, errors.InvalidArgument) and e.field == "sampling.max_tokens" and e.description == why
    e = model_error(ModelError("INTERNAL", "", "boom"), inp)
    assert isinstance(e, errors.Unavailable) and "boom" in e.message
    assert isinstance(model_error(ModelError("NEW_CODE", "", "?"), inp), errors.Unavailable)
    # errors Triton itself raises are not the model's: the model is not there
    assert isinstance(
        map_error(InferenceServerException("Request for unknown model: 'llm' is not found")), errors.Unavailable
    )


def test_a_full_model_queue_is_resource_exhausted_with_retry() -> None:
    e = model_error(
        ModelError("RESOURCE_EXHAUSTED", "", "llm queue is full (256 waiting)"), GenerationInput(Sampling())
    )
    assert isinstance(e, errors.ResourceExhausted) and e.retry_after_s > 0


def test_drafted_rpcs_are_unimplemented_not_internal() -> None:
    code, _, _ = status_for(NotImplementedError("Method not implemented!"), "rid")
    assert code == grpc.StatusCode.UNIMPLEMENTED
