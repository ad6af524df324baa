"""The service's request and response shapes, as pydantic models and OpenAPI fragments: what
/docs shows and what schema-driven clients (and the fuzzing test) work from."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ErrorBody(BaseModel):
    error: str = Field(description="What went wrong, in a few words.")
    detail: Any = Field(None, description="Which input and why; what to send instead.")


class RankedLabel(BaseModel):
    label: str
    probability: float


class PredictionOut(BaseModel):
    label: str = Field(description="Top class, or 'unknown' below the threshold.")
    probability: float = Field(description="Probability of the top class.")
    top_k: list[RankedLabel]


class PredictResponse(BaseModel):
    predictions: list[PredictionOut]


class HealthResponse(BaseModel):
    status: str
    engine: str | None
    queued: int
    batches: int
    images: int
    mean_batch: float


ERROR_RESPONSES = {
    413: {"model": ErrorBody, "description": "Body, image count or image pixels over the limit"},
    415: {"model": ErrorBody, "description": "Not an image (magic bytes) or unsupported body type"},
    422: {"model": ErrorBody, "description": "Missing/misnamed field, bad base64, damaged image"},
    500: {"model": ErrorBody, "description": "Unexpected server error (logged on one line)"},
    504: {"model": ErrorBody, "description": "The request took longer than the server's timeout"},
}

# /predict reads the raw request (multipart, JSON or a raw image, sniffed by hand), so FastAPI
# cannot infer its body from the handler's signature: it is described here for the OpenAPI schema.
PREDICT_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {
                    "file": {
                        "type": "array",
                        "items": {"type": "string", "format": "binary"},
                        "description": "One or more images (repeat the field).",
                    }
                },
                "required": ["file"],
            }
        },
        "application/json": {
            "schema": {
                "type": "object",
                "properties": {
                    "images": {
                        "type": "array",
                        "items": {"type": "string", "format": "byte"},
                        "minItems": 1,
                        "description": "Base64-encoded image files (data: URLs accepted).",
                    }
                },
                "required": ["images"],
            }
        },
        "image/*": {
            "schema": {
                "type": "string",
                "format": "binary",
                "description": "One image as the raw body (curl --data-binary @cat.jpg).",
            }
        },
    },
}
