"""What the HTTP apps' OpenAPI schemas (``/openapi.json``) say about request bodies and errors.

The handlers read their bodies themselves (safetensors, or JSON checked field by field with errors
that name the field), so FastAPI cannot infer them; ``openapi_extra`` on each route says it here.
With it, clients, docs and API fuzzers (Schemathesis, tests/test_fuzz.py) see the real requests.
"""

from __future__ import annotations

from typing import Any

from edgelam.infer.wire import CONTENT_TYPE

JSON = "application/json"
SERVICE_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}
OPENAI_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"}, "code": {"type": ["string", "null"]}}}}}


def route(media_type: str, body: dict[str, Any], errors: dict[int, str], error_schema: dict[str, Any]) -> dict[str, Any]:
    """``openapi_extra`` for a route: its required request body and its error answers (one JSON body each)."""
    return {"requestBody": {"required": True, "content": {media_type: {"schema": body}}},
            "responses": {str(code): {"description": what, "content": {JSON: {"schema": error_schema}}}
                          for code, what in errors.items()}}


SERVICE_ERRORS = {400: "malformed request, wrong shape or unknown adapter", 413: "body, tokens or context too large",
                  503: "too many requests in flight (edgelam serve --max-concurrent)"}
FORWARD = route(CONTENT_TYPE, {"type": "string", "format": "binary",
                               "description": "a safetensors message: tensors plus JSON metadata 'edgelam' "
                                              "({session, position, adapter, return_logits})"},
                {**SERVICE_ERRORS, 409: "session out of step: replay it from position 0", 415: "not safetensors"},
                SERVICE_ERROR)
PREDICT = route(JSON, {"type": "object", "required": ["inputs"], "additionalProperties": False, "properties": {
    "inputs": {"oneOf": [{"type": "string"}, {"type": "array", "minItems": 1, "maxItems": 256}]},
    "adapter": {"type": "string"}, "truncate": {"type": "boolean"}}}, SERVICE_ERRORS, SERVICE_ERROR)

GATEWAY_ERRORS = {400: "malformed request or an option this gateway does not serve", 404: "another model",
                  413: "body over 8 MB", 503: "the topology cannot answer, or too many requests in flight "
                                                "(edgelam gateway --max-concurrent)"}
OPTIONS = {"model": {"type": "string"}, "max_tokens": {"type": "integer", "minimum": 1},
           "stream": {"type": "boolean"}, "temperature": {"type": "number", "minimum": 0, "maximum": 2},
           "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1}, "top_k": {"type": "integer", "minimum": 0},
           "seed": {"type": "integer", "minimum": -(2**63), "maximum": 2**64 - 1},
           "stop": {"oneOf": [{"type": "string"}, {"type": "array", "maxItems": 4, "items": {"type": "string", "minLength": 1}}]},
           "n": {"type": "integer", "minimum": 1, "maximum": 1}}
MESSAGE = {"type": "object", "required": ["role", "content"], "properties": {
    "role": {"enum": ["system", "user", "assistant"]}, "content": {"type": "string"}}}
CHAT = route(JSON, {"type": "object", "required": ["messages"], "properties": {
    "messages": {"type": "array", "minItems": 1, "items": MESSAGE}, "max_completion_tokens": {"type": "integer"},
    **OPTIONS}}, GATEWAY_ERRORS, OPENAI_ERROR)
COMPLETION = route(JSON, {"type": "object", "required": ["prompt"], "properties": {
    "prompt": {"type": "string", "minLength": 1}, **OPTIONS}}, GATEWAY_ERRORS, OPENAI_ERROR)
