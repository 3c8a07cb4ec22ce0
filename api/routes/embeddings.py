"""POST /v1/embeddings: vectors from an embedding model, failed over only inside its vector space."""

from fastapi import APIRouter, Request
from fastapi.responses import Response

from api.dialects.embeddings import EmbeddingsAnswer, EmbeddingsRequest, embeddings_job
from api.pipeline import serve_job

router = APIRouter()


@router.post("/v1/embeddings", openapi_extra={"requestBody": {"required": True, "content": {
    "application/json": {"schema": EmbeddingsRequest.model_json_schema()}}}})
async def create_embeddings(request: Request) -> Response:
    """Create embeddings (OpenAI schema; `model` optional: the default embedding space)."""
    return await serve_job(request, EmbeddingsAnswer(), embeddings_job)
